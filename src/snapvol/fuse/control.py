"""The control socket protocol, and the answers shared by the socket and the CLI.

While an image is mounted, its mount process holds the volume's exclusive lock, so other
commands on that image (`snap create|delete|rename|list`, `info`, `fsck --online`, `unmount`)
send the mount process a request over a unix socket instead of opening the image.

One request per connection: the client sends one JSON object and a newline,
`{"op": NAME, "args": {...}}`; the server answers with one line,
`{"ok": true, "result": ...}` or `{"ok": false, "error": MESSAGE}` (with `"code": "EBUSY"`
when an `unmount` is refused because the mount is in use), and closes. MESSAGE is the
one-line error the command would have printed had it opened the image itself.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from snapvol.engine.fsck import FsckReport
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.fuse.registry import MountEntry
from snapvol.layout.constants import BLOCK_SIZE

MAX_MESSAGE = 1 << 20
OPS = ("ping", "info", "snap_create", "snap_delete", "snap_list", "fsck", "unmount")


class ControlError(SnapvolError):
    """The mount process refused a request, or could not be reached. `code` names a
    refusal the caller may act on (EBUSY: the mount is in use), else None."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def volume_facts(vol: Volume, image: str) -> dict[str, Any]:
    """What `snapvol info` shows (sizes in bytes)."""
    usage = vol.usage()
    return {
        "image": image,
        "format_version": vol.sb.version,
        "uuid": vol.sb.uuid_str,
        "block_size": BLOCK_SIZE,
        "size": usage["total"] * BLOCK_SIZE,
        "used": usage["used"] * BLOCK_SIZE,
        "free": usage["free"] * BLOCK_SIZE,
        "snapshot_only": usage["snapshot_only"] * BLOCK_SIZE,
        "cp_count": vol.root.cp_count,
        "last_cp_ns": vol.root.time_ns,
        "created_ns": vol.sb.created_ns,
        "snapshots": len(vol.snapshots),
        "root_slots": [{"vbn": st.vbn, "cp_count": st.cp_count,
                        "state": "valid" if st.valid else "blank" if st.blank else "damaged",
                        "problem": st.problem} for st in vol.slots],
        "root_warning": vol.root_warning,
    }


def fsck_result(report: FsckReport) -> dict[str, Any]:
    return {"clean": report.clean, "problems": report.problems, "stats": dict(report.stats)}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("a control message is a JSON object")
    return value


def call(entry: MountEntry, op: str, timeout: float | None = None, **args: Any) -> Any:
    """Send one request to the mount process of `entry`; its result, or ControlError."""
    where = f"the mount of {entry.image} on {entry.mountpoint} (process {entry.pid})"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(entry.socket)
            s.sendall(encode({"op": op, "args": args}))
            chunks = []
            size = 0
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > 64 * MAX_MESSAGE:
                    raise ControlError(f"{where} sent an oversized answer")
    except OSError as e:
        raise ControlError(f"cannot reach {where} through {entry.socket}: "
                           f"{e.strerror or e}") from None
    try:
        answer = decode(b"".join(chunks))
    except ValueError:
        raise ControlError(f"{where} closed the control socket without an answer") from None
    if not answer.get("ok"):
        code = answer.get("code")
        raise ControlError(str(answer.get("error", "request failed")),
                           code=None if code is None else str(code))
    return answer.get("result")
