"""`snapvol replicate SRC DST`: bring a mirror up to a new snapshot of its source."""

from __future__ import annotations

import click

from snapvol.cli import complete
from snapvol.cli.output import print_json
from snapvol.cli.progress import byte_progress
from snapvol.cli.sizes import human_size
from snapvol.cli.transfer import refresh_mount
from snapvol.image.replicate import replicate


@click.command("replicate")
@click.argument("src", shell_complete=complete.image_path)
@click.argument("dst", shell_complete=complete.image_path)
@click.option("--create", is_flag=True, help="Make DST (the size of SRC) if it does not exist.")
@click.option("--drop-local", is_flag=True,
              help="Drop snapshots taken on DST itself that SRC does not hold (without "
                   "this the run refuses, naming them, since their data may exist nowhere "
                   "else).")
@click.option("--json", "as_json", is_flag=True, help="Print what moved as JSON.")
def replicate_cmd(src: str, dst: str, create: bool, drop_local: bool, as_json: bool) -> None:
    """Take a snapshot of SRC and bring DST to it: the increment from the newest snapshot
    both hold (a full copy when there is none), finishing an interrupted run first.
    Both keep the snapshot the next run starts from; older ones this command made for DST
    are retired (those made for other destinations, and user snapshots, never are).
    DST drops the snapshots it received that SRC no longer holds; each is named."""
    try:
        with byte_progress("replicating") as progress:
            r = replicate(src, dst, create, progress, drop_local)
    finally:
        refresh_mount(dst)  # a read-only mount of DST shows the new state at once
    if as_json:
        print_json({"source": src, "destination": dst, "snapshot": r.snapshot,
                    "base": r.base, "blocks": r.blocks, "bytes": r.nbytes,
                    "resumed": r.resumed, "discarded": r.discarded, "retired": r.retired,
                    "dropped": r.dropped, "seconds": round(r.seconds, 3)})
        return
    if r.discarded:
        click.echo(f"discarded the partial receive of {r.discarded}: {src} no longer holds it")
    if r.resumed:
        click.echo(f"finished the interrupted transfer of {r.resumed}")
    what = f"increment from {r.base}" if r.base else "full copy"
    click.echo(f"replicated {src} to {dst} at snapshot {r.snapshot} ({what}): {r.blocks} "
               f"blocks, {human_size(r.nbytes)} in {r.seconds:.2f}s")
    for name in r.retired:
        click.echo(f"retired replication snapshot {name}")
    for name in r.dropped:
        click.echo(f"dropped snapshot {name} from {dst}: {src} does not hold it")
