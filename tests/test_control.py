"""The control protocol in one process: framing, typed arguments, streams both ways, a
stream that fails part way, and the table of operations (control/protocol.py, ops.py)."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from snapvol.control import ops, protocol
from snapvol.control.ops import Exchange, NoArgs, Op, OpTable
from snapvol.control.protocol import ControlError, Endpoint
from snapvol.errors import SnapvolError


def test_frames_and_lines() -> None:
    assert protocol.frame_header(5) == b"\x05\x00\x00\x00"
    assert protocol.frame_length(protocol.frame_header(protocol.MAX_FRAME)) == protocol.MAX_FRAME
    assert protocol.frame_header(0) == protocol.END_FRAME
    with pytest.raises(ValueError, match="over the"):
        protocol.frame_length((protocol.MAX_FRAME + 1).to_bytes(4, "little"))
    with pytest.raises(ValueError):
        protocol.frame_header(protocol.MAX_FRAME + 1)
    line = protocol.encode_line(protocol.request("info", {}))
    assert line.endswith(b"\n") and json.loads(line) == {"v": 1, "op": "info", "args": {}}
    assert json.loads(protocol.encode_line(protocol.request("x", {}, upload=True)))["stream"]
    with pytest.raises(ControlError, match="over the"):
        protocol.encode_line({"big": "x" * protocol.MAX_LINE})
    with pytest.raises(ValueError, match="JSON object"):
        protocol.decode_line(b"[1]\n")


def test_arguments_are_typed() -> None:
    req = ops.parse(ops.SNAP_CREATE, {"name": "a", "shadow": True})
    assert req == ops.SnapCreate("a", shadow=True)
    assert ops.parse(ops.FSCK, {"share": 1}) == ops.Fsck(1)  # an int is a float
    assert ops.parse(ops.SEND, {"snap": "s", "base": None}) == ops.SendRequest("s")
    assert ops.parse(ops.INFO, None) == NoArgs()
    for args, why in (({"name": 3}, "'name' cannot be 3"), ({}, "needs 'name'"),
                      ({"name": "a", "x": 1}, "no argument 'x'"),
                      ({"name": "a", "shadow": 1}, "'shadow' cannot be 1")):
        with pytest.raises(ControlError, match=why) as e:
            ops.parse(ops.SNAP_CREATE, args)
        assert e.value.code == protocol.EBADREQ
    with pytest.raises(ControlError, match="not an object"):
        ops.parse(ops.INFO, [1])
    assert len({op.name for op in ops.OPS}) == len(ops.OPS)
    assert [op.name for op in ops.OPS if op.streams] == ["send"]


@dataclass(frozen=True, slots=True)
class Echo:
    times: int = 1


ECHO = Op("echo", Echo, "the upload back, `times` over", upload=True, streams=True)
BROKEN = Op("broken", NoArgs, "streams a little, then fails", streams=True)
PLAIN = Op("plain", NoArgs, "no stream")


async def _echo(req: Echo, ex: Exchange) -> dict[str, Any]:
    got = [data async for data in ex.upload()]
    await ex.begin({"frames": len(got)})
    sent = 0
    for _ in range(req.times):
        for data in got:
            await ex.send(data)
            sent += len(data)
    return {"bytes": sent}


async def _broken(req: NoArgs, ex: Exchange) -> None:
    await ex.begin({"started": True})
    await ex.send(b"x" * 1000)
    raise SnapvolError("block 7 fails its checksum: the send stopped")


async def _plain(req: NoArgs, ex: Exchange) -> str:
    return "plain answer"


def _serve(client: Callable[[Endpoint], None]) -> None:
    """Serve ECHO, BROKEN and PLAIN on a unix socket while `client` runs on a thread."""
    table = OpTable("the test owner")
    table.bind_all([(ECHO, _echo), (BROKEN, _broken), (PLAIN, _plain)])
    path = str(Path(tempfile.mkdtemp(prefix="svctl", dir="/tmp")) / "s.sock")

    async def main() -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, table.handle,
                               [trio.SocketListener(sock)])
            await trio.to_thread.run_sync(client, Endpoint(path, "the test owner"))
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_streams_both_ways() -> None:
    big = bytes(range(256)) * ((protocol.MAX_FRAME // 256) + 1)  # past one frame

    def client(peer: Endpoint) -> None:
        with protocol.stream(peer, "echo", timeout=30, times=2,
                             upload=[b"abc", big, memoryview(b"def")]) as answer:
            assert answer.result == {"frames": 4}  # big went as two frames
            got = b"".join(answer)
        assert got == (b"abc" + big + b"def") * 2
        assert answer.final == {"bytes": len(got)}
        assert protocol.call(peer, "plain", timeout=30) == "plain answer"
        with protocol.stream(peer, "plain", timeout=30) as plain:
            assert list(plain) == [] and plain.final == "plain answer"
        with pytest.raises(ControlError, match="takes no data frames"), \
                protocol.stream(peer, "plain", timeout=30, upload=[b"x"]):
            pass

    _serve(client)


def test_a_stream_that_fails_part_way() -> None:
    def client(peer: Endpoint) -> None:
        with protocol.stream(peer, "broken", timeout=30) as answer:
            assert answer.result == {"started": True}
            chunks = []
            with pytest.raises(ControlError, match=r"^block 7 fails its checksum"):
                for chunk in answer:
                    chunks.append(chunk)
        assert chunks == [b"x" * 1000]  # what came before the failure, no more

    _serve(client)


def test_a_stream_cut_short(tmp_path: Path) -> None:
    path = str(Path(tempfile.mkdtemp(prefix="svctl", dir="/tmp")) / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(protocol.encode_line({"ok": True, "result": 1, "stream": True})
                             + protocol.frame_header(3) + b"abc" + protocol.frame_header(9)
                             + b"abc")

        t = threading.Thread(target=serve)
        t.start()
        with protocol.stream(Endpoint(path, "the cut owner"), "send", timeout=10) as answer, \
                pytest.raises(ControlError, match="the cut owner closed the control socket "
                              "in the middle of the stream"):
            list(answer)
        t.join(timeout=10)
