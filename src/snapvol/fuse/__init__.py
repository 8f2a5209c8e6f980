"""The FUSE front end: a volume's owner serving it to the kernel, with its snapshots under
`.snapshot/`.

`operations` is the pyfuse3 Operations class; `inodes`, `handles` and `snapdir` hold what
it keeps between requests; `follow` is a read-only mount following receives; `readahead`
the kernel's readahead window; `server` plugs FUSE into the owner of the volume
(`snapvol.daemon.owner`): init, main loop, the follow task, and the control operations
only a mount answers. Only `operations`, `follow` and `server` import pyfuse3; the control
protocol and the registry are `snapvol.control`, which imports nothing from here.
"""
