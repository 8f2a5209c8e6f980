"""The extended-attribute set of one inode, as stored in its hidden xattr inode. Pure.

    count u32, then per attribute in name order: name_len u16, value_len u32, name, value

Names are 1 to 255 bytes, values at most 64 KiB (Linux's XATTR_NAME_MAX and
XATTR_SIZE_MAX), each name once, and nothing follows the last value.
"""

from __future__ import annotations

import struct

from snapvol.errors import CorruptionError

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536

_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<HI")


def encode_xattrs(attrs: dict[bytes, bytes]) -> bytes:
    out = [_COUNT.pack(len(attrs))]
    for name, value in sorted(attrs.items()):
        out.append(_ENTRY.pack(len(name), len(value)))
        out.append(name)
        out.append(value)
    return b"".join(out)


def decode_xattrs(blob: bytes, what: str = "extended attributes") -> dict[bytes, bytes]:
    """The attributes of `blob`; CorruptionError naming `what` if it is not a set this
    version wrote (short, a bad length, names out of order, bytes past the end)."""
    if len(blob) < _COUNT.size:
        raise CorruptionError(f"{what}: {len(blob)} bytes, too short for the count")
    (count,) = _COUNT.unpack_from(blob)
    pos, out = _COUNT.size, {}
    last = b""
    for i in range(count):
        if pos + _ENTRY.size > len(blob):
            raise CorruptionError(f"{what}: attribute {i} of {count} is past the end")
        nlen, vlen = _ENTRY.unpack_from(blob, pos)
        pos += _ENTRY.size
        if not 0 < nlen <= XATTR_NAME_MAX or vlen > XATTR_SIZE_MAX:
            raise CorruptionError(f"{what}: attribute {i} has a name of {nlen} bytes and a "
                                  f"value of {vlen}")
        if pos + nlen + vlen > len(blob):
            raise CorruptionError(f"{what}: attribute {i} of {count} is past the end")
        name = blob[pos : pos + nlen]
        if name <= last:
            raise CorruptionError(f"{what}: attribute {name[:40]!r} is out of name order")
        pos += nlen
        out[name] = blob[pos : pos + vlen]
        pos += vlen
        last = name
    if pos != len(blob):
        raise CorruptionError(f"{what}: {len(blob) - pos} bytes past the last attribute")
    return out
