"""`snapvol mount`, `snapvol unmount`, `snapvol mounts`, and reaching a mounted image.

Without --foreground, `mount` forks a mount process that detaches from the terminal and
waits for it: the parent returns once the mount answers requests, or fails with the
child's own error message. The child's later messages go to a log file in the run
directory (see `snapvol.control.registry`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

import click
from rich.table import Table

from snapvol.cli.output import console, print_json, show_time
from snapvol.control import mounttable, registry
from snapvol.control.protocol import ControlError, call
from snapvol.control.registry import MountEntry
from snapvol.engine.volume import MAX_CP_INTERVAL, MIN_CP_INTERVAL, check_cp_interval
from snapvol.errors import SnapvolError
from snapvol.fuse.readahead import DEFAULT_KIB, check_kib

UNMOUNT_WAIT = 60.0


def mounted(image: str) -> MountEntry | None:
    """The live mount of `image`, if it has one (commands then go through its socket)."""
    return registry.find_image(image)


def remote(entry: MountEntry, op: str, **args: Any) -> Any:
    return call(entry, op, **args)


def _cp_interval(ctx: click.Context, param: click.Parameter,
                 value: float | None) -> float | None:
    """Refuse what parses as a float but is no interval (nan, inf, 0, negative, 1e308)."""
    if value is None:
        return None
    try:
        return check_cp_interval(value)
    except SnapvolError as err:
        raise click.BadParameter(str(err), ctx, param) from None


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option("--read-only", "-r", is_flag=True, help="Mount read-only (a shared lock).")
@click.option("--cp-interval", type=float, default=None, metavar="SECONDS",
              callback=_cp_interval,
              help=f"Commit a consistency point this often while changed (default 10; "
                   f"{MIN_CP_INTERVAL:g} to {MAX_CP_INTERVAL:g}).")
@click.option("--allow-other", is_flag=True,
              help="Let other users in (needs user_allow_other in /etc/fuse.conf "
                   "unless run by root).")
@click.option("--readahead", type=int, default=DEFAULT_KIB, metavar="KIB", show_default=True,
              callback=lambda ctx, param, value: check_kib(value),  # before any fork
              help="The kernel's readahead window for the mount's files, if run by root "
                   "(0: the kernel's default, 128).")
def mount(image: str, mountpoint: str, foreground: bool, read_only: bool,
          cp_interval: float | None, allow_other: bool, readahead: int) -> None:
    """Mount the volume in IMAGE on MOUNTPOINT; snapshots appear under MOUNTPOINT/.snapshot."""
    from snapvol.fuse.server import check_mount, serve

    image, mountpoint = os.path.abspath(image), os.path.abspath(mountpoint)
    check_mount(image, mountpoint)  # before the fork: a refusal is never the log's
    kwargs: dict[str, Any] = {"read_only": read_only, "cp_interval": cp_interval,
                              "allow_other": allow_other, "readahead_kib": readahead}
    if foreground:
        logging.basicConfig(level=logging.INFO, format="snapvol mount: %(message)s")
        serve(image, mountpoint, ready=lambda: click.echo(
            f"mounted {image} on {mountpoint}", err=True), **kwargs)
        return
    if not os.path.exists(image):
        raise SnapvolError(f"{image}: no such image file")
    logfile = registry.log_path(image)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mount process
        os.close(r)
        code = 0
        try:
            os.setsid()
            _detach(logfile)
            serve(image, mountpoint, ready=lambda: _say(w, "ok"), **kwargs)
        except SnapvolError as e:
            logging.getLogger("snapvol.fuse").error("%s", e)
            _say(w, f"error {e}")
            code = 2
        except BaseException as e:
            logging.getLogger("snapvol.fuse").exception("mount failed")
            _say(w, f"error internal error: {type(e).__name__}: {e} (see {logfile})")
            code = 2
        finally:
            os._exit(code)
    os.close(w)
    answer = _read_line(r)
    os.close(r)
    if answer == "ok":
        click.echo(f"mounted {image} on {mountpoint} (process {pid})")
        return
    os.waitpid(pid, 0)
    if answer.startswith("error "):
        raise SnapvolError(answer[len("error "):])
    raise SnapvolError(f"the mount process exited before the mount was ready; see {logfile} "
                       "or run with --foreground")


def _say(fd: int, line: str) -> None:
    """Tell the waiting parent; after "ok" it is gone, and later news goes to the log."""
    with contextlib.suppress(OSError):
        os.write(fd, " ".join(line.splitlines()).encode() + b"\n")


def _detach(logfile: os.PathLike[str]) -> None:
    """Leave the terminal: stdin from /dev/null, stdout and stderr to the log file."""
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    # A name that is not UTF-8 (os.fsdecode's surrogates) is logged as \xNN escapes
    # instead of failing the log write.
    sys.stdout = open(1, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s snapvol mount[%(process)d] %(levelname)s: "
                               "%(message)s")
    os.chdir("/")


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="Unmount even while programs use the mount: a last CP, then a lazy "
                   "detach (their later reads and writes fail).")
def unmount(mountpoint: str, force: bool) -> None:
    """Commit a last consistency point and unmount MOUNTPOINT.

    Refused while files are open in the mount or a program works in it (as umount does);
    the error names the processes. A stale mount (its mount process was killed) is
    detached."""
    entry = registry.find_mountpoint(mountpoint)
    if entry is None:
        stale = registry.find_stale(mountpoint)
        if stale is None:
            raise SnapvolError(f"{mountpoint} is not a snapvol mount point "
                               "(see `snapvol mounts`)")
        _clear_stale(stale)
        return
    try:
        call(entry, "unmount", force=force)
    except ControlError as e:
        if e.code == "EBUSY":
            raise SnapvolError(_busy(entry.mountpoint, str(e))) from None
        if entry.alive:
            raise
    deadline = time.monotonic() + UNMOUNT_WAIT
    while entry.alive:
        if time.monotonic() > deadline:
            raise SnapvolError(f"process {entry.pid} has not finished unmounting "
                               f"{entry.mountpoint} after {UNMOUNT_WAIT:.0f} s")
        time.sleep(0.05)
    click.echo(f"unmounted {entry.mountpoint}")


def _busy(mountpoint: str, refusal: str) -> str:
    """The refusal of a busy mount, naming the processes that use it where this user may
    see them (the mount process counts the open files of every process)."""
    kernel = mounttable.find(mountpoint)
    users = [] if kernel is None else mounttable.users(kernel, exclude=frozenset({os.getpid()}))
    force = (f"or run `snapvol unmount --force {mountpoint}` to detach it after a last CP "
             "(their later reads and writes then fail)")
    if users:
        return (f"{mountpoint} is busy: {', '.join(u.describe() for u in users)}; stop them "
                f"or close what they hold there, {force}")
    detail = refusal.partition(": ")[2] or refusal
    return (f"{mountpoint} is busy: {detail}, held by processes this user cannot see; "
            f"close them, {force}")


def _clear_stale(stale: registry.StaleMount) -> None:
    """Detach a mount whose process is gone (a lazy detach if programs still use it)."""
    why = mounttable.unmount(stale.mountpoint)
    if why is not None:
        why = mounttable.unmount(stale.mountpoint, lazy=True)
    if why is not None:
        raise SnapvolError(f"cannot unmount the stale mount on {stale.mountpoint}: {why}")
    registry.forget(stale.mountpoint)
    gone = "its mount process" + ("" if stale.pid is None else f" {stale.pid}")
    click.echo(f"unmounted {stale.mountpoint} (a stale mount: {gone} was gone, so changes "
               "after its last CP are lost)")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def mounts(as_json: bool) -> None:
    """List this host's snapvol mounts, and stale ones (their mount process was killed;
    `snapvol unmount MOUNTPOINT` clears them)."""
    found = registry.mounts()
    stale = registry.stale()
    if as_json:
        print_json([{"image": e.image, "mountpoint": e.mountpoint, "pid": e.pid,
                     "read_only": e.read_only, "socket": e.socket,
                     "started_ns": e.started_ns, "state": "live"} for e in found] +
                   [{"image": s.image, "mountpoint": s.mountpoint, "pid": s.pid,
                     "read_only": s.read_only, "socket": None, "started_ns": s.started_ns,
                     "state": "stale"} for s in stale])
        return
    if not found and not stale:
        click.echo("no mounts")
        return
    table = Table(box=None)
    for title in ("mount point", "image", "mode", "process", "since", "state"):
        table.add_column(title)
    for e in found:
        table.add_row(e.mountpoint, e.image, "ro" if e.read_only else "rw", str(e.pid),
                      show_time(e.started_ns), "live")
    for s in stale:
        table.add_row(s.mountpoint, s.image or "?",
                      "?" if s.read_only is None else "ro" if s.read_only else "rw",
                      "?" if s.pid is None else f"{s.pid} (gone)",
                      "?" if s.started_ns is None else show_time(s.started_ns), "stale")
    console().print(table)
    if stale:
        click.echo("stale: the mount process is gone; `snapvol unmount MOUNTPOINT` "
                   "clears the mount")
