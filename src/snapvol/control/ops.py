"""The control protocol's operations: each a typed request, and a table of handlers.

An operation is an `Op`: its name on the wire, the dataclass its `args` decode into
(`parse` checks every field's type, and refuses unknown or missing ones), and whether it
takes data frames after its request (`upload`) or may answer with them (`streams`). The
owner (`snapvol.daemon.owner`) binds a handler to each operation it serves in an
`OpTable`; a front end it carries (the FUSE mount) binds the operations only it can
answer (`unmount`, `refresh`) and replaces those it answers its own way (`snap_delete`
refuses while files of the snapshot are open in the mount). `OpTable.handle` serves one
connection: it checks the version, finds the operation, decodes its arguments, runs the
handler and answers, with the refusals of `protocol` (EVERSION, ENOOP, EBADREQ).

A handler is `async (request, exchange) -> result`: the result is a dataclass or any
JSON-able value. One that streams calls `await exchange.begin(header)` and then
`await exchange.send(chunk)` for each chunk, and its return value is the trailer's
result; an exception after `begin` becomes a failed trailer, so the client knows the data
is incomplete. One that takes an upload reads it with `async for data in exchange.upload()`.

Also here: the answers the owner and the CLI share (`volume_facts`, `fsck_result`), so
`snapvol info` prints the same fields whether it opened the image or asked its owner.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from snapvol.control import protocol
from snapvol.control.protocol import EBADREQ, ENOOP, EVERSION, ControlError
from snapvol.engine.fsck import ONLINE_SHARE, FsckReport
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError
from snapvol.layout.constants import BLOCK_SIZE

log = logging.getLogger("snapvol.control")

REQUEST_TIMEOUT = 10.0
"""How long a client may take to send its request line, and an owner to send a plain
answer (a stream's frames have no deadline: a slow reader slows the stream)."""

R = TypeVar("R")


# ---- the requests ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NoArgs:
    """An operation that takes no arguments."""


@dataclass(frozen=True, slots=True)
class SnapCreate:
    name: str
    shadow: bool = False
    source: str | None = None  # with shadow: shadow this existing snapshot
    replica_for: str | None = None  # hex volume UUID: a replication snapshot for it


@dataclass(frozen=True, slots=True)
class SnapName:
    name: str


@dataclass(frozen=True, slots=True)
class SnapRename:
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class Fsck:
    share: float = ONLINE_SHARE


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A send of snapshot `snap` (incremental from `base`, or the rest of a transfer
    given its resume token), as `snapvol send` takes them."""

    snap: str
    base: str | None = None
    resume: str | None = None


@dataclass(frozen=True, slots=True)
class Unmount:
    force: bool = False


# ---- the operations --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Op(Generic[R]):
    name: str
    request: type[R]
    doc: str
    upload: bool = False  # data frames follow the request
    streams: bool = False  # the answer may be followed by data frames


HELLO = Op("hello", NoArgs, "the versions and operations this owner serves, its image")
PING = Op("ping", NoArgs, "the owner's pid and mount point")
INFO = Op("info", NoArgs, "what `info --json` prints")
SNAP_CREATE = Op("snap_create", SnapCreate, "take a snapshot: {name, cp_count}")
SNAP_DELETE = Op("snap_delete", SnapName, "delete a snapshot: {freed_blocks}")
SNAP_RENAME = Op("snap_rename", SnapRename, "rename a snapshot: {name}")
SNAP_LIST = Op("snap_list", NoArgs, "the snapshots: the fields of SnapshotInfo")
FSCK = Op("fsck", Fsck, "the online check of the committed root: {clean, problems, stats}")
SEND_PLAN = Op("send_plan", SendRequest,
               "what a send would carry: {snapshot, base, bytes, blocks, resumed_from_vbn}")
SEND = Op("send", SendRequest, "the image stream: the plan's facts, then the stream's "
          "bytes as data frames; trailer {bytes}", streams=True)
REFRESH = Op("refresh", NoArgs, "a read-only mount loads a newer root now: "
             "{changed, cp_count}")
UNMOUNT = Op("unmount", Unmount, "unmount (refused with EBUSY while in use): {pid}")
STOP = Op("stop", NoArgs, "commit a last CP and stop, as SIGTERM does: {pid}")

OPS: tuple[Op[Any], ...] = (HELLO, PING, INFO, SNAP_CREATE, SNAP_DELETE, SNAP_RENAME,
                            SNAP_LIST, FSCK, SEND_PLAN, SEND, REFRESH, UNMOUNT, STOP)
"""Every operation of the protocol (an owner serves a subset: `hello` lists it)."""


# ---- decoding arguments ----------------------------------------------------------------------
_SCALARS: dict[type, tuple[type, ...]] = {str: (str,), bool: (bool,), int: (int,),
                                          float: (int, float)}


def _accepts(hint: Any, value: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    kinds = _SCALARS.get(hint)
    if kinds is None:
        raise TypeError(f"argument type {hint!r} has no JSON form")
    if isinstance(value, bool) and hint is not bool:
        return False  # JSON true is no number
    return isinstance(value, kinds)


def parse(op: Op[R], args: Any) -> R:
    """`args` as the request of `op`; ControlError (EBADREQ) naming a field that is
    unknown, missing or of the wrong type."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ControlError(f"bad control request: the args of {op.name} are not an object",
                           EBADREQ)
    cls = op.request
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ControlError(f"bad control request: {op.name} takes no argument "
                           f"{unknown[0]!r}", EBADREQ)
    for name, f in fields.items():
        if name not in args:
            if (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING):
                raise ControlError(f"bad control request: {op.name} needs {name!r}", EBADREQ)
            continue
        if not _accepts(hints[name], args[name]):
            raise ControlError(f"bad control request: {op.name}'s {name!r} cannot be "
                               f"{args[name]!r}", EBADREQ)
    return cls(**args)


def to_json(result: Any) -> Any:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return result


# ---- serving ---------------------------------------------------------------------------------
class Exchange:
    """What a handler may do beyond returning its result: read the request's data frames
    (`upload`), or answer with a stream (`begin`, then `send`)."""

    def __init__(self, conn: protocol.Connection, op: Op[Any], uploading: bool) -> None:
        self._conn = conn
        self._op = op
        self._uploading = uploading
        self.began = False

    async def upload(self) -> AsyncIterator[bytes]:
        """The request's data frames, up to its end frame."""
        if not self._uploading:
            return
        while (data := await self._conn.read_frame()) is not None:
            yield data
        self._uploading = False

    async def begin(self, header: Any) -> None:
        """Answer with `header` now; data frames follow (`send`)."""
        if not self._op.streams:
            raise TypeError(f"operation {self._op.name} does not stream its answer")
        await self._conn.send_line({"ok": True, "result": to_json(header), "stream": True})
        self.began = True

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """One chunk of the answer's stream, in frames of at most MAX_FRAME."""
        view = memoryview(data).cast("B")
        for at in range(0, len(view), protocol.MAX_FRAME):
            await self._conn.send_frame(view[at : at + protocol.MAX_FRAME])


Handler = Callable[[Any, Exchange], Awaitable[Any]]


class OpTable:
    """The operations one owner serves, each with its handler."""

    def __init__(self, where: str) -> None:
        self.where = where  # names the owner in refusals
        self._ops: dict[str, tuple[Op[Any], Handler]] = {}

    def bind(self, op: Op[R], handler: Callable[[R, Exchange], Awaitable[Any]]) -> None:
        """Serve `op` with `handler` (replacing a handler bound before)."""
        self._ops[op.name] = (op, handler)

    def bind_all(self, bindings: Iterable[tuple[Op[Any], Handler]]) -> None:
        for op, handler in bindings:
            self.bind(op, handler)

    def names(self) -> list[str]:
        return sorted(self._ops)

    def hello(self) -> dict[str, Any]:
        return {"versions": list(protocol.VERSIONS), "ops": self.names()}

    def find(self, request: dict[str, Any]) -> tuple[Op[Any], Handler]:
        """The operation a request names, after its version is checked."""
        version = request.get("v")
        if version not in protocol.VERSIONS:
            said = "no protocol version" if version is None else f"version {version!r}"
            raise _VersionRefused(
                f"{self.where} speaks control protocol version "
                f"{', '.join(map(str, protocol.VERSIONS))}, and the request has {said}: "
                "use the snapvol that started it (or restart it with this one)")
        name = request.get("op")
        found = self._ops.get(name) if isinstance(name, str) else None
        if found is None:
            raise ControlError(f"{self.where} does not serve the control operation "
                               f"{name!r} (it serves {', '.join(self.names())})", ENOOP)
        return found

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection: one request, its answer, and close."""
        conn = protocol.Connection(stream)
        exchange: Exchange | None = None
        try:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    line = await conn.read_line()
                request = protocol.decode_line(line)
            except (ValueError, trio.TooSlowError) as e:
                raise ControlError(f"bad control request: {e or 'none came in time'}",
                                   EBADREQ) from None
            op, handler = self.find(request)
            req = parse(op, request.get("args"))
            uploading = bool(request.get("stream"))
            if uploading and not op.upload:
                raise ControlError(f"bad control request: {op.name} takes no data frames",
                                   EBADREQ)
            exchange = Exchange(conn, op, uploading)
            result = to_json(await handler(req, exchange))
            answer: dict[str, Any] = {"ok": True, "result": result}
        except _VersionRefused as e:
            answer = {"ok": False, "error": str(e), "code": EVERSION,
                      "versions": list(protocol.VERSIONS)}
        except ControlError as e:
            answer = {"ok": False, "error": str(e), "code": e.code}
        except SnapvolError as e:
            answer = {"ok": False, "error": str(e)}
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await conn.aclose()  # the client went away: nobody to answer
            return
        except (ValueError, KeyError, TypeError) as e:
            answer = {"ok": False, "error": f"bad control request: {e}"}
        except Exception as e:
            log.exception("control request failed")
            answer = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        streaming = exchange is not None and exchange.began
        with trio.CancelScope(shield=not streaming,
                              deadline=trio.current_time() + REQUEST_TIMEOUT):
            try:
                if streaming:
                    await conn.send_end()  # then the trailer, in the answer's form
                await conn.send_line(answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await conn.aclose()


class _VersionRefused(ControlError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EVERSION)


# ---- the answers the owner and the CLI share -----------------------------------------------
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
