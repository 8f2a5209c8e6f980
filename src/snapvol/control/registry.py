"""This host's volume owners (mounts, and owners without a mount point): one JSON file per
owned image in the run directory.

The run directory is $SNAPVOL_RUN_DIR, else /run/snapvol for root, else
$XDG_RUNTIME_DIR/snapvol, else /tmp/snapvol-UID. An image is keyed by the device and
inode number of its file (so any path to it finds the mount), and its control socket sits
beside its entry.

A mount whose process died (SIGKILL) leaves its kernel side behind: a `fuse.snapvol`
entry in the mount table whose requests all fail with ENOTCONN. That is a **stale**
mount (`stale()`): listed by `snapvol mounts`, cleared by `snapvol unmount`. The dead
process's registry entry is kept while its stale mount remains, so the listing can name
the image; otherwise entries of dead processes are dropped when listed.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from snapvol.control import mounttable
from snapvol.errors import SnapvolError

SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the NUL


@dataclass(frozen=True, slots=True)
class MountEntry:
    image: str  # absolute path
    mountpoint: str  # absolute path
    pid: int
    socket: str
    read_only: bool
    started_ns: int

    start_ticks: int = 0  # the process's start time (/proc/PID/stat), 0 if unknown
    log: str = ""  # where the process logs: a file's path, "journal" or "stderr"

    @property
    def where(self) -> str:
        """The owner, as errors name it."""
        if self.mountpoint:
            return f"the mount of {self.image} on {self.mountpoint} (process {self.pid})"
        return f"the owner of {self.image} (process {self.pid})"

    @property
    def alive(self) -> bool:
        """Whether the process that wrote the entry still runs: not gone, not a zombie, and
        not another process that got its pid later (its start time differs)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        found = process_start(self.pid)
        if found is None:
            return True  # no /proc to ask: the pid answers, so take it as running
        state, ticks = found
        return state not in ("Z", "X") and (not self.start_ticks or ticks == self.start_ticks)


@dataclass(frozen=True, slots=True)
class StaleMount:
    """A snapvol mount whose process is gone; `image`, `pid`, `read_only` and
    `started_ns` are known if the dead process left its registry entry here, and `log`,
    where it logged (what it said before it went), if it was a version that told."""

    mountpoint: str
    image: str | None = None
    pid: int | None = None
    read_only: bool | None = None
    started_ns: int | None = None
    log: str | None = None


def process_start(pid: int) -> tuple[str, int] | None:
    """The state letter of process `pid` (Z: killed, not yet reaped) and its start time in
    clock ticks since boot, which tells it from a later process given the same pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def run_dir() -> Path:
    env = os.environ.get("SNAPVOL_RUN_DIR")
    if env:
        path = Path(env)
    elif os.geteuid() == 0 and os.access("/run", os.W_OK):
        path = Path("/run/snapvol")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "snapvol"
    else:
        path = Path(f"/tmp/snapvol-{os.geteuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def image_key(image: str | os.PathLike[str]) -> str:
    try:
        st = os.stat(image)
    except OSError as e:
        raise SnapvolError(f"{os.fspath(image)}: {e.strerror}") from None
    return f"{st.st_dev:x}-{st.st_ino:x}"


def socket_path(image: str | os.PathLike[str]) -> str:
    path = str(run_dir() / f"{image_key(image)}.sock")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise SnapvolError(f"control socket path {path} is too long for a unix socket: "
                           "set SNAPVOL_RUN_DIR to a shorter directory")
    return path


def log_path(image: str | os.PathLike[str]) -> Path:
    return run_dir() / f"{image_key(image)}.log"


def register(entry: MountEntry) -> None:
    path = run_dir() / f"{image_key(entry.image)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(entry)))
    tmp.replace(path)


def unregister(image: str | os.PathLike[str], pid: int) -> None:
    """Remove the entry of `image` if it is still the one process `pid` wrote."""
    path = run_dir() / f"{image_key(image)}.json"
    entry = _load(path)
    if entry is not None and entry.pid == pid:
        path.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.socket)


def _load(path: Path) -> MountEntry | None:
    try:
        data = json.loads(path.read_text())
        return MountEntry(**data)
    except (OSError, ValueError, TypeError):
        return None


def _entries() -> list[tuple[Path, MountEntry]]:
    out = []
    for path in sorted(run_dir().glob("*.json")):
        entry = _load(path)
        if entry is not None:
            out.append((path, entry))
    return out


def _snapvol_mounts() -> dict[str, mounttable.KernelMount]:
    """The kernel's snapvol mounts this user may unmount, by mount point."""
    return {m.mountpoint: m for m in mounttable.read()
            if m.fstype == mounttable.FSTYPE and mounttable.owned_by_caller(m)}


def _drop(path: Path, entry: MountEntry) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry.socket)


def mounts() -> list[MountEntry]:
    """Live mounts, by mount point (owners without one are not mounts: `owners`)."""
    return [e for e in owners() if e.mountpoint]


def owners() -> list[MountEntry]:
    """Live owners, by mount point. Entries of dead processes are removed, unless their
    mount point is still mounted (a stale mount, see `stale`)."""
    out = []
    kernel: dict[str, mounttable.KernelMount] | None = None
    for path, entry in _entries():
        if entry.alive:
            out.append(entry)
            continue
        if kernel is None:
            kernel = _snapvol_mounts()
        if entry.mountpoint not in kernel:
            _drop(path, entry)
    return sorted(out, key=lambda e: e.mountpoint)


def stale() -> list[StaleMount]:
    """This user's snapvol mounts whose process is gone (their requests fail with
    ENOTCONN), by mount point, with what their dead process's entry says."""
    live = {e.mountpoint for e in mounts()}
    dead = {e.mountpoint: e for _, e in _entries() if not e.alive}
    out = []
    for mountpoint in sorted(_snapvol_mounts()):
        if mountpoint in live or not mounttable.not_connected(mountpoint):
            continue
        e = dead.get(mountpoint)
        out.append(StaleMount(mountpoint) if e is None else StaleMount(
            mountpoint, e.image, e.pid, e.read_only, e.started_ns, e.log or None))
    return out


def find_stale(mountpoint: str | os.PathLike[str]) -> StaleMount | None:
    want = os.path.realpath(mountpoint)
    return next((s for s in stale() if s.mountpoint == want), None)


def forget(mountpoint: str) -> None:
    """Remove what dead processes left in the registry for `mountpoint` (after its stale
    mount was cleared)."""
    for path, entry in _entries():
        if entry.mountpoint == mountpoint and not entry.alive:
            _drop(path, entry)


def find_image(image: str | os.PathLike[str]) -> MountEntry | None:
    try:
        key = image_key(image)
    except SnapvolError:
        return None
    entry = _load(run_dir() / f"{key}.json")
    return entry if entry is not None and entry.alive else None


def find_mountpoint(mountpoint: str | os.PathLike[str]) -> MountEntry | None:
    want = os.path.realpath(mountpoint)
    for entry in mounts():
        if entry.mountpoint == want:
            return entry
    return None
