"""The `snapvol` entry point, the whole-volume commands, and the one error policy.

Every failure a user can cause (a usage mistake, a missing or damaged image, a locked
volume, a bad snapshot name, a full volume, a host file that cannot be read) prints one
line, `snapvol: error: <message>`, on stderr and exits with code 2; `fsck` exits with 1
when it finds problems. No traceback reaches the user; SNAPVOL_DEBUG=1 shows it for
errors that are bugs rather than user mistakes.
"""

from __future__ import annotations

import os
import sys

import click
from rich.table import Table

from snapvol.cli.files import cat, get, ls, put, rm
from snapvol.cli.output import console, print_json, show_time
from snapvol.cli.progress import check_progress
from snapvol.cli.session import open_volume
from snapvol.cli.sizes import human_size, size_option
from snapvol.cli.snap import snap
from snapvol.engine.fsck import check
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.layout.constants import BLOCK_SIZE

EXIT_PROBLEMS = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="snapvol")
def cli() -> None:
    """Copy-on-write volumes with snapshots, in an image file."""


@cli.command()
@click.argument("image")
@click.option("--size", required=True, callback=size_option,
              help="Volume size: bytes, or a number with K, M, G, T or P (binary units).")
def create(image: str, size: int) -> None:
    """Create a new volume in the image file IMAGE (which must not exist yet)."""
    vol = Volume.create(image, size)
    try:
        nbytes, uuid = vol.nblocks * BLOCK_SIZE, vol.sb.uuid_str
    finally:
        vol.close()
    click.echo(f"created {image}: {human_size(nbytes)} ({nbytes} bytes), uuid {uuid}")


@cli.command()
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sizes in bytes).")
def info(image: str, as_json: bool) -> None:
    """Show a volume's identity and space."""
    with open_volume(image, writable=False) as vol:
        usage = vol.usage()
        facts: dict[str, object] = {
            "image": image,
            "format_version": vol.sb.version,
            "uuid": vol.sb.uuid_str,
            "block_size": BLOCK_SIZE,
            "size": usage["total"] * BLOCK_SIZE,
            "used": usage["used"] * BLOCK_SIZE,
            "free": usage["free"] * BLOCK_SIZE,
            "snapshot_only": usage["snapshot_only"] * BLOCK_SIZE,
            "cp_count": vol.root.cp_count,
            "last_cp_ns": vol.root.time_ns,
            "created_ns": vol.sb.created_ns,
            "snapshots": len(vol.snapshots),
        }
    if as_json:
        print_json(facts)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("image", image),
        ("format version", str(facts["format_version"])),
        ("uuid", str(facts["uuid"])),
        ("created", show_time(vol.sb.created_ns)),
        ("size", human_size(usage["total"] * BLOCK_SIZE)),
        ("used", human_size(usage["used"] * BLOCK_SIZE)),
        ("free", human_size(usage["free"] * BLOCK_SIZE)),
        ("held only by snapshots", human_size(usage["snapshot_only"] * BLOCK_SIZE)),
        ("consistency points", str(vol.root.cp_count)),
        ("last CP", show_time(vol.root.time_ns)),
        ("snapshots", str(facts["snapshots"])),
    ]
    for row in rows:
        table.add_row(*row)
    console().print(table)


@cli.command()
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fsck(image: str, as_json: bool) -> None:
    """Check a volume (read-only): exit 0 when clean, 1 with the problems otherwise."""
    with open_volume(image, writable=False) as vol, check_progress() as progress:
        report = check(vol, progress)
    stats = dict(report.stats)
    if as_json:
        print_json({"image": image, "clean": report.clean, "problems": report.problems,
                    "stats": stats})
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        counted = ", ".join(f"{value} {key}" for key, value in stats.items())
        verdict = "clean" if report.clean else f"{len(report.problems)} problem(s)"
        click.echo(f"{image}: {verdict}" + (f" ({counted})" if counted else ""))
    if not report.clean:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


cli.add_command(snap)
for command in (put, get, ls, cat, rm):
    cli.add_command(command)


def _fail(message: str) -> None:
    click.echo(f"snapvol: error: {' '.join(message.splitlines())}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; exit 0, 1 (fsck found problems) or 2 (an error)."""
    try:
        code = cli.main(args=argv, prog_name="snapvol", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.ctx.get_help() if err.ctx is not None else str(err))
        sys.exit(0)
    except click.ClickException as err:
        _fail(err.format_message())
        sys.exit(EXIT_ERROR)
    except SnapvolError as err:
        _fail(str(err))
        sys.exit(EXIT_ERROR)
    except BrokenPipeError:
        # The reader went away (`snapvol cat ... | head`): stop quietly, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_ERROR)
    except OSError as err:
        where = f"{os.fsdecode(err.filename)}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}")
        sys.exit(EXIT_ERROR)
    except Exception as err:
        if os.environ.get("SNAPVOL_DEBUG"):
            raise
        _fail(f"internal error: {type(err).__name__}: {err} (SNAPVOL_DEBUG=1 shows where)")
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
