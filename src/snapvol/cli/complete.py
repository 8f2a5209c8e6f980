"""Shell completion of image paths and snapshot names, for click's completion (bash, zsh,
fish: `_SNAPVOL_COMPLETE=bash_source snapvol` prints the script; `make install-bin`
installs one for each shell).

A snapshot name is completed from the image already on the command line: its snapshot
list is read read-only (through the mount process when the image is mounted), and any
failure (no image yet, not a volume, locked, damaged) completes nothing. Completion
must never print an error or change anything.
"""

from __future__ import annotations

import contextlib

import click
from click.shell_completion import CompletionItem

from snapvol.control import registry
from snapvol.control.protocol import call
from snapvol.engine.volume import Volume

MOUNT_TIMEOUT = 2.0  # seconds a mount process may take to list its snapshots


def image_path(ctx: click.Context, param: click.Parameter,
               incomplete: str) -> list[CompletionItem]:
    """An image argument: the shell completes file names."""
    return [CompletionItem(incomplete, type="file")]


def snapshot_names(image: str) -> list[str]:
    """The snapshot names of `image`, oldest first; [] on any failure."""
    with contextlib.suppress(Exception):
        if (live := registry.find_image(image)) is not None:
            return [str(row["name"]) for row in call(live, "snap_list",
                                                        timeout=MOUNT_TIMEOUT)]
        with Volume.open(image, writable=False) as vol:
            return [e.name for e in vol.snapshots.entries()]
    return []


def snapshot(ctx: click.Context, param: click.Parameter,
             incomplete: str) -> list[CompletionItem]:
    """A snapshot of the command's IMAGE argument (shadows included: `send --base`,
    `snap delete` and `snap rename` take them)."""
    image = ctx.params.get("image")
    if image is None and ctx.args:
        # Completing an option's value (`--snapshot <TAB>`), click leaves the positional
        # parameters unset and the words in ctx.args: IMAGE is always the first.
        image = ctx.args[0]
    if not isinstance(image, str):
        return []
    return [CompletionItem(n) for n in snapshot_names(image) if n.startswith(incomplete)]


def image_at_snapshot(ctx: click.Context, param: click.Parameter,
                      incomplete: str) -> list[CompletionItem]:
    """`IMAGE[@SNAP]` (verify): a file name until an `@`, then the image's snapshots."""
    image, at, partial = incomplete.rpartition("@")
    if not at:
        return [CompletionItem(incomplete, type="file")]
    return [CompletionItem(f"{image}@{n}") for n in snapshot_names(image)
            if n.startswith(partial)]
