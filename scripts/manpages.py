"""Man pages for every snapvol command, generated from the click commands themselves, so
a page says what `--help` says and cannot drift from it.

    python scripts/manpages.py OUTDIR

writes OUTDIR/man1/snapvol.1, one page per command and group (snapvol-snap.1,
snapvol-snap-create.1, ...: `man snapvol-snap-create`) and OUTDIR/man8/mount.fuse.snapvol.8.
The page date is $SOURCE_DATE_EPOCH's if set (reproducible builds), else today's (UTC).
`make install-bin` runs this (scripts/install_bin.py).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import click

from snapvol.cli.main import cli
from snapvol.cli.mounthelper import helper

MARK = '.\\" Generated from the snapvol commands by scripts/manpages.py: do not edit.'

TOP_SECTIONS = r"""
.SH EXIT STATUS
.TP
.B 0
Success.
.TP
.B 1
\fBfsck\fR or \fBverify\fR found problems (listed on stdout).
.TP
.B 2
An error: a usage mistake, a missing or damaged image, a locked or mounted volume, an
unknown snapshot, a full volume. One line on stderr, \fBsnapvol: error: \fR... names the
problem and the way out; the volume is left as it was.
.TP
.B 130
Interrupted (Ctrl-C).
.SH ENVIRONMENT
.TP
.B SNAPVOL_RUN_DIR
Where mounts keep their registry entries, control sockets and log files (default
/run/snapvol for root, else $XDG_RUNTIME_DIR/snapvol, else /tmp/snapvol-UID).
.TP
.B SNAPVOL_DEBUG
Set to 1 to see the traceback of an internal error.
.SH TIMES AND SIZES
Times are printed in UTC with their Z (2025-06-01T12:00:00Z), in listings, \fBinfo\fR,
\fBls -l\fR and the mount log alike, and so are the names \fBreplicate\fR gives its
snapshots. Sizes are binary (KiB, MiB, GiB). Listings take \fB-H\fR (no header, tabs,
exact numbers) and \fB-o\fR \fIFIELD,...\fR as \fBzfs list\fR does, and \fB--json\fR.
"""

HELPER_SECTIONS = r"""
.SH FSTAB
.nf
/srv/vol.img  /mnt/vol  fuse.snapvol  defaults  0  0
/srv/mirror.img  /mnt/mirror  fuse.snapvol  ro,nofail,cp_interval=30  0  0
.fi
.PP
mount(8) runs this helper from /sbin only. systemd makes a mount unit of each line
(\fBjournalctl -u mnt-vol.mount\fR shows the mount's log); when the image lives on
another file system that is mounted late, add
\fBx-systemd.requires-mounts-for=\fR\fIDIR\fR. \fBumount\fR(8) or
\fBsnapvol unmount\fR end it with a last consistency point. A snapvol mount is always
nosuid,nodev (libfuse's default for every mount it makes): \fBsuid\fR and \fBdev\fR
change nothing.
.SH EXIT STATUS
.TP
.B 0
Mounted.
.TP
.B 1
A bad invocation or mount option.
.TP
.B 32
The mount failed; the reason is on stderr.
"""


def escape(text: str) -> str:
    """Text for roff: backslashes and dashes escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def first_phrase(text: str) -> str:
    """The help text up to its first stop, colon or semicolon: the NAME line's words."""
    return re.split(r"[.:;](?:\s|$)", " ".join(text.split()), maxsplit=1)[0]


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.strip().split("\n\n") if p.strip()]


def commands(group: click.Group, ctx: click.Context) -> Iterator[tuple[click.Context, str]]:
    """(context, page name) of `group` and of every command below it."""
    yield ctx, ctx.command_path.replace(" ", "-")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        if isinstance(command, click.Group):
            yield from commands(command, sub)
        else:
            yield sub, sub.command_path.replace(" ", "-")


def page(ctx: click.Context, name: str, section: int, date: str, see_also: list[str],
         extra: str = "") -> str:
    command = ctx.command
    help_text = command.help or ""
    out = [MARK,
           f'.TH "{name.upper()}" "{section}" "{date}" "snapvol {version("snapvol")}" '
           '"snapvol manual"',
           ".nh", ".ad l",  # no hyphenation, ragged right: option names stay whole
           ".SH NAME", f"{escape(name)} \\- {escape(first_phrase(help_text))}",
           ".SH SYNOPSIS", f".B {escape(ctx.command_path)}",
           escape(" ".join(command.collect_usage_pieces(ctx))),
           ".SH DESCRIPTION"]
    for i, para in enumerate(paragraphs(help_text)):
        if i:
            out.append(".PP")
        out.append(escape(para))
    options = [rec for p in command.get_params(ctx)
               if isinstance(p, click.Option) and (rec := p.get_help_record(ctx))]
    if options:
        out.append(".SH OPTIONS")
        for opts, text in options:
            out += [".TP", f"\\fB{escape(opts)}\\fR", escape(" ".join(text.split()))]
    if isinstance(command, click.Group):
        out.append(".SH COMMANDS")
        for sub in command.list_commands(ctx):
            child = command.get_command(ctx, sub)
            if child is None:
                continue
            page_name = f"{name}-{sub}"
            out += [".TP", f"\\fB{escape(sub)}\\fR",
                    f"{escape(child.get_short_help_str(limit=200))} See "
                    f"\\fB{escape(page_name)}\\fR(1)."]
    out.append(extra.strip("\n"))
    if see_also:
        out += [".SH SEE ALSO", ",\n".join(f"\\fB{escape(s)}\\fR({sec})"
                                           for s, sec in (x.rsplit(".", 1) for x in see_also))]
    return "\n".join(line for line in out if line) + "\n"


def write_pages(outdir: Path) -> list[Path]:
    """Every page under outdir/man1 and outdir/man8; the paths written."""
    stamp = float(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(stamp))
    root = click.Context(cli, info_name="snapvol", **cli.context_settings)
    found = list(commands(cli, root))
    names = [n for _, n in found]
    written = []
    for ctx, name in found:
        parent = name.rsplit("-", 1)[0] if "-" in name else None
        if name == "snapvol":
            see = [f"{n}.1" for n in names[1:]] + ["mount.fuse.snapvol.8"]
            extra = TOP_SECTIONS
        else:
            see = [f"{parent}.1"] if parent else []
            if name == "snapvol-mount":
                see.append("mount.fuse.snapvol.8")
            extra = ""
        written.append(_write(outdir / "man1" / f"{name}.1",
                              page(ctx, name, 1, date, see, extra)))
    hctx = click.Context(helper, info_name="mount.fuse.snapvol", **helper.context_settings)
    written.append(_write(outdir / "man8" / "mount.fuse.snapvol.8",
                          page(hctx, "mount.fuse.snapvol", 8, date,
                               ["snapvol-mount.1", "fstab.5", "mount.8", "systemd.mount.5"],
                               HELPER_SECTIONS)))
    return written


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/manpages.py OUTDIR")
    for p in write_pages(Path(sys.argv[1])):
        print(p)
