"""The progress bar of put and get: entries and bytes, on stderr, only on a terminal.

When stdout or stderr is not a terminal (a script, a pipe, a log) nothing is drawn.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from snapvol.fs.copy import Progress as CopyProgress


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
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[files]}/{task.fields[total_files]} files"),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield _Bar(progress, verb)
