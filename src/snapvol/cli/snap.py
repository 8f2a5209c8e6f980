"""`snapvol snap ...`: create, list, delete, rename and restore snapshots."""

from __future__ import annotations

import click

from snapvol.cli import complete
from snapvol.cli.listing import Field, Listing
from snapvol.cli.mount import mounted, remote
from snapvol.cli.output import print_json, show_time
from snapvol.cli.session import open_volume
from snapvol.cli.sizes import human_size
from snapvol.engine import snapshots
from snapvol.layout.constants import BLOCK_SIZE


@click.group()
def snap() -> None:
    """Snapshots: read-only images of the volume at one consistency point."""


@snap.command("create")
@click.argument("image", shell_complete=complete.image_path)
@click.argument("name")
@click.option("--shadow", is_flag=True,
              help="A shadow snapshot (bookmark): a block plane that holds no space and "
                   "can serve as the base of incremental sends, but cannot be read.")
@click.option("--from", "source", metavar="SNAP", shell_complete=complete.snapshot,
              help="With --shadow: shadow the existing snapshot SNAP (same GUID and CP), "
                   "so SNAP can be deleted and still serve as a base.")
def snap_create(image: str, name: str, shadow: bool, source: str | None) -> None:
    """Take snapshot NAME of the active file system."""
    if source is not None and not shadow:
        raise click.UsageError("--from needs --shadow: only a shadow snapshot is made "
                               "from another snapshot")
    if (live := mounted(image)) is not None:  # the mount process holds the volume
        done = remote(live, "snap_create", name=name, shadow=shadow, source=source)
        kind = "shadow snapshot" if shadow else "snapshot"
        click.echo(f"created {kind} {name} at CP {done['cp_count']}")
        return
    with open_volume(image, writable=True) as vol:
        entry = snapshots.create(vol, name, shadow=shadow, source=source)
    kind = "shadow snapshot" if shadow else "snapshot"
    click.echo(f"created {kind} {name} at CP {entry.cp_count}")


@snap.command("delete")
@click.argument("image", shell_complete=complete.image_path)
@click.argument("name", shell_complete=complete.snapshot)
def snap_delete(image: str, name: str) -> None:
    """Delete snapshot NAME, freeing the blocks only it held."""
    if (live := mounted(image)) is not None:
        done = remote(live, "snap_delete", name=name)
        freed_bytes = done["freed_blocks"] * BLOCK_SIZE
        click.echo(f"deleted snapshot {name}: {human_size(freed_bytes)} freed")
        return
    with open_volume(image, writable=True) as vol:
        freed = snapshots.delete(vol, name)
    click.echo(f"deleted snapshot {name}: {human_size(freed * BLOCK_SIZE)} freed")


@snap.command("rename")
@click.argument("image", shell_complete=complete.image_path)
@click.argument("old", shell_complete=complete.snapshot)
@click.argument("new")
def snap_rename(image: str, old: str, new: str) -> None:
    """Rename snapshot OLD to NEW."""
    if (live := mounted(image)) is not None:
        remote(live, "snap_rename", old=old, new=new)
    else:
        with open_volume(image, writable=True) as vol:
            snapshots.rename(vol, old, new)
    click.echo(f"renamed snapshot {old} to {new}")


@snap.command("restore")
@click.argument("image", shell_complete=complete.image_path)
@click.argument("name", shell_complete=complete.snapshot)
def snap_restore(image: str, name: str) -> None:
    """Roll the active file system back to snapshot NAME (all snapshots are kept)."""
    with open_volume(image, writable=True) as vol:
        snapshots.restore(vol, name)
    click.echo(f"restored the active file system to snapshot {name}")


def _kind(i: snapshots.SnapshotInfo) -> str:
    return "shadow" if i.shadow else "replica" if i.replica else "snapshot"


def _reclaimable(i: snapshots.SnapshotInfo) -> int:
    return i.reclaimable_blocks * BLOCK_SIZE


SNAPSHOTS: Listing[snapshots.SnapshotInfo] = Listing([
    Field("name", lambda i: i.name),
    Field("created", lambda i: show_time(i.created_ns), lambda i: str(i.created_ns)),
    Field("reclaimable", lambda i: human_size(_reclaimable(i)),
          lambda i: str(_reclaimable(i)), right=True),
    Field("kind", _kind),
    Field("origin", lambda i: "received" if i.received else "here"),
    Field("guid", lambda i: i.guid),
    Field("id", lambda i: str(i.snap_id), right=True),
    Field("cp", lambda i: str(i.cp_count), right=True),
    Field("replica_for", lambda i: i.replica_for or "-"),
], default=("created", "reclaimable", "name"),
   verbose=("created", "reclaimable", "kind", "origin", "guid", "id", "cp", "replica_for",
            "name"))
"""The name comes last, as in `ls -l`: a long one lengthens its own line only, so the
other rows of a listing stay within an 80-column terminal."""


@snap.command("list")
@click.argument("image", shell_complete=complete.image_path)
@SNAPSHOTS.options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (space in bytes).")
def snap_list(image: str, scripted: bool, fields: tuple[str, ...] | None, verbose: bool,
              as_json: bool) -> None:
    """List snapshots, oldest first: creation time (UTC), the space deleting each would
    free, and name; -v adds the kind, where each came from ("here": taken on IMAGE;
    "received": brought by a receive), the GUID, the id, the CP and, for a replication
    snapshot, the UUID of the volume it serves."""
    if (live := mounted(image)) is not None:
        infos = [snapshots.SnapshotInfo(**row) for row in remote(live, "snap_list")]
    else:
        with open_volume(image, writable=False) as vol:
            infos = snapshots.infos(vol)
    if as_json:
        print_json([{"name": i.name, "guid": i.guid, "snap_id": i.snap_id,
                     "cp_count": i.cp_count, "created_ns": i.created_ns,
                     "shadow": i.shadow, "replica": i.replica, "received": i.received,
                     "replica_for": i.replica_for,
                     "reclaimable": _reclaimable(i)} for i in infos])
        return
    if not infos and not scripted:
        click.echo("no snapshots")
        return
    SNAPSHOTS.echo(infos, fields=fields, verbose=verbose, scripted=scripted)
