"""The owner without FUSE (`python -m snapvol.daemon.owner IMAGE`, the daemon's core): the
CLI reaches it through the registry as it reaches a mount, the protocol's refusals, and a
clean stop. Needs no /dev/fuse."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapvol.control import protocol, registry
from snapvol.control.protocol import EBADREQ, ENOOP, EVERSION, ControlError
from snapvol.streams.imagestream import HEADER_PAYLOAD, record_size

SNAPVOL = [sys.executable, "-m", "snapvol.cli.main"]


@dataclass
class Owned:
    image: Path
    env: dict[str, str]
    proc: subprocess.Popen[str]

    def snapvol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*SNAPVOL, *args], env=self.env, capture_output=True,
                              text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"snapvol {' '.join(args)}: {done.stdout}{done.stderr}")
        return done

    def entry(self) -> registry.MountEntry:
        old = os.environ.get("SNAPVOL_RUN_DIR")
        os.environ["SNAPVOL_RUN_DIR"] = self.env["SNAPVOL_RUN_DIR"]
        try:
            found = registry.find_image(self.image)
        finally:
            if old is None:
                del os.environ["SNAPVOL_RUN_DIR"]
            else:
                os.environ["SNAPVOL_RUN_DIR"] = old
        assert found is not None
        return found


@pytest.fixture
def owned(tmp_path: Path) -> Iterator[Owned]:
    run_dir = tempfile.mkdtemp(prefix="svown", dir="/tmp")  # short: a unix socket path
    env = dict(os.environ, SNAPVOL_RUN_DIR=run_dir)
    image = tmp_path / "vol.img"
    subprocess.run([*SNAPVOL, "create", str(image), "--size", "256M"], env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "snapvol.daemon.owner", str(image)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"owning {image} (process {proc.pid})"), (
            line, proc.stderr.read() if proc.stderr else "")
        yield Owned(image, env, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run(["rm", "-rf", run_dir], check=False)


def test_the_cli_reaches_an_owner_without_a_mount(tmp_path: Path, owned: Owned) -> None:
    img = str(owned.image)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100_000)
    # The owner holds the exclusive lock: commands that need the volume itself say who.
    held = owned.snapvol("put", img, str(src / "a"), "/a", check=False)
    assert held.returncode == 2
    assert f"owned by process {owned.proc.pid}" in held.stderr and "stop it" in held.stderr
    offline = owned.snapvol("fsck", img, check=False)
    assert offline.returncode == 2 and f"owned by process {owned.proc.pid}" in offline.stderr
    assert "--online" in offline.stderr
    info = json.loads(owned.snapvol("info", "--json", img).stdout)
    assert info["size"] == 256 << 20 and info["snapshots"] == 0
    assert "created snapshot s1" in owned.snapvol("snap", "create", img, "s1").stdout
    assert [r["name"] for r in json.loads(owned.snapvol("snap", "list", "--json",
                                                        img).stdout)] == ["s1"]
    stream = tmp_path / "s1.stream"
    owned.snapvol("send", img, "s1", "-o", str(stream))
    planned = json.loads(owned.snapvol("send", img, "s1", "--dry-run", "--json").stdout)
    assert stream.stat().st_size == planned["bytes"]
    checked = json.loads(owned.snapvol("fsck", "--online", "--json", img).stdout)
    assert checked["clean"] and checked["stats"]["snapshots"] == 1
    # Not a mount: `mounts` does not list it, and it is no mount point to unmount.
    assert json.loads(owned.snapvol("mounts", "--json").stdout) == []

    hello = protocol.call(owned.entry(), "hello", timeout=10)
    assert hello["versions"] == [protocol.VERSION] and hello["pid"] == owned.proc.pid
    assert hello["mountpoint"] == "" and hello["read_only"] is False
    assert {"send", "send_plan", "snap_create", "stop"} <= set(hello["ops"])
    assert "unmount" not in hello["ops"] and "refresh" not in hello["ops"]  # FUSE's own

    stopped = protocol.call(owned.entry(), "stop", timeout=10)
    assert stopped == {"pid": owned.proc.pid}
    assert owned.proc.wait(timeout=60) == 0
    assert owned.proc.stderr is not None
    log = owned.proc.stderr.read()
    assert "stopping: stop requested" in log and " ERROR" not in log
    # Stopped cleanly: the registry entry went, and the stream matches a local send.
    assert not list(Path(owned.env["SNAPVOL_RUN_DIR"]).glob("*.json"))
    local = tmp_path / "local.stream"
    owned.snapvol("send", img, "s1", "-o", str(local))
    skip = record_size(HEADER_PAYLOAD)
    assert local.read_bytes()[skip:] == stream.read_bytes()[skip:]
    assert owned.snapvol("fsck", img).returncode == 0
    copy = tmp_path / "copy.img"
    owned.snapvol("receive", str(copy), "--create", "-i", str(stream))
    assert owned.snapvol("verify", f"{img}@s1", str(copy)).returncode == 0


def test_refusals_of_the_protocol(owned: Owned) -> None:
    entry = owned.entry()
    with pytest.raises(ControlError, match="does not serve the control operation 'nope'"
                       ) as e:
        protocol.call(entry, "nope", timeout=10)
    assert e.value.code == ENOOP and "snap_create" in str(e.value)
    with pytest.raises(ControlError, match="takes no argument 'bogus'") as e:
        protocol.call(entry, "snap_create", timeout=10, name="x", bogus=1)
    assert e.value.code == EBADREQ
    with pytest.raises(ControlError, match="needs 'name'"):
        protocol.call(entry, "snap_delete", timeout=10)
    with pytest.raises(ControlError, match="'shadow' cannot be 'yes'"):
        protocol.call(entry, "snap_create", timeout=10, name="x", shadow="yes")
    with pytest.raises(ControlError, match="'share' cannot be True"):
        protocol.call(entry, "fsck", timeout=10, share=True)
    with pytest.raises(ControlError, match="takes no data frames"), \
            protocol.stream(entry, "info", timeout=10, upload=[b"x"]):
        pass
    # A version the owner does not speak is refused before the operation is looked at.
    for line, said in ((b'{"v": 99, "op": "info", "args": {}}\n', "version 99"),
                       (b'{"op": "info", "args": {}}\n', "no protocol version")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(entry.socket)
            s.sendall(line)
            answer = json.loads(s.makefile("rb").readline())
        assert answer["ok"] is False and answer["code"] == EVERSION
        assert answer["versions"] == [protocol.VERSION] and said in answer["error"]
    # A send the owner cannot make is refused before any frame.
    with pytest.raises(ControlError, match="no snapshot named 'gone'"), \
            protocol.stream(entry, "send", timeout=10, snap="gone"):
        pass
    # Still serving after all of that.
    assert protocol.call(entry, "ping", timeout=10)["pid"] == owned.proc.pid
