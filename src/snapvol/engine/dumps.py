"""The dump catalog of a volume, kept in the fixed inode DUMPS_INO of its inode file.

It lives in the inode file, so it belongs to the file system's history: a snapshot keeps
the catalog as it was, a received stream brings the source's, and restoring a snapshot
brings back the catalog of that time (dumps made later are forgotten, so the next dump
is taken relative to an older one: larger, never wrong).
"""

from __future__ import annotations

import stat
import time

from snapvol.engine.inodefile import INODE_FLAG_SYSTEM, InodeFile
from snapvol.engine.volume import Volume
from snapvol.errors import VolumeError
from snapvol.layout.constants import DUMPS_INO
from snapvol.layout.dumps import CatalogError, DumpRecord, decode_catalog, encode_catalog


def catalog(image: InodeFile) -> list[DumpRecord]:
    """The dumps recorded in `image`, oldest first ([] before the first dump)."""
    if not image.exists(DUMPS_INO):
        return []
    node = image.node(DUMPS_INO)
    try:
        return decode_catalog(image.read(node, 0, node.inode.size))
    except CatalogError as err:
        raise VolumeError(f"the dump catalog (inode {DUMPS_INO}) is damaged: {err}") from None


def record(vol: Volume, rec: DumpRecord) -> None:
    """Append `rec` to the catalog of `vol`'s active file system and commit it."""
    with vol.mutex:
        img = vol.active
        data = encode_catalog([*catalog(img), rec])
        if img.exists(DUMPS_INO):
            node = img.node(DUMPS_INO)
        else:
            img._load_inomap()  # create_reserved marks the map, which must be loaded first
            node = img.create_reserved(DUMPS_INO, stat.S_IFREG | 0o600, time.time_ns())
            node.inode.flags = INODE_FLAG_SYSTEM
        img.write(node, 0, data)
        vol.cp()
