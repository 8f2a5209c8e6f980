"""Levelled dumps: image streams kept as files, each recorded in the volume, and their
restore as a checked chain.

As in the reference's June examples (and dump(8)), a level-0 dump is a full stream of a
snapshot (with the older snapshots it carries), and a level-N dump is the increment from
the snapshot of the newest dump of a lower level:

    June3.level0 = June3 + June2 + June1
    June5.level1 = June5 + June4 - June3
    June7.level2 = June7 + June6 - June5
    June9.level1 = June9 + June8 - June3

The volume's dump catalog (engine/dumps.py) says which dump is the newest of each level.
The base is found by GUID, so it may have been renamed, or kept only as a shadow snapshot
(`snap create --shadow --from`), which holds no space and over-sends a little.

A restore applies dump files in the order given. Before anything is written every file is
read through (each record checked) and the chain is checked: the first file is a full dump
(or, on an existing volume, an increment from a snapshot it holds) and each next file is
the increment from the snapshot the previous one brought. A missing, misplaced or extra
file is named, with the snapshot it needs.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from snapvol.engine import dumps
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.image.receiver import CREATE_MAX_BLOCKS, ReceiveResult, open_for_receive, receive
from snapvol.image.sender import Progress, SendPlan, plan, write_plan
from snapvol.layout.constants import BLOCK_SIZE
from snapvol.layout.dumps import MAX_LEVEL, DumpRecord
from snapvol.layout.snaptable import SnapEntry
from snapvol.streams.imagestream import (
    ROLE_BASE,
    ROLE_TOP,
    Decoder,
    StreamError,
    StreamHeader,
    StreamTooLarge,
)

READ_CHUNK = 1 << 20


class DumpError(SnapvolError):
    """A dump that cannot be taken, or dump files that do not form a chain."""


def guid_str(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=raw))


# ---- dumping ------------------------------------------------------------------------------
def base_of(vol: Volume, level: int) -> DumpRecord | None:
    """The dump a level-`level` dump is taken relative to: the newest of a lower level."""
    if not 0 <= level <= MAX_LEVEL:
        raise DumpError(f"dump level {level} is out of range: levels are 0 to {MAX_LEVEL}")
    lower = [r for r in dumps.catalog(vol.active) if r.level < level]
    return lower[-1] if lower else None


def _holder(vol: Volume, guid: bytes) -> SnapEntry | None:
    """The snapshot of `vol` with this GUID, a regular one before a shadow."""
    found = [e for e in vol.snapshots.entries() if e.guid == guid]
    found.sort(key=lambda e: e.shadow)
    return found[0] if found else None


def plan_dump(vol: Volume, snap: str, level: int) -> tuple[SendPlan, DumpRecord | None]:
    """The stream a level-`level` dump of `snap` would write, and the dump it builds on."""
    base = base_of(vol, level)
    if level and base is None:
        raise DumpError(f"{vol.path} records no dump of a level below {level}; take a "
                        "level-0 dump first ('snapvol dump --list' shows the dumps)")
    base_name = None
    if base is not None:
        holder = _holder(vol, base.snap_guid)
        if holder is None:
            raise DumpError(
                f"the level-{base.level} dump this one builds on was made of snapshot "
                f"{base.snap_name!r} (GUID {guid_str(base.snap_guid)}), which {vol.path} no "
                "longer holds; take a lower-level dump again, and keep dumped snapshots "
                "(or a shadow of them: 'snapvol snap create IMAGE NAME --shadow --from SNAP')")
        if holder.guid == vol.snapshots.get(snap).guid:
            raise DumpError(f"snapshot {snap!r} was already dumped at level {base.level}; "
                            "take a new snapshot to dump")
        base_name = holder.name
    return plan(vol, snap, base_name), base


def dump(vol: Volume, snap: str, level: int, out: IO[bytes],
         progress: Progress | None = None, record: bool = True) -> DumpRecord:
    """Write a level-`level` dump of snapshot `snap` to `out` and record it in `vol`
    (open writable). The record is added only after the whole stream is written; with
    `record` False the caller adds it (`dumps.record`) once the output is in place."""
    with vol.mutex:
        p, base = plan_dump(vol, snap, level)
        done = write_plan(vol, p, out, progress)
        top = p.snap
        rec = DumpRecord(level, top.guid, top.name, top.cp_count, time.time_ns(), done,
                         base.snap_guid if base is not None else bytes(16))
        if record:
            dumps.record(vol, rec)
        return rec


# ---- restoring ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DumpFile:
    """What one dump file brings: read from its HEADER and TABLE, every record checked."""

    path: str
    header: StreamHeader
    top: SnapEntry
    base: SnapEntry | None
    nbytes: int

    @property
    def what(self) -> str:
        kind = f"increment from {self.base.name!r}" if self.base else "full dump"
        return f"{self.path} ({kind} to {self.top.name!r})"


def chunks_of(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(READ_CHUNK):
        yield chunk


def inspect(path: str, max_blocks: int = CREATE_MAX_BLOCKS,
            target: str | None = None) -> DumpFile:
    """Read a dump file through, checking every record; what it brings. A dump of a
    volume past `max_blocks` (the size of `target`, the image it would go to, or with
    None what `--create` makes) is refused before its plane is made."""
    dec = Decoder(max_blocks)
    try:
        with open(path, "rb") as f:
            for chunk in chunks_of(f):
                dec.feed(chunk)
                for _ in dec.records():
                    pass
            dec.finish()
    except OSError as err:
        raise DumpError(f"cannot read {path}: {err.strerror}") from None
    except StreamTooLarge as err:
        size = err.nblocks * BLOCK_SIZE
        if target is not None:
            raise DumpError(f"{path} is a dump of a {size}-byte volume, larger than {target} "
                            f"({err.limit * BLOCK_SIZE} bytes); restore into a larger image"
                            ) from None
        raise DumpError(f"{path} is a dump of a {size}-byte volume, larger than the "
                        f"{err.limit * BLOCK_SIZE} bytes --create makes from a dump; make "
                        "the image with 'snapvol create IMAGE --size SIZE' and restore into "
                        "it without --create") from None
    except StreamError as err:
        raise DumpError(f"{path} is not a usable dump: {err}") from None
    assert dec.header is not None
    top = next(i.entry for i in dec.table if i.role == ROLE_TOP)
    base = next((i.entry for i in dec.table if i.role == ROLE_BASE), None)
    if dec.header.resume_from:
        raise DumpError(f"{path} is the rest of an interrupted transfer, not a dump")
    return DumpFile(path, dec.header, top, base, dec.offset)


def check_chain(files: list[DumpFile], held: dict[bytes, str] | None,
                image: str) -> None:
    """Refuse dump files that do not form one chain, naming the file at fault.

    `held` maps the GUIDs of the snapshots the destination holds to their names, or is
    None for a new (empty) destination."""
    if not files:
        raise DumpError("no dump files given")
    brings: dict[bytes, int] = {}
    for i, f in enumerate(files):
        if f.top.guid in brings:
            raise DumpError(f"{f.path} and {files[brings[f.top.guid]].path} both bring "
                            f"snapshot {f.top.name!r}: give each dump once")
        brings[f.top.guid] = i
    first = files[0]
    if first.base is not None:
        needed = first.base
        later = brings.get(needed.guid)
        if later is not None:
            raise DumpError(f"{first.what} comes first, but {files[later].path} brings "
                            f"{needed.name!r}: put {files[later].path} before it")
        if held is None or needed.guid not in held:
            where = "a new image" if held is None else image
            raise DumpError(
                f"missing the dump of snapshot {needed.name!r} (GUID {guid_str(needed.guid)}):"
                f" {first.path} is an increment from it and {where} does not hold it; "
                "give the lower-level dump that brings it first")
    elif held:
        raise DumpError(f"{first.path} is a full dump: it restores into an empty volume "
                        f"({image} holds snapshots); use a new image with --create")
    for i in range(1, len(files)):
        f, prev = files[i], files[i - 1]
        if f.base is None:
            raise DumpError(f"{f.what} is in position {i + 1}: a full dump must come first")
        if f.base.guid == prev.top.guid:
            continue
        j = brings.get(f.base.guid)
        if j is not None and j > i:
            raise DumpError(f"{f.what} comes before {files[j].path}, which brings "
                            f"{f.base.name!r}: put {files[j].path} before it")
        if j is not None:
            raise DumpError(
                f"{f.what} follows {prev.what}: it applies to {f.base.name!r} (from "
                f"{files[j].path}), but {prev.path} moved on to {prev.top.name!r}; "
                f"leave out {prev.path} or {f.path}")
        raise DumpError(
            f"missing the dump of snapshot {f.base.name!r} (GUID {guid_str(f.base.guid)}) "
            f"between {prev.path} and {f.path}: {f.path} is an increment from it")


def restore(image: str, paths: list[str], create: bool,
            progress: Progress | None = None) -> list[ReceiveResult]:
    """Apply the dump files `paths`, in order, to `image` (made first with `create`).
    Everything is checked before the first block is written."""
    exists = os.path.lexists(image)
    if create and exists:
        raise DumpError(f"{image} already exists: restore into it without --create, or "
                        "name a new image")
    if not create and not exists:
        raise DumpError(f"{image} does not exist: add --create to make it")
    held: dict[bytes, str] | None = None
    if create:
        files = [inspect(p) for p in paths]
    else:
        with Volume.open(image, writable=False) as vol:
            held = {e.guid: e.name for e in vol.snapshots.regular()}
            limit = vol.nblocks
        files = [inspect(p, limit, image) for p in paths]
    check_chain(files, held, image)
    if create:
        Volume.create(image, files[0].header.nblocks * BLOCK_SIZE).close()
    results: list[ReceiveResult] = []
    try:
        for f in files:
            vol = open_for_receive(image)
            try:
                with open(f.path, "rb") as fh:
                    results.append(receive(vol, chunks_of(fh), progress))
            finally:
                vol.close()
    except BaseException:
        if create and not results:
            with contextlib.suppress(OSError):
                os.unlink(image)  # nothing was restored into the image just made
        raise
    return results
