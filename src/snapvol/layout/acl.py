"""POSIX ACLs in the Linux `posix_acl_xattr` form, and the rules that tie them to the mode.

An ACL is stored as the value of the `system.posix_acl_access` (access ACL) or
`system.posix_acl_default` (a directory's default ACL, inherited by what is created in it)
xattr, in the byte layout the kernel hands a file system: a little-endian u32 version (2),
then 8-byte entries `tag u16, perm u16, id u32`. Pure: no I/O.

The mode rules mirror the kernel's fs/posix_acl.c, which is what ext4 runs, so a file
system that applies them (fs.posix) behaves like ext4 when a FUSE kernel enforces the
ACLs it stores (FUSE_CAP_POSIX_ACL): the ACL's owner, group-class and other entries and
the mode's permission bits are one and the same, so setting either updates the other.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, replace

from snapvol.errors import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ = 0x01
USER = 0x02
GROUP_OBJ = 0x04
GROUP = 0x08
MASK = 0x10
OTHER = 0x20
UNDEFINED_ID = 0xFFFFFFFF
_TAG_NAMES = {USER_OBJ: "user", USER: "user", GROUP_OBJ: "group", GROUP: "group",
              MASK: "mask", OTHER: "other"}

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_PERM_BITS = 0o7
_S_IRWXUGO = 0o777


@dataclass(frozen=True, slots=True)
class Entry:
    """One ACL entry; `id` is a uid (USER) or gid (GROUP), UNDEFINED_ID for the others."""

    tag: int
    perm: int
    id: int = UNDEFINED_ID

    def __str__(self) -> str:
        who = "" if self.id == UNDEFINED_ID else str(self.id)
        rwx = "".join(c if self.perm & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
        return f"{_TAG_NAMES.get(self.tag, hex(self.tag))}:{who}:{rwx}"


Acl = tuple[Entry, ...]


def _invalid(why: str) -> FsError:
    return FsError(errno.EINVAL, f"malformed POSIX ACL: {why}")


def decode(value: bytes) -> Acl:
    """The entries of an ACL xattr value, validated (FsError EINVAL otherwise). A value
    with no entries is the empty ACL `()`: setting it removes the ACL, as in the kernel."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise _invalid(f"{len(value)} bytes is not a 4-byte header plus 8-byte entries")
    (version,) = _HEADER.unpack_from(value)
    if version != VERSION:
        raise _invalid(f"version {version}, not {VERSION}")
    acl = tuple(Entry(tag, perm, ident if tag in (USER, GROUP) else UNDEFINED_ID)
                for tag, perm, ident in _ENTRY.iter_unpack(memoryview(value)[_HEADER.size:]))
    if acl:
        validate(acl)
    return acl


def encode(acl: Acl) -> bytes:
    """The xattr value of an ACL (ids of entries that name nobody are UNDEFINED_ID)."""
    return _HEADER.pack(VERSION) + b"".join(
        _ENTRY.pack(e.tag, e.perm, e.id if e.tag in (USER, GROUP) else UNDEFINED_ID)
        for e in acl)


def validate(acl: Acl) -> None:
    """The kernel's posix_acl_valid: entries in tag order, exactly one owner, owning
    group and other entry, a mask iff there are named users or groups, and perms within
    rwx. Named entries must also name distinct ids (libacl refuses duplicates; with
    them the answer for that id would depend on entry order)."""
    order = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)
    last = -1
    seen: set[tuple[int, int]] = set()
    counts = dict.fromkeys(order, 0)
    for e in acl:
        if e.tag not in counts:
            raise _invalid(f"unknown tag {e.tag:#x}")
        if e.perm & ~_PERM_BITS:
            raise _invalid(f"permissions {e.perm:#o} of {e} are not within rwx")
        rank = order.index(e.tag)
        if rank < last:
            raise _invalid(f"{e} is out of order (owner, users, group, groups, mask, other)")
        last = rank
        counts[e.tag] += 1
        if e.tag in (USER, GROUP):
            if (e.tag, e.id) in seen:
                raise _invalid(f"{e} appears twice")
            seen.add((e.tag, e.id))
    for tag in (USER_OBJ, GROUP_OBJ, OTHER):
        if counts[tag] != 1:
            raise _invalid(f"{counts[tag]} {_TAG_NAMES[tag]}:: entries, not 1")
    named = counts[USER] + counts[GROUP]
    if counts[MASK] > 1 or (named and not counts[MASK]):
        raise _invalid("a mask entry is needed with named users or groups, and only one")


def from_mode(mode: int) -> Acl:
    """The minimal ACL that says what the permission bits of `mode` say."""
    return (Entry(USER_OBJ, (mode >> 6) & _PERM_BITS), Entry(GROUP_OBJ, (mode >> 3) & _PERM_BITS),
            Entry(OTHER, mode & _PERM_BITS))


def is_minimal(acl: Acl) -> bool:
    """Whether the ACL says no more than permission bits can (posix_acl_equiv_mode == 0):
    such an access ACL is kept as the mode alone, and the xattr goes."""
    return all(e.tag in (USER_OBJ, GROUP_OBJ, OTHER) for e in acl)


def mode_of(acl: Acl, mode: int) -> int:
    """`mode` with its permission bits taken from the ACL: owner, mask (or owning group
    when there is no mask) and other. The file type and the set-ID and sticky bits stay."""
    perms = 0
    for e in acl:
        if e.tag == USER_OBJ:
            perms |= e.perm << 6
        elif e.tag == GROUP_OBJ:
            perms |= e.perm << 3
        elif e.tag == OTHER:
            perms |= e.perm
    mask = next((e for e in acl if e.tag == MASK), None)
    if mask is not None:
        perms = (perms & ~0o070) | mask.perm << 3
    return (mode & ~_S_IRWXUGO) | perms


def chmod(acl: Acl, mode: int) -> Acl:
    """The access ACL after a chmod to `mode` (posix_acl_chmod): the owner and other
    entries, and the mask (the owning group when there is no mask), take the new bits."""
    has_mask = any(e.tag == MASK for e in acl)
    group_class = MASK if has_mask else GROUP_OBJ
    bits = {USER_OBJ: (mode >> 6) & _PERM_BITS, group_class: (mode >> 3) & _PERM_BITS,
            OTHER: mode & _PERM_BITS}
    return tuple(replace(e, perm=bits[e.tag]) if e.tag in bits else e for e in acl)


def inherit(default: Acl, mode: int) -> tuple[Acl, int]:
    """(access ACL, mode) of a new inode created with `mode` in a directory whose default
    ACL is `default` (posix_acl_create_masq): the default ACL's owner, group-class and
    other entries are limited by the mode's bits, and the mode by those entries. The
    access ACL is minimal (so only the mode is kept) when the default ACL was."""
    perms = mode & _S_IRWXUGO
    out: list[Entry] = []
    for e in default:
        if e.tag == USER_OBJ:
            e = replace(e, perm=e.perm & (perms >> 6))
            perms &= (e.perm << 6) | ~0o700
        elif e.tag == OTHER:
            e = replace(e, perm=e.perm & perms)
            perms &= e.perm | ~0o007
        out.append(e)
    has_mask = any(e.tag == MASK for e in out)
    group_class = MASK if has_mask else GROUP_OBJ
    for i, e in enumerate(out):
        if e.tag == group_class:
            out[i] = e = replace(e, perm=e.perm & (perms >> 3))
            perms &= (e.perm << 3) | ~0o070
    return tuple(out), (mode & ~_S_IRWXUGO) | perms
