"""Listings (`snap list`, `mounts`, `dump --list`, `info`) for people and for scripts, as
`zfs list` prints them.

For people: a header and aligned columns, the fields a person needs by default (more with
`-v`), sizes in binary units and times in UTC. A column is as wide as its widest cell and
no cell is ever cut or wrapped: a long snapshot name makes its line longer, it never loses
characters (on an 80-column terminal the terminal folds such a line, a pipe gets it whole).
For scripts, `-H`: no header, one tab between fields, exact numbers (bytes, nanoseconds
since the epoch). `-o FIELD,...` picks the fields and their order in both forms.

Control characters in a cell (a tab or newline in a name an older version allowed) are
shown as \\xNN escapes, so one row is always one line and `-H` rows always split on tabs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import click
from rich.cells import cell_len

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

GAP = "  "
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Field(Generic[T]):
    """One column: its `-o` name, what a person reads, and what a script reads."""

    name: str
    human: Callable[[T], str]
    exact: Callable[[T], str] | None = None  # -H; the human form when None
    right: bool = False  # numbers are right-aligned

    @property
    def header(self) -> str:
        return self.name.upper()


class Listing(Generic[T]):
    """The fields of one kind of row, which of them show by default and with `-v`."""

    def __init__(self, fields: Sequence[Field[T]], default: Sequence[str],
                 verbose: Sequence[str] | None = None) -> None:
        self.fields = {f.name: f for f in fields}
        self.default = tuple(default)
        self.verbose = tuple(verbose) if verbose is not None else tuple(self.fields)
        assert set(self.default) <= set(self.fields) >= set(self.verbose)

    def options(self, command: F) -> F:
        """The `-H`, `-o FIELD,...` and `-v` options, in this order on the command."""
        command = self._verbose(command)
        command = click.option(
            "-o", "fields", metavar="FIELD,...", callback=self._parse,
            help="Show these fields, in this order: " + ", ".join(self.fields) + ".")(command)
        return _scripted(command)

    def plain_options(self, command: F) -> F:
        """`-H` and `-v` alone, for a command whose `-o` means something else (`dump`)."""
        return _scripted(self._verbose(command))

    def _verbose(self, command: F) -> F:
        return click.option("-v", "--verbose", is_flag=True,
                            help="Show every field (" + ", ".join(self.verbose) + ").")(command)

    def _parse(self, ctx: click.Context, param: click.Parameter,
               value: str | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        names = tuple(n.strip() for n in value.split(","))
        unknown = [n for n in names if n not in self.fields]
        if unknown or not all(names):
            bad = ", ".join(repr(n) for n in unknown) or "an empty field name"
            raise click.BadParameter(f"unknown field {bad}: the fields are "
                                     + ", ".join(self.fields), ctx, param)
        return names

    def chosen(self, fields: tuple[str, ...] | None, verbose: bool) -> tuple[str, ...]:
        if fields is not None:
            return fields
        return self.verbose if verbose else self.default

    def lines(self, rows: Sequence[T], *, fields: tuple[str, ...] | None = None,
              verbose: bool = False, scripted: bool = False) -> list[str]:
        """The rows as text lines (with a header unless `scripted`)."""
        chosen = [self.fields[n] for n in self.chosen(fields, verbose)]
        if scripted:
            return ["\t".join(_clean((f.exact or f.human)(row)) for f in chosen)
                    for row in rows]
        table = [[f.header for f in chosen]]
        table += [[_clean(f.human(row)) for f in chosen] for row in rows]
        return align(table, [f.right for f in chosen])

    def echo(self, rows: Sequence[T], *, fields: tuple[str, ...] | None = None,
             verbose: bool = False, scripted: bool = False) -> None:
        for line in self.lines(rows, fields=fields, verbose=verbose, scripted=scripted):
            click.echo(line)


def _scripted(command: F) -> F:
    return click.option("-H", "scripted", is_flag=True,
                        help="For scripts: no header, fields separated by one tab, exact "
                             "numbers (bytes, nanoseconds since the epoch).")(command)


def align(table: list[list[str]], right: Sequence[bool]) -> list[str]:
    """Columns as wide as their widest cell (in terminal cells: wide characters count
    twice), two spaces apart; no trailing blanks."""
    widths = [max(cell_len(row[i]) for row in table) for i in range(len(right))]
    out = []
    for row in table:
        cells = []
        for cell, width, r in zip(row, widths, right, strict=True):
            pad = " " * (width - cell_len(cell))
            cells.append(pad + cell if r else cell + pad)
        out.append(GAP.join(cells).rstrip())
    return out


def _clean(cell: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", cell)
