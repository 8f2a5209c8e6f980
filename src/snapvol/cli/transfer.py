"""`snapvol send` and `snapvol receive`: image streams between volumes, files and pipes.

    snapvol send SRC.img snap2 --base snap1 | snapvol receive DST.img

Progress (bytes, rate, time left) is drawn on stderr only when both ends are terminals,
so a pipe or a script sees nothing but the stream and the one-line summary.

A send of an image mounted read-write (or held by another owner) asks its owner for the
stream, which comes through the control socket (`send_plan`, `send`); the stream is the
one a send of the unmounted image would write.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from snapvol.cli import complete
from snapvol.cli.output import print_json, stream_output
from snapvol.cli.progress import byte_progress
from snapvol.cli.session import open_volume
from snapvol.cli.sizes import human_size
from snapvol.control import protocol as control
from snapvol.control import registry
from snapvol.control.registry import MountEntry
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.image import (
    ReceiveResult,
    abort,
    open_for_receive,
    plan,
    receive,
    resume_token,
)
from snapvol.image.pipes import widen_pipe
from snapvol.image.receiver import (
    CREATE_MAX_BLOCKS,
    Source,
    pending_snapshot,
    read_header_from,
)
from snapvol.image.sender import write_plan
from snapvol.layout.constants import BLOCK_SIZE
from snapvol.streams.imagestream import StreamTooLarge


def receive_facts(vol: Volume) -> dict[str, Any]:
    """The partial-receive fields of `snapvol info`: the token `send --resume` takes."""
    return {"resume_token": resume_token(vol), "receiving": pending_snapshot(vol)}


@click.command()
@click.argument("image", shell_complete=complete.image_path)
@click.argument("snap", shell_complete=complete.snapshot)
@click.option("--base", shell_complete=complete.snapshot,
              help="Send only the changes since this older snapshot.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="Write the stream to this new file (never replaced: it appears only "
                   "when complete), or to a device or FIFO, instead of stdout.")
@click.option("--dry-run", is_flag=True, help="Print the exact size; send nothing.")
@click.option("--resume", "token", help="Send only what an interrupted receive lacks "
              "(the token 'snapvol info DEST --json' shows).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON.")
def send(image: str, snap: str, base: str | None, output: str | None, dry_run: bool,
         token: str | None, as_json: bool) -> None:
    """Write an image stream of snapshot SNAP of IMAGE (to stdout or -o FILE)."""
    if output is None and not dry_run and sys.stdout.isatty():
        raise click.UsageError("not writing a binary stream to a terminal: pipe it into "
                               "'snapvol receive' or give -o FILE")
    live = registry.find_image(image)
    if live is not None and not live.read_only:  # its owner holds it: ask the owner
        _send_through(live, image, snap, base, token, output, dry_run, as_json)
        return
    with open_volume(image, writable=False) as vol:
        p = plan(vol, snap, base, token)
        if dry_run:
            _show_plan({"image": image, "snapshot": snap, "base": base, "bytes": p.nbytes,
                        "blocks": p.nblocks, "resumed_from_vbn": p.header.resume_from},
                       as_json)
            return
        with stream_output(output) as out, byte_progress("sending") as progress:
            widen_pipe(out.fileno())  # a pipe or FIFO: a whole record per wake-up of the reader
            write_plan(vol, p, out, progress)


def _show_plan(facts: dict[str, Any], as_json: bool) -> None:
    """What `send --dry-run` prints."""
    if as_json:
        print_json(facts)
        return
    what = f"incremental from {facts['base']}" if facts["base"] else "full"
    click.echo(f"would send {human_size(facts['bytes'])} ({facts['bytes']} bytes, "
               f"{facts['blocks']} blocks): snapshot {facts['snapshot']}, {what}")


def _send_through(live: MountEntry, image: str, snap: str, base: str | None,
                  token: str | None, output: str | None, dry_run: bool,
                  as_json: bool) -> None:
    """`send` of an image another process owns: the owner plans and reads the stream
    (off its loop, so its mount goes on serving), and its bytes come through the socket."""
    args: dict[str, Any] = {"snap": snap, "base": base, "resume": token}
    if dry_run:
        _show_plan({"image": image, **control.call(live, "send_plan", **args)}, as_json)
        return
    with control.stream(live, "send", **args) as answer, stream_output(output) as out, \
            byte_progress("sending") as progress:
        widen_pipe(out.fileno())
        total, done = int(answer.result["bytes"]), 0
        for chunk in answer:
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        out.flush()


@click.command("receive")
@click.argument("image", shell_complete=complete.image_path)
@click.option("-i", "--input", "source", type=click.Path(dir_okay=False, exists=True),
              help="Read the stream from this file instead of stdin.")
@click.option("--create", is_flag=True, help="Make IMAGE, the size of the source volume.")
@click.option("--abort", "abort_", is_flag=True,
              help="Discard IMAGE's partial receive (its pinned blocks are freed).")
@click.option("--drop-local", is_flag=True,
              help="Drop snapshots taken on IMAGE itself that the stream does not bring "
                   "(without this the receive refuses, naming them).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def receive_cmd(image: str, source: str | None, create: bool, abort_: bool,
                drop_local: bool, as_json: bool) -> None:
    """Apply an image stream to IMAGE (from stdin or -i FILE); the switch is atomic."""
    if abort_:
        if source or create:
            raise click.UsageError("--abort takes no stream: use it alone")
        vol = open_for_receive(image)
        try:
            name = pending_snapshot(vol)
            abort(vol)
        finally:
            vol.close()
        click.echo(f"discarded the partial receive of {name} on {image}")
        return
    if source is None and sys.stdin.isatty():
        raise click.UsageError("no stream on stdin: pipe one in or give -i FILE")
    started = time.monotonic()
    with _input(source) as f:
        # The raw file itself: the receiver reads each record into a buffer of its own.
        chunks: Source = f
        if create:
            if os.path.lexists(image):
                raise SnapvolError(f"{image} already exists: receive into it without "
                                   "--create, or name a new image")
            try:
                header, chunks = read_header_from(f, CREATE_MAX_BLOCKS)
            except StreamTooLarge as err:
                raise SnapvolError(too_large_to_create(err)) from None
            Volume.create(image, header.nblocks * 4096).close()
        try:
            result = _receive_into(image, chunks, drop_local)
        except BaseException:
            if create:
                _remove_if_untouched(image)
            raise
    seconds = time.monotonic() - started
    if as_json:
        print_json({"image": image, "snapshot": result.snapshot, "guid": result.guid,
                    "base": result.base, "blocks": result.blocks, "bytes": result.nbytes,
                    "resumed": result.resumed, "dropped": list(result.dropped),
                    "seconds": round(seconds, 3)})
        return
    what = f"incremental from {result.base}" if result.base else "full"
    more = " (resumed)" if result.resumed else ""
    click.echo(f"received snapshot {result.snapshot} ({what}){more}: {result.blocks} "
               f"blocks, {human_size(result.nbytes)} in {seconds:.1f}s")
    for name in result.dropped:
        click.echo(f"dropped snapshot {name}: the source does not hold it")


def too_large_to_create(err: StreamTooLarge) -> str:
    """Why `--create` refuses a stream of a huge volume, and the way out."""
    return (f"the stream is of a {human_size(err.nblocks * BLOCK_SIZE)} volume, larger than "
            f"the {human_size(err.limit * BLOCK_SIZE)} that --create makes from a stream; "
            "make the image yourself with 'snapvol create IMAGE --size SIZE' and receive "
            "into it without --create")


def _receive_into(image: str, chunks: Source, drop_local: bool) -> ReceiveResult:
    vol = open_for_receive(image)
    try:
        with byte_progress("receiving") as progress:
            return receive(vol, chunks, progress, drop_local)
    finally:
        vol.close()
        refresh_mount(image)


def refresh_mount(image: str) -> None:
    """Ask a read-only mount of IMAGE to load the root a receive just committed now,
    instead of at its next timer tick (fuse.follow). Best effort: the timer catches up
    anyway, so a mount that does not answer changes nothing here."""
    live = registry.find_image(image)
    if live is None or not live.read_only:
        return
    with contextlib.suppress(SnapvolError, OSError):
        control.call(live, "refresh", timeout=10)


def _remove_if_untouched(image: str) -> None:
    """`--create` made IMAGE; if the stream was refused before a block was pinned there
    is nothing in it to resume, so do not leave an empty image behind."""
    try:
        with open_volume(image, writable=False) as vol:
            untouched = not vol.receive_blocks
    except SnapvolError:
        return
    if untouched:
        with contextlib.suppress(OSError):
            os.unlink(image)


@contextlib.contextmanager
def _input(path: str | None) -> Iterator[io.FileIO]:
    """Unbuffered, so each read returns what the pipe holds instead of waiting for a
    whole chunk (a receive applies what has arrived)."""
    if path is None:
        widen_pipe(sys.stdin.fileno())
        with open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as stdin:
            yield stdin
        return
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
    except OSError as err:
        raise SnapvolError(f"cannot read {path}: {err.strerror}") from None
    with f:
        yield f
