"""The `snapvol` entry point, the whole-volume commands, and the one error policy.

Every failure a user can cause (a usage mistake, a missing or damaged image, a locked
volume, a bad snapshot name, a full volume, a host file that cannot be read) prints one
line, `snapvol: error: <message>`, on stderr and exits with code 2; `fsck` exits with 1
when it finds problems. No traceback reaches the user; SNAPVOL_DEBUG=1 shows it for
errors that are bugs rather than user mistakes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from snapvol.cli import complete
from snapvol.cli.dump import dump_cmd, restore_cmd
from snapvol.cli.files import cat, get, ls, put, rm
from snapvol.cli.listing import align
from snapvol.cli.mount import mount, mounted, mounts, remote, unmount
from snapvol.cli.output import print_json, show_time
from snapvol.cli.progress import check_progress
from snapvol.cli.replicate import replicate_cmd
from snapvol.cli.session import open_volume
from snapvol.cli.sizes import human_size, size_option
from snapvol.cli.snap import snap
from snapvol.cli.transfer import receive_cmd, receive_facts, send
from snapvol.cli.verify import verify
from snapvol.control.ops import fsck_result, volume_facts
from snapvol.engine.fsck import ONLINE_SHARE, check
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.layout.constants import BLOCK_SIZE
from snapvol.runtime import tune_gc, tune_malloc

EXIT_PROBLEMS = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="snapvol")
def cli() -> None:
    """Copy-on-write volumes with snapshots, in an image file."""


@cli.command()
@click.argument("image", shell_complete=complete.image_path)
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
@click.argument("image", shell_complete=complete.image_path)
@click.option("-H", "scripted", is_flag=True,
              help="For scripts: one 'field<TAB>value' line each, exact numbers (bytes, "
                   "nanoseconds since the epoch).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sizes in bytes).")
def info(image: str, scripted: bool, as_json: bool) -> None:
    """Show a volume's identity and space (through its mount process if it is mounted)."""
    if (live := mounted(image)) is not None:
        facts: dict[str, Any] = remote(live, "info")
    else:
        with open_volume(image, writable=False) as vol:
            facts = volume_facts(vol, image)
            facts.update(receive_facts(vol))
    if as_json:
        print_json(facts)
        return
    size = {"human": human_size, "exact": str}
    when = {"human": show_time, "exact": str}
    rows: list[tuple[str, str, Any, dict[str, Any] | None]] = [
        ("image", "image", image, None),
        ("format version", "format_version", facts["format_version"], None),
        ("uuid", "uuid", facts["uuid"], None),
        ("created", "created", facts["created_ns"], when),
        ("size", "size", facts["size"], size),
        ("used", "used", facts["used"], size),
        ("free", "free", facts["free"], size),
        ("held only by snapshots", "snapshot_only", facts["snapshot_only"], size),
        ("consistency points", "cp_count", facts["cp_count"], None),
        ("last CP", "last_cp", facts["last_cp_ns"], when),
        ("snapshots", "snapshots", facts["snapshots"], None),
    ]
    if facts.get("root_warning"):
        rows.append(("root record", "root_warning", facts["root_warning"], None))
    if facts.get("resume_token"):
        rows.append(("partial receive", "receiving", facts["receiving"], None))
        rows.append(("resume token", "resume_token", facts["resume_token"], None))
    form = "exact" if scripted else "human"
    shown = [(key if scripted else label, str(value) if how is None else how[form](value))
             for label, key, value, how in rows]
    if scripted:
        for key, value in shown:
            click.echo(f"{key}\t{value}")
    else:
        for line in align([[label, value] for label, value in shown], [False, False]):
            click.echo(line)


@cli.command()
@click.argument("image", shell_complete=complete.image_path)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--online", is_flag=True,
              help="If IMAGE is mounted, have its mount process check it (after a CP), "
                   "while the mount goes on serving requests.")
@click.option("--share", type=click.FloatRange(0, 1, min_open=True), default=ONLINE_SHARE,
              show_default=True,
              help="With --online: the share of the time the check may work; it sleeps "
                   "the rest, so the mount's requests find the disk free.")
def fsck(image: str, as_json: bool, online: bool, share: float) -> None:
    """Check a volume (read-only): exit 0 when clean, 1 with the problems otherwise.

    Every problem found is listed, however damaged the volume; a damaged root slot is
    one (saying which consistency point was opened instead)."""
    live = mounted(image)
    if live is not None and not online:
        held = (f"mounted on {live.mountpoint}" if live.mountpoint
                else f"owned by process {live.pid}")
        raise SnapvolError(f"{image} is {held}: check it there with "
                           f"`snapvol fsck --online {image}`, or "
                           f"{'unmount' if live.mountpoint else 'stop'} it first")
    if live is not None:
        result: dict[str, Any] = remote(live, "fsck", share=share)
    else:
        with open_volume(image, writable=False, for_check=True) as vol, \
                check_progress() as progress:
            result = fsck_result(check(vol, progress))
    clean, problems, stats = result["clean"], result["problems"], result["stats"]
    if as_json:
        print_json({"image": image, "clean": clean, "problems": problems, "stats": stats})
    else:
        for problem in problems:
            click.echo(f"problem: {problem}")
        counted = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in stats.items())
        verdict = "clean" if clean else f"{len(problems)} problem(s)"
        click.echo(f"{image}: {verdict}" + (f" ({counted})" if counted else ""))
    if not clean:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


cli.add_command(snap)
cli.add_command(send)
cli.add_command(receive_cmd)
cli.add_command(verify)
cli.add_command(dump_cmd)
cli.add_command(restore_cmd)
cli.add_command(replicate_cmd)
for command in (mount, unmount, mounts):
    cli.add_command(command)
for command in (put, get, ls, cat, rm):
    cli.add_command(command)


def _fail(message: str) -> None:
    click.echo(f"snapvol: error: {' '.join(message.splitlines())}", err=True)


class _Warnings(logging.Handler):
    """Where warnings of the engine (a damaged root slot on open) go in a command that
    set up no logging of its own: one line each on stderr, `snapvol: warning: ...`.
    Installed as logging's last resort, so a mount's own log configuration wins."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        message = " ".join(record.getMessage().splitlines())
        click.echo(f"snapvol: warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; exit 0, 1 (fsck found problems) or 2 (an error)."""
    tune_gc()
    tune_malloc()
    logging.lastResort = _Warnings()
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
