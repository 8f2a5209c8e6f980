"""`snapvol verify SRC[@SNAP] DST[@SNAP] [--deep]`: do two volumes hold the same snapshot?

Exit 0 when they do, 1 when they differ (with a summary of what differs) or, with
--deep, when a block on either side does not hold what its tree records; 2 on errors.
The comparison follows the checksum tree (engine/compare.py), so replicas that match
cost a root comparison, however much data they hold: it compares trees, not media.
--deep then reads every block of both sides and checks its digest against its pointer's.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass

import click

from snapvol.cli import complete
from snapvol.cli.output import print_json
from snapvol.cli.session import open_volume
from snapvol.engine.compare import Comparison, MediaCheck, check_media, compare, users
from snapvol.engine.inodefile import InodeFile
from snapvol.engine.snaptable import SnapshotError
from snapvol.engine.volume import Volume
from snapvol.layout.records import TreeRoot
from snapvol.layout.snaptable import SnapEntry

EXIT_DIFFERENT = 1


def split_spec(spec: str) -> tuple[str, str | None]:
    """IMAGE or IMAGE@SNAP. An existing path is an image even if it contains '@'."""
    if os.path.exists(spec) or "@" not in spec:
        return spec, None
    image, _, snap = spec.rpartition("@")
    if not snap:
        raise click.UsageError(f"{spec!r}: nothing after '@' (write IMAGE@SNAPSHOT)")
    return image, snap


def _entry(vol: Volume, image: str, name: str) -> SnapEntry:
    entry = vol.snapshots.get(name)
    if entry.shadow:
        raise SnapshotError(f"{image}@{name} is a shadow snapshot: it has no tree to "
                            "compare; name a regular snapshot")
    return entry


def _counterpart(vol: Volume, image: str, other: SnapEntry) -> SnapEntry:
    """The snapshot of `vol` that is `other`: the same GUID, else the same name."""
    for e in vol.snapshots.regular():
        if e.guid == other.guid:
            return e
    found = vol.snapshots.find(other.name)
    if found is not None and not found[1].shadow:
        return found[1]
    raise SnapshotError(f"{image} holds no snapshot with GUID "
                        f"{uuidlib.UUID(bytes=other.guid)} or name {other.name!r}; "
                        f"name one with {image}@SNAPSHOT")


def _image(vol: Volume, entry: SnapEntry | None) -> InodeFile:
    if entry is None:
        return InodeFile(vol.io, vol.root.inode_file)
    return vol.snapshot_image(entry.name)


def _side(image: str, vol: Volume, entry: SnapEntry | None) -> dict[str, object]:
    return {"image": image, "snapshot": entry.name if entry else None,
            "guid": str(uuidlib.UUID(bytes=entry.guid)) if entry else None,
            "cp_count": entry.cp_count if entry else vol.root.cp_count}


def _trees(vol: Volume, entry: SnapEntry | None) -> tuple[TreeRoot, ...]:
    """The four trees of a side: its snapshot's, or the active image's CP root."""
    if entry is not None:
        return entry.trees
    r = vol.root
    return (r.inode_file, r.active_plane, r.summary_plane, r.snap_table)


@dataclass
class _Media:
    """`--deep` on one side: the check, and what uses each damaged block."""

    check: MediaCheck
    users: dict[int, list[str]]


def _media(vol: Volume, entry: SnapEntry | None) -> _Media:
    trees = _trees(vol, entry)
    found = check_media(vol.io, vol.nblocks, trees)
    named = users(vol.io, vol.nblocks, trees, [v for v, _ in found.damaged]) if (
        found.damaged) else {}
    return _Media(found, named)


@click.command()
@click.argument("src", shell_complete=complete.image_at_snapshot)
@click.argument("dst", shell_complete=complete.image_at_snapshot)
@click.option("--deep", is_flag=True,
              help="Also read every block of both sides and check its digest against the "
                   "one its tree records (slow: all the data is read).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(src: str, dst: str, deep: bool, as_json: bool) -> None:
    """Tell whether SRC[@SNAP] and DST[@SNAP] hold the same file system.

    Without @SNAP a side is its active file system; when only one side names a
    snapshot, the other side's snapshot with the same GUID (else the same name) is used.
    Without --deep this compares trees, not media: every pointer records the digest of
    the block it names, so equal roots mean equal trees, but a block that rotted on disk
    is not read. --deep reads every block of both sides and checks it.
    Exit 0 when they are the same, 1 when they differ or a block is damaged, 2 on errors.
    """
    src_image, src_snap = split_spec(src)
    dst_image, dst_snap = split_spec(dst)
    with open_volume(src_image, writable=False) as a, \
            open_volume(dst_image, writable=False) as b:
        ea = _entry(a, src_image, src_snap) if src_snap else None
        eb = _entry(b, dst_image, dst_snap) if dst_snap else None
        if ea is not None and eb is None:
            eb = _counterpart(b, dst_image, ea)
        elif eb is not None and ea is None:
            ea = _counterpart(a, src_image, eb)
        result = compare(_image(a, ea), _image(b, eb))
        sides = (_side(src_image, a, ea), _side(dst_image, b, eb))
        media = (_media(a, ea), _media(b, eb)) if deep else None
    _report(result, sides, media, as_json)
    damaged = media is not None and any(m.check.damaged_count for m in media)
    if not result.same or damaged:
        raise click.exceptions.Exit(EXIT_DIFFERENT)


def _label(side: dict[str, object]) -> str:
    snap = side["snapshot"]
    return f"{side['image']}@{snap}" if snap else f"{side['image']} (active)"


def _media_json(m: _Media) -> dict[str, object]:
    return {"blocks_checked": m.check.blocks, "damaged_blocks": m.check.damaged_count,
            "damaged": [{"vbn": v, "error": what, "used_by": m.users.get(v, [])}
                        for v, what in m.check.damaged],
            "seconds": round(m.check.seconds, 6)}


def _report(result: Comparison, sides: tuple[dict[str, object], dict[str, object]],
            media: tuple[_Media, _Media] | None, as_json: bool) -> None:
    src, dst = sides
    damaged = media is not None and any(m.check.damaged_count for m in media)
    if as_json:
        out: dict[str, object] = {
            "same": result.same and not damaged, "trees_same": result.same,
            "deep": media is not None, "source": src, "destination": dst,
            "inodes_differing": result.inodes_differing,
            "differences": [{"ino": d.ino, "path": d.path, "change": d.change,
                             "what": list(d.what)} for d in result.differences],
            "pointers_compared": result.pointers_compared,
            "blocks_read": result.blocks_read, "seconds": round(result.seconds, 6),
        }
        if media is not None:
            out["media"] = {"source": _media_json(media[0]),
                            "destination": _media_json(media[1])}
        print_json(out)
        return
    if media is not None:
        for side, m in zip(sides, media, strict=True):
            for vbn, what in m.check.damaged:
                used = m.users.get(vbn, [])
                where = f" (used by {', '.join(used)})" if used else ""
                click.echo(f"damaged: {_label(side)}: {what}{where}")
            more = m.check.damaged_count - len(m.check.damaged)
            if more > 0:
                click.echo(f"  ... and {more} more damaged block(s) on {_label(side)}")
    if result.same and not damaged:
        note = ""
        if src["guid"] and dst["guid"] and src["guid"] != dst["guid"]:
            note = " (different snapshot GUIDs, same content)"
        compared = (f"{result.pointers_compared} pointer"
                    f"{'' if result.pointers_compared == 1 else 's'} compared")
        if media is None:
            how = (f"trees compared, not media: {compared}, {result.seconds:.3f} s; "
                   "--deep reads and checks every block")
        else:
            read = media[0].check.blocks + media[1].check.blocks
            secs = result.seconds + media[0].check.seconds + media[1].check.seconds
            how = (f"trees and media checked: {compared}, every block read and its digest "
                   f"checked ({read} blocks), {secs:.3f} s")
        click.echo(f"same: {_label(src)} and {_label(dst)} hold the same file system{note} "
                   f"({how})")
        return
    if result.same:
        count = sum(m.check.damaged_count for m in media) if media else 0
        click.echo(f"different: {_label(src)} and {_label(dst)}: their trees are the same, "
                   f"but {count} block(s) on the media do not hold what the trees record")
        return
    click.echo(f"different: {_label(src)} and {_label(dst)}: "
               f"{result.inodes_differing} inode(s) differ")
    for d in result.differences:
        where = d.path if d.path is not None else f"inode {d.ino}"
        detail = f" ({', '.join(d.what)})" if d.what else ""
        click.echo(f"  {d.change}: {where}{detail}")
    if result.inodes_differing > len(result.differences):
        click.echo(f"  ... and {result.inodes_differing - len(result.differences)} more")
