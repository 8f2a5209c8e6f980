"""A plain in-memory model of a POSIX tree, the reference the engine is compared against.

The model knows nothing of blocks, CPs or inode numbers: a directory is a dict of names,
a regular file is a bytearray, a hard link is the same Python object under two names, and
a snapshot is a deep copy (which keeps the sharing, so links stay links inside it).

Both the model and the engine are reduced to the same *form* for comparison: a dict from
path to `Entry`, where a non-directory lists every path of its inode (`links`) instead of
an inode number, so two trees compare equal exactly when they hold the same names, types,
contents, modes, xattrs, link counts and hard-link groups.

Operations raise `ModelError` with the *set* of errnos a POSIX system may return: when
several error conditions hold at once POSIX lets an implementation report any of them, so
the test accepts any errno of the set rather than pinning one kernel's precedence.
"""

from __future__ import annotations

import copy
import errno
from dataclasses import dataclass, field

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

FILE_PERM = 0o644
DIR_PERM = 0o755
SYMLINK_PERM = 0o777


class ModelError(Exception):
    """The operation must fail with one of `errnos`."""

    def __init__(self, *errnos: int) -> None:
        super().__init__(", ".join(errno.errorcode.get(e, str(e)) for e in sorted(errnos)))
        self.errnos = frozenset(errnos)


class ModelSnapshotError(Exception):
    """The snapshot operation must be refused (unknown, duplicate or invalid name)."""


@dataclass(eq=False)
class Obj:
    """Anything a directory entry can name; identity is the inode."""

    perm: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


@dataclass(eq=False)
class File(Obj):
    data: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class Symlink(Obj):
    target: bytes = b""


@dataclass(eq=False)
class Dir(Obj):
    entries: dict[bytes, Obj] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One path of a tree as compared: type, attributes and contents."""

    kind: str  # "dir", "file" or "symlink"
    perm: int
    nlink: int
    size: int
    data: bytes  # file contents or symlink target; b"" for a directory
    xattrs: tuple[tuple[bytes, bytes], ...]
    links: tuple[bytes, ...]  # every path of this inode, sorted (non-directories only)


Form = dict[bytes, Entry]


def join(parent: bytes, name: bytes) -> bytes:
    return parent.rstrip(b"/") + b"/" + name


def split(path: bytes) -> tuple[bytes, bytes]:
    head, _, tail = path.rpartition(b"/")
    return head or b"/", tail


class Tree:
    """One file system tree (the active one or a snapshot's) with POSIX operations."""

    def __init__(self, root: Dir | None = None) -> None:
        self.root = root if root is not None else Dir(DIR_PERM)

    def copy(self) -> Tree:
        """An independent tree with the same sharing (hard links stay links)."""
        return Tree(copy.deepcopy(self.root))

    # ---- walking --------------------------------------------------------------------
    def walk(self) -> list[tuple[bytes, Obj]]:
        """(path, object) of every entry, parents before children, root first."""
        out: list[tuple[bytes, Obj]] = [(b"/", self.root)]
        stack: list[tuple[bytes, Dir]] = [(b"/", self.root)]
        while stack:
            path, d = stack.pop()
            for name in sorted(d.entries):
                child = d.entries[name]
                cpath = join(path, name)
                out.append((cpath, child))
                if isinstance(child, Dir):
                    stack.append((cpath, child))
        return out

    def paths(self) -> list[bytes]:
        return sorted(p for p, _ in self.walk())

    def dirs(self) -> list[bytes]:
        return sorted(p for p, o in self.walk() if isinstance(o, Dir))

    def files(self) -> list[bytes]:
        return sorted(p for p, o in self.walk() if isinstance(o, File))

    def get(self, path: bytes) -> Obj | None:
        """The object at `path` (no symlink is followed), or None."""
        obj: Obj = self.root
        for part in [p for p in path.split(b"/") if p]:
            if not isinstance(obj, Dir):
                return None
            nxt = obj.entries.get(part)
            if nxt is None:
                return None
            obj = nxt
        return obj

    def _obj(self, path: bytes) -> Obj:
        obj = self.get(path)
        if obj is None:
            raise ModelError(errno.ENOENT)
        return obj

    def _dir(self, path: bytes) -> Dir:
        obj = self._obj(path)
        if not isinstance(obj, Dir):
            raise ModelError(errno.ENOTDIR)
        return obj

    def _contains(self, anc: Dir, obj: Obj) -> bool:
        """Is `obj` the directory `anc` itself or somewhere below it?"""
        if obj is anc:
            return True
        stack = [anc]
        while stack:
            d = stack.pop()
            for child in d.entries.values():
                if child is obj:
                    return True
                if isinstance(child, Dir):
                    stack.append(child)
        return False

    # ---- the form compared with the engine ------------------------------------------
    def form(self) -> Form:
        walked = self.walk()
        links: dict[int, list[bytes]] = {}
        for path, obj in walked:
            if not isinstance(obj, Dir):
                links.setdefault(id(obj), []).append(path)
        out: Form = {}
        for path, obj in walked:
            xattrs = tuple(sorted(obj.xattrs.items()))
            if isinstance(obj, Dir):
                subdirs = sum(isinstance(c, Dir) for c in obj.entries.values())
                out[path] = Entry("dir", obj.perm, 2 + subdirs, 0, b"", xattrs, ())
                continue
            group = tuple(sorted(links[id(obj)]))
            if isinstance(obj, File):
                data = bytes(obj.data)
                out[path] = Entry("file", obj.perm, len(group), len(data), data, xattrs, group)
            else:
                assert isinstance(obj, Symlink)
                out[path] = Entry("symlink", SYMLINK_PERM, len(group), len(obj.target),
                                  obj.target, xattrs, group)
        return out

    # ---- creating ---------------------------------------------------------------------
    def _new(self, parent: bytes, name: bytes, obj: Obj) -> None:
        d = self._dir(parent)
        if name in d.entries:
            raise ModelError(errno.EEXIST)
        d.entries[name] = obj

    def create(self, parent: bytes, name: bytes, perm: int = FILE_PERM) -> None:
        self._new(parent, name, File(perm))

    def mkdir(self, parent: bytes, name: bytes, perm: int = DIR_PERM) -> None:
        self._new(parent, name, Dir(perm))

    def symlink(self, parent: bytes, name: bytes, target: bytes) -> None:
        self._new(parent, name, Symlink(SYMLINK_PERM, target=target))

    def link(self, path: bytes, parent: bytes, name: bytes) -> None:
        obj = self._obj(path)
        d = self._obj(parent)
        errs = set()
        if isinstance(obj, Dir):
            errs.add(errno.EPERM)
        if not isinstance(d, Dir):
            errs.add(errno.ENOTDIR)
        elif name in d.entries:
            errs.add(errno.EEXIST)
        if errs:
            raise ModelError(*errs)
        assert isinstance(d, Dir)
        d.entries[name] = obj

    # ---- file data --------------------------------------------------------------------
    def _file(self, path: bytes) -> File:
        obj = self._obj(path)
        if isinstance(obj, Dir):
            raise ModelError(errno.EISDIR)
        if not isinstance(obj, File):
            raise ModelError(errno.EINVAL)
        return obj

    def write(self, path: bytes, offset: int, data: bytes) -> None:
        f = self._file(path)
        if not data:
            return
        end = offset + len(data)
        if end > len(f.data):
            f.data.extend(bytes(end - len(f.data)))
        f.data[offset:end] = data

    def truncate(self, path: bytes, size: int) -> None:
        f = self._file(path)
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))

    def read(self, path: bytes) -> bytes:
        return bytes(self._file(path).data)

    # ---- attributes -------------------------------------------------------------------
    def chmod(self, path: bytes, perm: int) -> None:
        obj = self._obj(path)
        if not isinstance(obj, Symlink):
            obj.perm = perm

    def setxattr(self, path: bytes, name: bytes, value: bytes) -> None:
        self._obj(path).xattrs[name] = value

    def removexattr(self, path: bytes, name: bytes) -> None:
        obj = self._obj(path)
        if name not in obj.xattrs:
            raise ModelError(errno.ENODATA)
        del obj.xattrs[name]

    # ---- removing ---------------------------------------------------------------------
    def unlink(self, parent: bytes, name: bytes) -> None:
        d = self._dir(parent)
        obj = d.entries.get(name)
        if obj is None:
            raise ModelError(errno.ENOENT)
        if isinstance(obj, Dir):
            raise ModelError(errno.EISDIR)
        del d.entries[name]

    def rmdir(self, parent: bytes, name: bytes) -> None:
        d = self._dir(parent)
        obj = d.entries.get(name)
        if obj is None:
            raise ModelError(errno.ENOENT)
        if not isinstance(obj, Dir):
            raise ModelError(errno.ENOTDIR)
        if obj.entries:
            raise ModelError(errno.ENOTEMPTY)
        del d.entries[name]

    # ---- rename -----------------------------------------------------------------------
    def rename(self, sparent: bytes, sname: bytes, dparent: bytes, dname: bytes,
               flags: int = 0) -> None:
        """rename/renameat2 with Linux semantics; several conditions give an errno set."""
        sd, dd = self._dir(sparent), self._dir(dparent)
        src = sd.entries.get(sname)
        if src is None:
            raise ModelError(errno.ENOENT)
        dst = dd.entries.get(dname)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise ModelError(errno.ENOENT)
            errs = set()
            if isinstance(src, Dir) and self._contains(src, dd):
                errs.add(errno.EINVAL)
            if isinstance(dst, Dir) and self._contains(dst, sd):
                errs.add(errno.EINVAL)
            if errs:
                raise ModelError(*errs)
            sd.entries[sname], dd.entries[dname] = dst, src
            return
        if flags & RENAME_NOREPLACE and dst is not None:
            raise ModelError(errno.EEXIST)
        errs = set()
        if isinstance(src, Dir) and self._contains(src, dd):
            errs.add(errno.EINVAL)
        if dst is not None and dst is not src:
            if isinstance(src, Dir) and not isinstance(dst, Dir):
                errs.add(errno.ENOTDIR)
            if not isinstance(src, Dir) and isinstance(dst, Dir):
                errs.add(errno.EISDIR)
            if isinstance(dst, Dir) and dst.entries:
                errs.add(errno.ENOTEMPTY)
        if errs:
            raise ModelError(*errs)
        if dst is src:
            return  # two names of one inode (or one name twice): nothing happens
        del sd.entries[sname]
        dd.entries[dname] = src


class Model:
    """The active tree and a deep copy per snapshot."""

    def __init__(self) -> None:
        self.active = Tree()
        self.snapshots: dict[str, Tree] = {}

    def snapshot_create(self, name: str, limit: int = 255) -> None:
        if name in self.snapshots or len(self.snapshots) >= limit:
            raise ModelSnapshotError(name)
        self.snapshots[name] = self.active.copy()

    def snapshot_delete(self, name: str) -> None:
        if name not in self.snapshots:
            raise ModelSnapshotError(name)
        del self.snapshots[name]

    def snapshot_rename(self, old: str, new: str) -> None:
        if old not in self.snapshots or new in self.snapshots:
            raise ModelSnapshotError(old)
        self.snapshots[new] = self.snapshots.pop(old)

    def snapshot_restore(self, name: str) -> None:
        if name not in self.snapshots:
            raise ModelSnapshotError(name)
        self.active = self.snapshots[name].copy()

    def copy(self) -> Model:
        m = Model()
        m.active = self.active.copy()
        m.snapshots = {k: v.copy() for k, v in self.snapshots.items()}
        return m

    def forms(self) -> tuple[Form, dict[str, Form]]:
        """What the engine must show: the active form and each snapshot's form."""
        return self.active.form(), {k: v.form() for k, v in self.snapshots.items()}
