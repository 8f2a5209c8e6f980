"""Progress bars (put and get: files and bytes; send, receive, dump, replicate: bytes;
fsck: inodes per image), drawn on stderr only on a terminal.

When stdout or stderr is not a terminal (a script, a pipe, a log) nothing is drawn.
Sizes and rates are in binary units written by `human_size`, as every other size snapvol
prints, and a bar counts what the command's summary line counts (put and get: regular
files, and their lengths with holes; transfers: bytes of stream), so the last figures a
bar shows are the summary's.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from snapvol.cli.sizes import human_size
from snapvol.fs.copy import Progress as CopyProgress


class _Bytes(ProgressColumn):
    """`1.5 MiB/3.0 MiB`, in human_size's words."""

    def render(self, task: Task) -> Text:
        done = human_size(int(task.completed))
        total = "?" if task.total is None else human_size(int(task.total))
        return Text(f"{done}/{total}", style="progress.download")


class _Rate(ProgressColumn):
    """`12.3 MiB/s` (rich's own rate column is in decimal units)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "?" if speed is None else f"{human_size(int(speed))}/s"
        return Text(shown, style="progress.data.speed")


class _Bar:
    """Adapts a rich Progress to the `snapvol.fs.copy.Progress` protocol."""

    def __init__(self, progress: Progress, verb: str) -> None:
        self.progress = progress
        self.task: TaskID = progress.add_task(verb, total=None, files=0, total_files=0)
        self.files = 0

    def start(self, files: int, nbytes: int) -> None:
        self.progress.update(self.task, total=nbytes, total_files=files)

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.progress.update(self.task, advance=nbytes, files=self.files)


@contextlib.contextmanager
def copy_progress(verb: str) -> Iterator[CopyProgress | None]:
    if not _on_terminal():
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[files]}/{task.fields[total_files]} files"),
        _Bytes(),
        _Rate(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield _Bar(progress, verb)


def _on_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def check_progress() -> Iterator[Callable[[str, int, int], None] | None]:
    """A callback for `snapvol.engine.fsck.check`: (image label, done, total)."""
    if not _on_terminal():
        yield None
        return
    columns = (TextColumn("checking {task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} inodes"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def report(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=total)
            progress.update(tasks[label], completed=done)

        yield report


@contextlib.contextmanager
def byte_progress(verb: str) -> Iterator[Callable[[int, int], None] | None]:
    """A (done bytes, total bytes) callback drawing bytes, rate and time left, for
    `send` and `receive`; None off a terminal."""
    if not _on_terminal():
        yield None
        return
    columns = (TextColumn(verb), BarColumn(), _Bytes(), _Rate(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(verb, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=max(total, done))

        yield report
