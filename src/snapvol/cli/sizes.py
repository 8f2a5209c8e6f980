"""Sizes as people type them (512M, 4GiB, 2T, 1048576) and as they read them (1.5 GiB).

Units are binary (K = 1024) whether written K, KB or KiB: volume sizes are whole blocks of
4 KiB, and a "4G" volume that held 4 * 10**9 bytes would not be a whole number of blocks.
"""

from __future__ import annotations

import re
from decimal import Decimal

import click

_UNITS = "KMGTPE"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError naming the text when it is not a size."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"bad size {text!r}: use a number of bytes or a number with a K, M, "
                         "G, T or P suffix (like 512M or 4G)")
    number, unit, suffix = m.group(1), m.group(2).upper(), m.group(3)
    if suffix and suffix.lower() == "ib" and not unit:
        raise ValueError(f"bad size {text!r}: 'iB' needs a unit before it (like 4GiB)")
    scale = 1024 ** (_UNITS.index(unit) + 1) if unit else 1
    value = Decimal(number) * scale
    if value != int(value):
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


def human_size(nbytes: int) -> str:
    """1536 -> '1.5 KiB'; exact bytes below 1 KiB."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}iB"


def size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A click callback for size options, so a bad value is a usage error naming it."""
    try:
        return parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None
