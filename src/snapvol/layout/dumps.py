"""The dump catalog: one record per levelled dump made of a volume (pure encode/decode).

`snapvol dump --level N` needs "the newest dump of a lower level" (the reference's June
examples), so every dump is recorded in the volume it was made from, in the data of the
fixed inode DUMPS_INO. The catalog is a 16-byte header and fixed 320-byte records, oldest
first, so appending one record rewrites only the last block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snapvol.errors import CorruptionError
from snapvol.layout.constants import MAX_NAME

CATALOG_MAGIC = b"SVDUMPS\x00"
CATALOG_VERSION = 1
MAX_LEVEL = 9

_HEAD = struct.Struct("<8sII")  # magic, version, record count
_REC = struct.Struct("<BBH4x16s16sQqQ")  # level, flags, name length, guids, cp, time, bytes
RECORD_SIZE = 320
_NAME_AT = 64


class CatalogError(CorruptionError):
    """The catalog's bytes are not a catalog this version reads."""


@dataclass(frozen=True, slots=True)
class DumpRecord:
    level: int
    snap_guid: bytes
    snap_name: str
    snap_cp: int
    time_ns: int
    nbytes: int  # size of the stream written
    base_guid: bytes = bytes(16)  # zero for a level-0 (full) dump

    def encode(self) -> bytes:
        raw = self.snap_name.encode()
        if not 0 < len(raw) <= MAX_NAME or not 0 <= self.level <= MAX_LEVEL:
            raise ValueError("dump record: bad name or level")
        head = _REC.pack(self.level, 0, len(raw), self.snap_guid, self.base_guid,
                         self.snap_cp, self.time_ns, self.nbytes)
        body = head + bytes(_NAME_AT - len(head)) + raw
        return body + bytes(RECORD_SIZE - len(body))

    @classmethod
    def decode(cls, data: bytes | memoryview, what: str = "dump catalog record") -> DumpRecord:
        level, flags, nlen, guid, base, cp, t, nbytes = _REC.unpack_from(data)
        if level > MAX_LEVEL or not 0 < nlen <= MAX_NAME:
            raise CatalogError(f"{what} is damaged (level {level}, name length {nlen})")
        if flags or any(data[4:8]) or any(data[_NAME_AT + nlen : RECORD_SIZE]):
            raise CatalogError(f"{what}: nonzero bytes where the format says zero")
        if (level == 0) != (not any(base)):
            raise CatalogError(f"{what}: a level-{level} dump "
                               f"{'with' if level == 0 else 'without'} a base")
        try:
            name = bytes(data[_NAME_AT : _NAME_AT + nlen]).decode()
        except UnicodeDecodeError:
            raise CatalogError(f"{what}: the snapshot name is not UTF-8") from None
        return cls(level, guid, name, cp, t, nbytes, base)


def encode_catalog(records: list[DumpRecord]) -> bytes:
    return _HEAD.pack(CATALOG_MAGIC, CATALOG_VERSION, len(records)) + b"".join(
        r.encode() for r in records)


def decode_catalog(data: bytes) -> list[DumpRecord]:
    if not data:
        return []
    if len(data) < _HEAD.size:
        raise CatalogError("dump catalog is truncated")
    magic, version, count = _HEAD.unpack_from(data)
    if magic != CATALOG_MAGIC:
        raise CatalogError("dump catalog has a bad magic")
    if version != CATALOG_VERSION:
        raise CatalogError(f"dump catalog version {version} is not supported")
    if len(data) != _HEAD.size + count * RECORD_SIZE:
        raise CatalogError(f"dump catalog of {len(data)} bytes does not hold exactly its "
                           f"{count} records")
    return [DumpRecord.decode(memoryview(data)[_HEAD.size + i * RECORD_SIZE :],
                              f"dump catalog record {i}")
            for i in range(count)]
