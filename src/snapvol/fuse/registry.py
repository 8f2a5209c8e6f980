"""This host's mounts: one JSON file per mounted image in the run directory.

The run directory is $SNAPVOL_RUN_DIR, else /run/snapvol for root, else
$XDG_RUNTIME_DIR/snapvol, else /tmp/snapvol-UID. An image is keyed by the device and
inode number of its file (so any path to it finds the mount), and its control socket sits
beside its entry. Entries of processes that died (SIGKILL) are dropped when listed.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

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

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


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


def mounts() -> list[MountEntry]:
    """Live mounts, by mount point; entries of dead processes are removed."""
    out = []
    for path in sorted(run_dir().glob("*.json")):
        entry = _load(path)
        if entry is None:
            continue
        if not entry.alive:
            path.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.socket)
            continue
        out.append(entry)
    return sorted(out, key=lambda e: e.mountpoint)


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
