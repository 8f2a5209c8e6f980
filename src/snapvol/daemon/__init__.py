"""The process that owns a volume: `owner` opens it, runs its CP timer, answers its
control socket, handles signals and stops cleanly; a front end can be plugged in (the
FUSE mount, `snapvol.fuse.server`), and without one it is the daemon's owner. `checker`
is the online check's own process."""
