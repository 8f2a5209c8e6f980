"""The control protocol's framing, both ends of it, and the client.

The process that owns a volume (a mount, or the daemon: `snapvol.daemon.owner`) holds
its exclusive lock, so other commands on that image send the owner requests over a unix
socket instead of opening the image. One request per connection:

1. the client sends the request line, a JSON object and a newline:
   `{"v": 1, "op": NAME, "args": {...}}`, with `"stream": true` when data frames follow
   it (an upload: what a receive into an owner-held volume sends);
2. the owner answers with one line, `{"ok": true, "result": ...}` or
   `{"ok": false, "error": MESSAGE, "code": CODE}`; MESSAGE is the one-line error the
   command would have printed had it opened the image itself, CODE names a refusal the
   client may act on (`EBUSY`, `EVERSION`, `ENOOP`, `EBADREQ`) or is null;
3. an answer with `"stream": true` is followed by data frames, then an end frame, then a
   trailer line of the same form as an answer (`ok` false if the operation failed
   part way: the data before it is then incomplete), and the owner closes.

A data frame is a 4-byte little-endian length N (1 to MAX_FRAME), then N bytes; the end
frame is a length of 0. Lines are at most MAX_LINE bytes. docs/FORMAT.md has the bytes.

`v` is the protocol version (VERSION). An owner refuses a version it does not speak with
code EVERSION and the list of those it does (`"versions"`), and an operation it does not
serve with code ENOOP, before it reads anything else; `hello` tells a client both.

The pure part (`encode_line`, `decode_line`, `frame_header`, `frame_length`) is shared by
the blocking client here (`call`, `stream`) and the trio side the owner uses
(`Connection`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import trio

from snapvol.errors import SnapvolError

VERSION = 1
"""The protocol version this side speaks (requests carry it as `v`)."""
VERSIONS = (VERSION,)
"""Every version an owner answers."""
MAX_LINE = 1 << 20
"""The longest request, answer or trailer line (a snapshot list of 255 entries is ~70 KiB)."""
MAX_FRAME = 16 << 20
"""The largest data frame. An image stream's BLOCKS record is at most 1 MiB and change."""

_FRAME = struct.Struct("<I")
FRAME_HEADER = _FRAME.size
END_FRAME = _FRAME.pack(0)

# Refusal codes a client may act on.
EBUSY = "EBUSY"  # the mount is in use (unmount)
EVERSION = "EVERSION"  # a protocol version the owner does not speak
ENOOP = "ENOOP"  # an operation the owner does not serve
EBADREQ = "EBADREQ"  # a malformed request (bad JSON, arguments of the wrong type)


class ControlError(SnapvolError):
    """The owner refused a request, or could not be reached. `code` names a refusal the
    caller may act on (EBUSY: the mount is in use; see the module docstring), else None."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Peer(Protocol):
    """Where a request goes: an owner's socket, and how to name the owner in errors
    (`registry.MountEntry` is one)."""

    @property
    def socket(self) -> str: ...

    @property
    def where(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A socket found some other way than the registry (tests, the daemon's own)."""

    socket: str
    where: str = "the owner"


# ---- the pure part ---------------------------------------------------------------------------
def encode_line(message: dict[str, Any]) -> bytes:
    line = json.dumps(message).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ControlError(f"a control message of {len(line)} bytes is over the "
                           f"{MAX_LINE}-byte limit", EBADREQ)
    return line


def decode_line(line: bytes) -> dict[str, Any]:
    """One request, answer or trailer line; ValueError if it is not a JSON object."""
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("a control message is a JSON object")
    return value


def request(op: str, args: dict[str, Any], *, upload: bool = False) -> dict[str, Any]:
    """The request line's object for operation `op`."""
    out: dict[str, Any] = {"v": VERSION, "op": op, "args": args}
    if upload:
        out["stream"] = True
    return out


def frame_header(length: int) -> bytes:
    """The 4 bytes before a data frame of `length` bytes (0: the end frame)."""
    if not 0 <= length <= MAX_FRAME:
        raise ValueError(f"a data frame of {length} bytes is over the {MAX_FRAME} limit")
    return _FRAME.pack(length)


def frame_length(header: bytes) -> int:
    """The length a frame header announces; ValueError past MAX_FRAME."""
    (length,) = _FRAME.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"a data frame of {length} bytes is over the {MAX_FRAME} limit")
    return int(length)


def refusal(answer: dict[str, Any]) -> ControlError:
    code = answer.get("code")
    return ControlError(str(answer.get("error", "request failed")),
                        code=None if code is None else str(code))


# ---- the client (blocking) -------------------------------------------------------------------
@dataclass
class Answer:
    """A streamed answer: `result` is the header's; iterating yields the data frames,
    and then `final` holds the trailer's result (ControlError if it reports a failure).
    An answer that did not stream yields nothing and `final` is `result`."""

    result: Any
    streaming: bool
    _reader: BinaryIO
    _where: str
    final: Any = None
    _done: bool = field(default=False)

    def __iter__(self) -> Iterator[bytes]:
        if self._done:
            return
        self._done = True
        if not self.streaming:
            self.final = self.result
            return
        reader, where = self._reader, self._where
        while True:
            header = reader.read(FRAME_HEADER)
            if len(header) < FRAME_HEADER:
                raise ControlError(f"{where} closed the control socket in the middle of "
                                   "the stream: it is incomplete")
            try:
                length = frame_length(header)
            except ValueError as e:
                raise ControlError(f"{where} sent a bad frame: {e}") from None
            if length == 0:
                break
            data = reader.read(length)
            if len(data) < length:
                raise ControlError(f"{where} closed the control socket in the middle of "
                                   "the stream: it is incomplete")
            yield data
        trailer = _read_answer(reader, where)
        if not trailer.get("ok"):
            raise refusal(trailer)
        self.final = trailer.get("result")


def _read_answer(reader: BinaryIO, where: str) -> dict[str, Any]:
    line = reader.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ControlError(f"{where} sent an oversized answer")
    try:
        return decode_line(line)
    except ValueError:
        raise ControlError(f"{where} closed the control socket without an answer") from None


@contextlib.contextmanager
def stream(peer: Peer, op: str, *, timeout: float | None = None,
           upload: Iterable[bytes | bytearray | memoryview] | None = None,
           **args: Any) -> Iterator[Answer]:
    """Send one request (with the data frames of `upload` after it, if given) and hand
    back its answer, whose data frames are read as the caller iterates; ControlError if
    the owner refused or cannot be reached. `timeout` bounds each socket operation."""
    where = peer.where
    with contextlib.ExitStack() as stack:
        try:
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            s.settimeout(timeout)
            s.connect(peer.socket)
            s.sendall(encode_line(request(op, args, upload=upload is not None)))
            if upload is not None:
                _upload(s, upload)
            reader = stack.enter_context(s.makefile("rb"))
            answer = _read_answer(reader, where)
        except OSError as e:
            raise ControlError(f"cannot reach {where} through {peer.socket}: "
                               f"{e.strerror or e}") from None
        if not answer.get("ok"):
            raise refusal(answer)
        try:
            yield Answer(answer.get("result"), bool(answer.get("stream")), reader, where)
        except OSError as e:
            raise ControlError(f"lost {where} in the middle of the stream: "
                               f"{e.strerror or e}") from None


def _upload(s: socket.socket, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
    """The request's data frames. An owner that refuses part way answers and closes: the
    write then fails (EPIPE), and the answer that says why is read next."""
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            for at in range(0, len(view), MAX_FRAME):
                part = view[at : at + MAX_FRAME]
                s.sendall(frame_header(len(part)))
                s.sendall(part)
        s.sendall(END_FRAME)
    except (BrokenPipeError, ConnectionResetError):
        return


def call(peer: Peer, op: str, timeout: float | None = None, **args: Any) -> Any:
    """Send one request to the owner at `peer`; its result, or ControlError. A streamed
    answer is read through and its trailer's result returned."""
    with stream(peer, op, timeout=timeout, **args) as answer:
        for _ in answer:
            pass
        return answer.final


# ---- the owner's side (trio) -----------------------------------------------------------------
class Connection:
    """One accepted control connection, read and written in the protocol's units."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = await self.stream.receive_some(1 << 20)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    async def read_line(self) -> bytes:
        """The next line (without checking it); ValueError past MAX_LINE."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > MAX_LINE:
                raise ValueError(f"a control line is over the {MAX_LINE}-byte limit")
            if not await self._fill():
                line = bytes(self._buf)
                self._buf.clear()
                return line

    async def read_frame(self) -> bytes | None:
        """The next data frame's bytes; None at the end frame. ValueError if the peer
        closed before the end frame or announced a frame past MAX_FRAME."""
        while len(self._buf) < FRAME_HEADER:
            if not await self._fill():
                raise ValueError("the request's data ended before its end frame")
        length = frame_length(bytes(self._buf[:FRAME_HEADER]))
        while len(self._buf) < FRAME_HEADER + length:
            if not await self._fill():
                raise ValueError("the request's data ended in the middle of a frame")
        data = bytes(self._buf[FRAME_HEADER : FRAME_HEADER + length])
        del self._buf[: FRAME_HEADER + length]
        return data if length else None

    async def send_line(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(encode_line(message))

    async def send_frame(self, data: bytes | bytearray | memoryview) -> None:
        """One data frame (the caller keeps each within MAX_FRAME)."""
        view = memoryview(data).cast("B")
        if not view:
            return  # a frame of 0 bytes would end the stream
        if len(view) < 65536:  # one write; a large frame is not copied to join it
            await self.stream.send_all(frame_header(len(view)) + view)
            return
        await self.stream.send_all(frame_header(len(view)))
        await self.stream.send_all(view)

    async def send_end(self) -> None:
        await self.stream.send_all(END_FRAME)

    async def aclose(self) -> None:
        await self.stream.aclose()
