"""POSIX-level operations on a volume or a read-only snapshot view."""

from snapvol.fs.posix import FileSystem, Stat

__all__ = ["FileSystem", "Stat"]
