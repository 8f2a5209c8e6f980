"""`snapvol dump` and `snapvol restore`: levelled dumps to files, and their restore.

    snapvol dump vol.img June3 --level 0 -o june3.l0
    snapvol dump vol.img June5 --level 1 -o june5.l1
    snapvol dump --list vol.img
    snapvol restore new.img june3.l0 june5.l1 --create
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import click

from snapvol.cli import complete
from snapvol.cli.listing import Field, Listing
from snapvol.cli.output import print_json, show_time, stream_output
from snapvol.cli.progress import byte_progress
from snapvol.cli.session import open_volume
from snapvol.cli.sizes import human_size
from snapvol.engine import dumps
from snapvol.image.dump import base_of, dump, guid_str, restore
from snapvol.layout.dumps import DumpRecord


@dataclass(frozen=True, slots=True)
class _Row:
    rec: DumpRecord
    base: str  # the base dump's snapshot name (its GUID if that name is unknown), or "-"


DUMPS: Listing[_Row] = Listing([
    Field("level", lambda r: str(r.rec.level), right=True),
    Field("snapshot", lambda r: r.rec.snap_name),
    Field("base", lambda r: r.base),
    Field("time", lambda r: show_time(r.rec.time_ns), lambda r: str(r.rec.time_ns)),
    Field("size", lambda r: human_size(r.rec.nbytes), lambda r: str(r.rec.nbytes),
          right=True),
    Field("guid", lambda r: guid_str(r.rec.snap_guid)),
    Field("cp", lambda r: str(r.rec.snap_cp), right=True),
], default=("level", "snapshot", "base", "time", "size"))


@click.command("dump")
@click.argument("image", shell_complete=complete.image_path)
@click.argument("snap", required=False, shell_complete=complete.snapshot)
@click.option("--level", type=click.IntRange(0, 9), help="Dump level, 0 (full) to 9.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the dump to this new file (never replaced), or to a device or "
                   "FIFO (default stdout, when not a terminal).")
@click.option("--list", "list_", is_flag=True, help="List the dumps recorded in IMAGE.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@DUMPS.plain_options
def dump_cmd(image: str, snap: str | None, level: int | None, output: str | None,
             list_: bool, as_json: bool, scripted: bool, verbose: bool) -> None:
    """Write a level-N dump of snapshot SNAP of IMAGE, and record it in IMAGE.

    Level 0 is full; level N holds the changes since the newest dump of a lower level.
    With --list, show the recorded dumps instead.
    """
    if list_:
        if snap is not None or level is not None or output is not None:
            raise click.UsageError("--list takes only IMAGE (and --json, -H or -v)")
        _list(image, as_json, {"scripted": scripted, "verbose": verbose})
        return
    if snap is None or level is None:
        raise click.UsageError("give SNAP and --level N (or --list)")
    if scripted or verbose:
        raise click.UsageError("-H and -v shape the listing: use them with --list")
    if output is None and sys.stdout.isatty():
        raise click.UsageError("not writing a binary dump to a terminal: give -o FILE")
    with open_volume(image, writable=True) as vol:
        base = base_of(vol, level)
        with stream_output(output) as out, byte_progress("dumping") as progress:
            rec = dump(vol, snap, level, out, progress, record=False)
        # Recorded once the file has its name: a dump that never got there is no base.
        dumps.record(vol, rec)
    facts = {"image": image, "snapshot": rec.snap_name, "guid": guid_str(rec.snap_guid),
             "level": rec.level, "base": base.snap_name if base else None,
             "bytes": rec.nbytes, "output": output}
    if as_json:
        print_json(facts)
        return
    what = f"increment from {base.snap_name} (level {base.level})" if base else "full"
    click.echo(f"level {level} dump of {rec.snap_name} ({what}): {human_size(rec.nbytes)}"
               + (f" to {output}" if output else ""), err=output is None)


def _list(image: str, as_json: bool, how: dict[str, Any]) -> None:
    with open_volume(image, writable=False) as vol:
        recs = dumps.catalog(vol.active)
    names = {r.snap_guid: r.snap_name for r in recs}
    if as_json:
        print_json([{"level": r.level, "snapshot": r.snap_name, "guid": guid_str(r.snap_guid),
                     "cp_count": r.snap_cp, "time_ns": r.time_ns, "bytes": r.nbytes,
                     "base_guid": guid_str(r.base_guid) if any(r.base_guid) else None,
                     "base": names.get(r.base_guid)} for r in recs])
        return
    if not recs and not how["scripted"]:
        click.echo("no dumps")
        return
    DUMPS.echo([_Row(r, names.get(r.base_guid, guid_str(r.base_guid))
                     if any(r.base_guid) else "-") for r in recs], **how)


@click.command("restore")
@click.argument("image", shell_complete=complete.image_path)
@click.argument("files", nargs=-1, required=True, shell_complete=complete.image_path)
@click.option("--create", is_flag=True, help="Make IMAGE, the size of the dumped volume.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restore_cmd(image: str, files: tuple[str, ...], create: bool, as_json: bool) -> None:
    """Apply dump FILES to IMAGE in the order given: a level-0 dump, then each increment
    from the snapshot the previous one brought. The chain is checked before anything is
    written; a missing or misplaced file is named."""
    with byte_progress("restoring") as progress:
        results = restore(image, list(files), create, progress)
    last = results[-1]
    if as_json:
        print_json({"image": image, "snapshot": last.snapshot, "guid": last.guid,
                    "applied": [{"file": f, "snapshot": r.snapshot, "base": r.base,
                                 "blocks": r.blocks, "bytes": r.nbytes}
                                for f, r in zip(files, results, strict=True)]})
        return
    for f, r in zip(files, results, strict=True):
        what = f"increment from {r.base}" if r.base else "full"
        click.echo(f"applied {f}: snapshot {r.snapshot} ({what}, {r.blocks} blocks)")
    click.echo(f"{image} now holds snapshot {last.snapshot}")
