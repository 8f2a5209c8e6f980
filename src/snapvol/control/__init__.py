"""Reaching the process that owns a volume: the control protocol and the registry.

`protocol` is the framing of requests and answers (versioned, with data frames for
streams) and the blocking client; `ops` the typed operations and the table of handlers an
owner serves them with, plus the answers the owner and the CLI share; `registry` this
host's live owners (a JSON file and a socket per image in the run directory), live and
stale; `mounttable` what the kernel knows of mounts (stale FUSE connections, the
processes using a mount, fusermount3). Nothing here imports `snapvol.fuse` or pyfuse3,
so the CLI reaches an owner without loading FUSE.
"""
