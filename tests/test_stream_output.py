"""Where `send -o` and `dump -o` write (issue 10 item 1): a new file appears only when
complete and never replaces one; devices and FIFOs are written as they are and never
fsynced or removed, whatever happens."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from snapvol.cli.output import stream_output
from snapvol.errors import SnapvolError
from test_cli import COMMAND, fails, run, volume_state
from test_stream_cli import same_as_snapshot


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src.img"
    run("create", src, "--size", "32M")
    (tmp_path / "a.bin").write_bytes(os.urandom(50_000))
    run("put", src, tmp_path / "a.bin")
    run("snap", "create", src, "one")
    return src


def leftovers(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.name.endswith(".partial"))


def test_send_to_a_fifo_that_receive_reads(source: Path, tmp_path: Path) -> None:
    """The FIFO a receive reads stays a FIFO; both ends exit 0."""
    fifo = tmp_path / "stream.fifo"
    os.mkfifo(fifo)
    dst = tmp_path / "dst.img"
    reader = subprocess.Popen([*COMMAND, "receive", str(dst), "--create", "-i", str(fifo)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = subprocess.run([*COMMAND, "send", str(source), "one", "-o", str(fifo)],
                          capture_output=True, text=True, timeout=120)
    out, err = reader.communicate(timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert reader.returncode == 0, err
    assert "received snapshot one (full)" in out
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    same_as_snapshot(dst, source, "one", tmp_path)


def test_send_and_dump_to_a_character_device(source: Path, tmp_path: Path) -> None:
    """A device node (here a private copy of /dev/null's) is written, not fsynced
    (EINVAL) and not removed; `dump -o` takes one too, as it would a tape drive."""
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    run("send", source, "one", "-o", null)
    assert stat.S_ISCHR(null.lstat().st_mode)
    run("dump", source, "one", "--level", "0", "-o", null)
    assert stat.S_ISCHR(null.lstat().st_mode)
    assert b"one" in run("dump", "--list", source).stdout


def test_an_existing_file_is_never_replaced(source: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept.svs"
    kept.write_bytes(b"the only copy")
    for args in (["send", source, "one"], ["dump", source, "one", "--level", "0"]):
        err = fails(*args, "-o", kept, says=f"{kept} already exists: a stream or dump file "
                                            "may be the only copy of a snapshot")
        assert "remove it first or name a new file" in err
        assert kept.read_bytes() == b"the only copy"
    assert b"no dumps" in run("dump", "--list", source).stdout
    assert leftovers(tmp_path) == []


def test_a_new_file_appears_only_when_complete(tmp_path: Path) -> None:
    path = tmp_path / "out.svs"
    with stream_output(str(path)) as out:
        out.write(b"x" * 100_000)
        out.flush()
        assert not path.exists()  # readers never see a partial stream under the name
        assert len(leftovers(tmp_path)) == 1
    assert path.read_bytes() == b"x" * 100_000
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [SnapvolError("the send failed part way"),
                                   KeyboardInterrupt()])
def test_a_failure_part_way_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "out.svs"
    with pytest.raises(type(error)), stream_output(str(path)) as out:
        out.write(b"x" * 100_000)
        raise error
    assert not path.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [SnapvolError("the send failed part way"),
                                   KeyboardInterrupt()])
def test_a_failure_never_removes_a_device_or_fifo(tmp_path: Path, error: BaseException) -> None:
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(type(error)), stream_output(str(null)) as out:
        out.write(b"x" * 100_000)
        raise error
    assert stat.S_ISCHR(null.lstat().st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()
    drain = threading.Thread(target=lambda: got.extend(fifo.read_bytes()))
    drain.start()
    with pytest.raises(type(error)), stream_output(str(fifo)) as out:
        out.write(b"y" * 100_000)
        out.flush()
        raise error
    drain.join(timeout=30)
    assert got == b"y" * 100_000
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_file_that_appears_meanwhile_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "out.svs"
    with pytest.raises(SnapvolError, match="appeared while the stream was written"), \
            stream_output(str(path)) as out:
        out.write(b"stream")
        path.write_bytes(b"someone else's")
    assert path.read_bytes() == b"someone else's"
    assert leftovers(tmp_path) == []


def test_a_failed_send_leaves_no_file(source: Path, tmp_path: Path) -> None:
    """The unknown base is found before the file is made; nothing is left either way."""
    out = tmp_path / "inc.svs"
    run("send", source, "one", "--base", "nope", "-o", out, code=2)
    assert not out.exists() and leftovers(tmp_path) == []
    _, snaps = volume_state(source)
    assert snaps == ["one"]
