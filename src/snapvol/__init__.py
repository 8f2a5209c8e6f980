"""snapvol: copy-on-write, write-anywhere volumes with bitplane snapshots."""

__version__ = "0.1.0"
