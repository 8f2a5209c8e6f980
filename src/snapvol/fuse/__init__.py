"""The FUSE front end: mount a volume, with its snapshots under `.snapshot/`.

`operations` is the pyfuse3 Operations class; `inodes`, `handles` and `snapdir` hold what
it keeps between requests; `control` is the JSON protocol of the control socket and
`registry` the list of this host's mounts; `server` runs a mount (trio loop, signals,
control socket). Only `operations` and `server` import pyfuse3, so the CLI can talk to a
mount without loading it.
"""
