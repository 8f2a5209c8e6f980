"""`snapvol mount`, `snapvol unmount`, `snapvol mounts`, and reaching a mounted image.

Without --foreground, `mount` forks a mount process that detaches from the terminal and
waits for it: the parent returns once the mount answers requests, or fails with the
child's own error message. The mount process logs (its CPs, snapshots, followed receives
and errors) to one place, which its registry entry records and `snapvol mounts` shows:
the journal when systemd started it (its stderr is the journal stream: cli/systemd.py),
else stderr with --foreground, else a log file in the run directory (see
`snapvol.control.registry`). Log times are UTC, like every time snapvol prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from snapvol.cli import systemd
from snapvol.cli.listing import Field, Listing
from snapvol.cli.output import print_json, show_time
from snapvol.control import mounttable, registry
from snapvol.control.protocol import ControlError, call
from snapvol.control.registry import MountEntry, StaleMount
from snapvol.engine.volume import MAX_CP_INTERVAL, MIN_CP_INTERVAL, check_cp_interval
from snapvol.errors import SnapvolError
from snapvol.fuse.readahead import DEFAULT_KIB, check_kib

UNMOUNT_WAIT = 60.0
KERNEL_FLAGS = ("nosuid", "nodev", "noexec")  # what fuse.server.KERNEL_FLAGS passes on
log = logging.getLogger("snapvol.fuse")


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


def _kernel_flags(ctx: click.Context, param: click.Parameter,
                  value: str | None) -> frozenset[str]:
    flags = frozenset(f.strip() for f in (value or "").split(",") if f.strip())
    if flags - set(KERNEL_FLAGS):
        raise click.BadParameter(f"unknown flag {', '.join(sorted(flags - set(KERNEL_FLAGS)))}"
                                 f": the flags are {', '.join(KERNEL_FLAGS)}", ctx, param)
    return flags


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
@click.option("--kernel-flags", metavar="FLAG,...", callback=_kernel_flags,
              help="Mount flags the kernel applies to the mount point, as in mount(8): "
                   + ", ".join(KERNEL_FLAGS) + ".")
def mount(image: str, mountpoint: str, foreground: bool, read_only: bool,
          cp_interval: float | None, allow_other: bool, readahead: int,
          kernel_flags: frozenset[str]) -> None:
    """Mount the volume in IMAGE on MOUNTPOINT; snapshots appear under MOUNTPOINT/.snapshot.

    The mount process logs its CPs, snapshots, followed receives and errors to the
    journal when systemd runs it, to stderr with --foreground, and otherwise to a file
    that `snapvol mounts` names. From /etc/fstab: see mount.fuse.snapvol(8)."""
    from snapvol.fuse.server import check_mount, serve

    image, mountpoint = os.path.abspath(image), os.path.abspath(mountpoint)
    check_mount(image, mountpoint)  # before the fork: a refusal is never the log's
    kwargs: dict[str, Any] = {"read_only": read_only, "cp_interval": cp_interval,
                              "allow_other": allow_other, "readahead_kib": readahead,
                              "kernel_flags": kernel_flags}
    journal = systemd.stderr_is_journal()
    if foreground:
        _log_to_stderr(journal, "snapvol mount: %(message)s")

        def ready() -> None:
            log.info("mounted %s on %s", image, mountpoint)  # on stderr
            systemd.notify("READY=1")

        serve(image, mountpoint, ready=ready, log_to="journal" if journal else "stderr",
              **kwargs)
        return
    if not os.path.exists(image):
        raise SnapvolError(f"{image}: no such image file")
    logfile = registry.log_path(image)
    where = "journal" if journal else str(logfile)
    shown = "the journal" if journal else where
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mount process
        os.close(r)
        code = 0
        try:
            os.setsid()
            _detach(None if journal else logfile)

            def ready() -> None:
                log.info("mounted %s on %s", image, mountpoint)
                _say(w, "ok")

            serve(image, mountpoint, ready=ready, log_to=where, **kwargs)
        except SnapvolError as e:
            logging.getLogger("snapvol.fuse").error("%s", e)
            _say(w, f"error {e}")
            code = 2
        except BaseException as e:
            logging.getLogger("snapvol.fuse").exception("mount failed")
            _say(w, f"error internal error: {type(e).__name__}: {e} (see {shown})")
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
    raise SnapvolError(f"the mount process exited before the mount was ready; see {shown} "
                       "or run with --foreground")


def _say(fd: int, line: str) -> None:
    """Tell the waiting parent; after "ok" it is gone, and later news goes to the log."""
    with contextlib.suppress(OSError):
        os.write(fd, " ".join(line.splitlines()).encode() + b"\n")


def _detach(logfile: os.PathLike[str] | None) -> None:
    """Leave the terminal: stdin from /dev/null, stdout and stderr to the log file (or
    kept as they are when `logfile` is None: the journal stream systemd gave)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if logfile is not None:
        fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    # A name that is not UTF-8 (os.fsdecode's surrogates) is logged as \xNN escapes
    # instead of failing the log write.
    sys.stdout = open(1, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
    _log_to_stderr(logfile is None, LOG_FORMAT)
    os.chdir("/")


LOG_FORMAT = "%(asctime)s snapvol mount[%(process)d] %(levelname)s: %(message)s"
"""The log file's lines: `2025-06-01T12:00:00.123Z snapvol mount[PID] INFO: ...`."""


class _UTCFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def _log_to_stderr(journal: bool, fmt: str) -> None:
    """Log INFO and above to stderr: for the journal with priority prefixes and no time
    (the journal stamps its own), else with a UTC time when `fmt` asks for one."""
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(systemd.JournalFormatter("snapvol mount: %(message)s"))
    else:
        handler.setFormatter(_UTCFormatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


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


def _row(m: MountEntry | StaleMount) -> dict[str, Any]:
    """One mount as `mounts --json` gives it (and the listing reads it)."""
    live = m if isinstance(m, MountEntry) else None
    return {"image": m.image, "mountpoint": m.mountpoint, "pid": m.pid,
            "read_only": m.read_only, "socket": live.socket if live else None,
            "started_ns": m.started_ns, "state": "live" if live else "stale",
            "log": m.log or None}


def _known(value: object, shown: Callable[[], str]) -> str:
    """What a dead process's entry did not say is "?"."""
    return "?" if value is None else shown()


def _pid(r: dict[str, Any]) -> str:
    return _known(r["pid"], lambda: f"{r['pid']}" + (" (gone)" if r["state"] == "stale" else ""))


MOUNTS: Listing[dict[str, Any]] = Listing([
    Field("mountpoint", lambda r: r["mountpoint"]),
    Field("image", lambda r: r["image"] or "?"),
    Field("mode", lambda r: _known(r["read_only"], lambda: "ro" if r["read_only"] else "rw")),
    Field("pid", _pid, lambda r: _known(r["pid"], lambda: str(r["pid"])), right=True),
    Field("state", lambda r: r["state"]),
    Field("log", lambda r: r["log"] or "?"),
    Field("since", lambda r: _known(r["started_ns"], lambda: show_time(r["started_ns"])),
          lambda r: _known(r["started_ns"], lambda: str(r["started_ns"]))),
    Field("socket", lambda r: r["socket"] or "-"),
], default=("mountpoint", "image", "mode", "pid", "state", "log"))


@click.command()
@MOUNTS.options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def mounts(scripted: bool, fields: tuple[str, ...] | None, verbose: bool,
           as_json: bool) -> None:
    """List this host's snapvol mounts, and stale ones (their mount process was killed;
    `snapvol unmount MOUNTPOINT` clears them), with where each mount process logs: a
    file, "journal" (journalctl -u the mount's unit) or "stderr" (--foreground)."""
    found: list[MountEntry | StaleMount] = [*registry.mounts(), *registry.stale()]
    rows = [_row(m) for m in found]
    if as_json:
        print_json(rows)
        return
    if not rows and not scripted:
        click.echo("no mounts")
        return
    MOUNTS.echo(rows, fields=fields, verbose=verbose, scripted=scripted)
    if any(r["state"] == "stale" for r in rows) and not scripted:
        click.echo("stale: the mount process is gone; `snapvol unmount MOUNTPOINT` "
                   "clears the mount")
