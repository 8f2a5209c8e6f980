"""`snapvol verify SRC[@SNAP] DST[@SNAP]`: do two volumes hold the same snapshot?

Exit 0 when they do, 1 when they differ (with a summary of what differs), 2 on errors.
The comparison follows the checksum tree (engine/compare.py), so replicas that match
cost a root comparison, however much data they hold.
"""

from __future__ import annotations

import os
import uuid as uuidlib

import click

from snapvol.cli.output import print_json
from snapvol.cli.session import open_volume
from snapvol.engine.compare import Comparison, compare
from snapvol.engine.image import Image
from snapvol.engine.snapshots import SnapshotError
from snapvol.engine.volume import Volume
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


def _image(vol: Volume, entry: SnapEntry | None) -> Image:
    if entry is None:
        return Image(vol.io, vol.root.inode_file)
    return vol.snapshot_image(entry.name)


def _side(image: str, vol: Volume, entry: SnapEntry | None) -> dict[str, object]:
    return {"image": image, "snapshot": entry.name if entry else None,
            "guid": str(uuidlib.UUID(bytes=entry.guid)) if entry else None,
            "cp_count": entry.cp_count if entry else vol.root.cp_count}


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(src: str, dst: str, as_json: bool) -> None:
    """Tell whether SRC[@SNAP] and DST[@SNAP] hold the same file system.

    Without @SNAP a side is its active file system; when only one side names a
    snapshot, the other side's snapshot with the same GUID (else the same name) is used.
    Exit 0 when they are the same, 1 when they differ, 2 on errors.
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
    _report(result, sides, as_json)
    if not result.same:
        raise click.exceptions.Exit(EXIT_DIFFERENT)


def _label(side: dict[str, object]) -> str:
    snap = side["snapshot"]
    return f"{side['image']}@{snap}" if snap else f"{side['image']} (active)"


def _report(result: Comparison, sides: tuple[dict[str, object], dict[str, object]],
            as_json: bool) -> None:
    src, dst = sides
    if as_json:
        print_json({
            "same": result.same, "source": src, "destination": dst,
            "inodes_differing": result.inodes_differing,
            "differences": [{"ino": d.ino, "path": d.path, "change": d.change,
                             "what": list(d.what)} for d in result.differences],
            "pointers_compared": result.pointers_compared,
            "blocks_read": result.blocks_read, "seconds": round(result.seconds, 6),
        })
        return
    if result.same:
        note = ""
        if src["guid"] and dst["guid"] and src["guid"] != dst["guid"]:
            note = " (different snapshot GUIDs, same content)"
        click.echo(f"same: {_label(src)} and {_label(dst)} hold the same file system{note} "
                   f"({result.pointers_compared} pointer"
                   f"{'' if result.pointers_compared == 1 else 's'} compared, "
                   f"{result.seconds:.3f} s)")
        return
    click.echo(f"different: {_label(src)} and {_label(dst)}: "
               f"{result.inodes_differing} inode(s) differ")
    for d in result.differences:
        where = d.path if d.path is not None else f"inode {d.ino}"
        detail = f" ({', '.join(d.what)})" if d.what else ""
        click.echo(f"  {d.change}: {where}{detail}")
    if result.inodes_differing > len(result.differences):
        click.echo(f"  ... and {result.inodes_differing - len(result.differences)} more")
