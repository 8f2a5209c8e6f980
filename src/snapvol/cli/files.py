"""Commands on files: put and get (tree copies, see snapvol.fs.copy), ls, cat and rm.

Paths inside the volume are absolute from its root ("a/b" means "/a/b"). Names are bytes
on the volume; `ls` and `cat` write bytes to stdout, so names and contents that are not
UTF-8 come out as they are stored.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import sys

import click

from snapvol.cli import complete
from snapvol.cli.output import json_name, print_json, show_time, type_name
from snapvol.cli.progress import copy_progress
from snapvol.cli.session import open_volume
from snapvol.cli.sizes import human_size
from snapvol.errors import FsError
from snapvol.fs import FileSystem, Stat
from snapvol.fs.copy import CHUNK, CopyStats, get_tree, put_tree

_SNAPSHOT = click.option("--snapshot", "-s", metavar="NAME", shell_complete=complete.snapshot,
                         help="Read from snapshot NAME instead of the active file system.")


def _count(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def _summary(verb: str, stats: CopyStats) -> str:
    parts = [_count(stats.files, "file"), _count(stats.directories, "directory", "directories")]
    for n, word in ((stats.symlinks, "symlink"), (stats.specials, "special file"),
                    (stats.hardlinks, "hard link")):
        if n:
            parts.append(_count(n, word))
    if stats.size == stats.bytes:
        return f"{verb} {', '.join(parts)}; {human_size(stats.bytes)} of data"
    # The progress bar counts the files' lengths, holes included: so does this line.
    return (f"{verb} {', '.join(parts)}; {human_size(stats.size)} "
            f"({human_size(stats.bytes)} of data, the rest holes)")


@click.command()
@click.argument("image", shell_complete=complete.image_path)
@click.argument("src")
@click.argument("dest", default="/")
def put(image: str, src: str, dest: str) -> None:
    """Copy the host file or tree SRC into the volume, like `cp -a SRC DEST`.

    DEST (default /) that does not exist becomes the copy; an existing directory gets
    the copy inside it. Nothing that exists is overwritten, and a copy that fails (a full
    volume) is removed again.
    """
    with open_volume(image, writable=True) as vol, copy_progress("put") as progress:
        stats = put_tree(FileSystem(vol), src, dest, progress)
    click.echo(_summary("copied", stats))


@click.command()
@click.argument("image", shell_complete=complete.image_path)
@click.argument("path")
@click.argument("dest")
@_SNAPSHOT
def get(image: str, path: str, dest: str, snapshot: str | None) -> None:
    """Copy PATH from the volume (or a snapshot) to the host, like `cp -a PATH DEST`."""
    with open_volume(image, writable=False) as vol, copy_progress("get") as progress:
        stats = get_tree(FileSystem(vol, snapshot), path, dest, progress)
    click.echo(_summary("copied", stats))


@click.command()
@click.argument("image", shell_complete=complete.image_path)
@click.argument("path", default="/")
@_SNAPSHOT
@click.option("-l", "long_", is_flag=True, help="Long listing: mode, links, owner, size, time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(image: str, path: str, snapshot: str | None, long_: bool, as_json: bool) -> None:
    """List a directory (or show one file) of the volume or of a snapshot."""
    raw = os.fsencode(path)
    with open_volume(image, writable=False) as vol:
        fs = FileSystem(vol, snapshot)
        st = fs.stat(raw, follow=not long_)
        if st.is_dir:
            rows = [(name, fs.getattr(ino)) for name, ino, _, _ in sorted(fs.iterdir(st.ino))]
        else:
            rows = [(raw.rstrip(b"/"), st)]
        targets = {s.ino: fs.readlink(s.ino) for _, s in rows if stat.S_ISLNK(s.mode)}
    if as_json:
        print_json([_json_entry(name, s, targets.get(s.ino)) for name, s in rows])
        return
    out = sys.stdout.buffer
    lines = _long_lines(rows, targets) if long_ else [name for name, _ in rows]
    for line in lines:
        out.write(line + b"\n")
    out.flush()


def _json_entry(name: bytes, st: Stat, target: bytes | None) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": json_name(name), "type": type_name(st.mode), "mode": stat.S_IMODE(st.mode),
        "mode_string": stat.filemode(st.mode), "ino": st.ino, "nlink": st.nlink,
        "uid": st.uid, "gid": st.gid, "size": st.size, "mtime_ns": st.mtime_ns,
    }
    if target is not None:
        entry["target"] = json_name(target)
    if stat.S_ISCHR(st.mode) or stat.S_ISBLK(st.mode):
        entry["rdev"] = st.rdev
    return entry


def _long_lines(rows: list[tuple[bytes, Stat]], targets: dict[int, bytes]) -> list[bytes]:
    """`ls -l` columns, aligned; device nodes show major, minor in place of a size."""
    cells = []
    for _, st in rows:
        if stat.S_ISCHR(st.mode) or stat.S_ISBLK(st.mode):
            size = f"{os.major(st.rdev)}, {os.minor(st.rdev)}"
        else:
            size = str(st.size)
        cells.append((stat.filemode(st.mode), str(st.nlink), str(st.uid), str(st.gid), size,
                      show_time(st.mtime_ns)))
    widths = [max((len(c[i]) for c in cells), default=0) for i in range(6)]
    lines = []
    for (name, st), c in zip(rows, cells, strict=True):
        head = (f"{c[0]} {c[1]:>{widths[1]}} {c[2]:>{widths[2]}} {c[3]:>{widths[3]}} "
                f"{c[4]:>{widths[4]}} {c[5]} ")
        line = head.encode() + name
        if st.ino in targets:
            line += b" -> " + targets[st.ino]
        lines.append(line)
    return lines


@click.command()
@click.argument("image", shell_complete=complete.image_path)
@click.argument("path")
@_SNAPSHOT
def cat(image: str, path: str, snapshot: str | None) -> None:
    """Write a file's bytes to stdout (streamed, 1 MiB at a time)."""
    out = sys.stdout.buffer
    with open_volume(image, writable=False) as vol:
        fs = FileSystem(vol, snapshot)
        st = fs.stat(os.fsencode(path))
        if st.is_dir:
            raise FsError(errno.EISDIR, f"{path}: is a directory")
        off = 0
        while off < st.size:
            data = fs.read(st.ino, off, min(CHUNK, st.size - off))
            if not data:
                break
            out.write(data)
            off += len(data)
    out.flush()


@click.command()
@click.argument("image", shell_complete=complete.image_path)
@click.argument("path")
@click.option("-r", "recursive", is_flag=True, help="Remove a directory and all it holds.")
def rm(image: str, path: str, recursive: bool) -> None:
    """Remove a file, symlink or special file; with -r also a directory tree."""
    raw = os.fsencode(path)
    if posixpath.normpath(b"/" + raw) in (b"/", b"//"):
        raise FsError(errno.EPERM, "refusing to remove the root directory /")
    with open_volume(image, writable=True) as vol:
        fs = FileSystem(vol)
        parent, name = fs.split(raw)
        if name in (b".", b".."):
            raise FsError(errno.EINVAL, f"refusing to remove {path!r}: name the entry itself")
        st = fs.lookup(parent, name)
        if st.is_dir and not recursive:
            raise FsError(errno.EISDIR, f"{path} is a directory: use -r to remove it and "
                                        "everything in it")
        fs.remove_entry(parent, name)
    click.echo(f"removed {path}")
