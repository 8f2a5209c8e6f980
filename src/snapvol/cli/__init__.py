"""The `snapvol` command line: volumes, snapshots and file copies from a shell.

`main.py` holds the entry point and the volume commands, `snap.py` the snapshot commands,
`files.py` the commands that move and list files; the rest are their shared helpers.
"""
