"""`snapvol send` and `snapvol receive` as real processes: pipes, files, --dry-run sizes,
resume tokens in `info --json`, --abort, and bad input refused with one line and exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_cli import COMMAND, fails, json_of, run, volume_state


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A volume with snapshots one (a file) and two (more files, one changed)."""
    src = tmp_path / "src.img"
    run("create", src, "--size", "32M")
    (tmp_path / "a.txt").write_bytes(b"a" * 10_000)
    run("put", src, tmp_path / "a.txt")
    run("snap", "create", src, "one")
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 400)
    (tmp_path / "a.txt").write_bytes(b"A" * 12_000)
    run("put", src, tmp_path / "b.bin")
    run("rm", src, "/a.txt")
    run("put", src, tmp_path / "a.txt")
    run("snap", "create", src, "two")
    return src


def pipe(send_args: list[str], recv_args: list[str]) -> subprocess.CompletedProcess[bytes]:
    sender = subprocess.Popen([*COMMAND, "send", *send_args], stdout=subprocess.PIPE)
    proc = subprocess.run([*COMMAND, "receive", *recv_args], stdin=sender.stdout,
                          capture_output=True, timeout=120)
    assert sender.stdout is not None
    sender.stdout.close()
    assert sender.wait(timeout=60) == 0
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def same_as_snapshot(dst: Path, src: Path, snap: str, tmp_path: Path) -> None:
    """dst's active tree equals snapshot `snap` of src (compared via a restored copy)."""
    copy = tmp_path / f"restored-{snap}.img"
    copy.write_bytes(src.read_bytes())
    run("snap", "restore", copy, snap)
    tree, _ = volume_state(copy)
    got, _ = volume_state(dst)
    assert got == tree


def test_pipe_full_then_incremental(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    out = pipe([str(source), "one"], [str(dst), "--create"]).stdout.decode()
    assert "received snapshot one (full)" in out
    same_as_snapshot(dst, source, "one", tmp_path)
    out = pipe([str(source), "two", "--base", "one"], [str(dst)]).stdout.decode()
    assert "received snapshot two (incremental from one)" in out
    same_as_snapshot(dst, source, "two", tmp_path)
    _, snaps = volume_state(dst)
    assert snaps == ["one", "two"]
    facts = json_of("info", dst)
    assert isinstance(facts, dict) and facts["resume_token"] is None


def test_files_and_dry_run(source: Path, tmp_path: Path) -> None:
    full, inc = tmp_path / "full.svs", tmp_path / "inc.svs"
    run("send", source, "one", "-o", full)
    run("send", source, "two", "--base", "one", "-o", inc)
    dry = json_of("send", source, "two", "--base", "one", "--dry-run")
    assert isinstance(dry, dict) and dry["bytes"] == inc.stat().st_size
    text = run("send", source, "one", "--dry-run").stdout.decode()
    assert f"({full.stat().st_size} bytes" in text
    dst = tmp_path / "dst.img"
    run("receive", dst, "-i", full, "--create")
    result = json_of("receive", dst, "-i", inc)
    assert isinstance(result, dict) and result["snapshot"] == "two"
    same_as_snapshot(dst, source, "two", tmp_path)


def test_cut_stream_resume_and_abort(source: Path, tmp_path: Path) -> None:
    full, inc = tmp_path / "full.svs", tmp_path / "inc.svs"
    run("send", source, "one", "-o", full)
    run("send", source, "two", "--base", "one", "-o", inc)
    dst = tmp_path / "dst.img"
    run("receive", dst, "-i", full, "--create")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(inc.read_bytes()[: inc.stat().st_size * 3 // 4])
    err = fails("receive", dst, "-i", cut, says="truncated")
    assert "--resume svr1-" in err and "--abort" in err
    facts = json_of("info", dst)
    assert isinstance(facts, dict) and facts["receiving"] == "two"
    token = facts["resume_token"]
    assert isinstance(token, str)
    same_as_snapshot(dst, source, "one", tmp_path)  # the old state stays readable
    run("receive", dst, "--abort")
    facts = json_of("info", dst)
    assert isinstance(facts, dict) and facts["resume_token"] is None
    fails("receive", dst, "--abort", says="no partial receive")
    fails("receive", dst, "-i", cut, says="truncated")
    facts = json_of("info", dst)
    assert isinstance(facts, dict)
    rest = tmp_path / "rest.svs"
    run("send", source, "two", "--base", "one", "--resume", facts["resume_token"], "-o", rest)
    assert rest.stat().st_size < inc.stat().st_size
    out = run("receive", dst, "-i", rest).stdout.decode()
    assert "(resumed)" in out
    same_as_snapshot(dst, source, "two", tmp_path)


def test_bad_input(source: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"x" * 5000)
    dst = tmp_path / "dst.img"
    fails("receive", dst, "-i", garbage, "--create", says="not a snapvol image stream")
    assert not dst.exists()
    fails("send", source, "nope", "-o", tmp_path / "x", says="no snapshot named 'nope'")
    assert not (tmp_path / "x").exists()
    fails("send", source, "two", "--resume", "bogus", "--dry-run", says="not a valid resume")
    fails("send", source, "one", "--base", "two", "--dry-run", says="not older")
    inc = tmp_path / "inc.svs"
    run("send", source, "two", "--base", "one", "-o", inc)
    run("create", dst, "--size", "32M")
    fails("receive", dst, "-i", inc, says="does not hold the base snapshot 'one'")
    fails("receive", dst, "-i", inc, "--create", says="already exists")
    small = tmp_path / "small.img"
    run("create", small, "--size", "8M")
    full = tmp_path / "full.svs"
    run("send", source, "one", "-o", full)
    fails("receive", small, "-i", full, says="smaller than the source")
    fails("receive", dst, "--abort", "-i", full, says="--abort takes no stream")
    fails("receive", tmp_path / "missing.img", "-i", full, says="no such image")


def test_readers_in_other_processes_during_a_receive(source: Path, tmp_path: Path) -> None:
    """While `snapvol receive` waits half-way through a stream, `ls` and `info` in other
    processes see the old snapshot (and the partial receive); after it, the new one."""
    full, inc = tmp_path / "full.svs", tmp_path / "inc.svs"
    run("send", source, "one", "-o", full)
    run("send", source, "two", "--base", "one", "-o", inc)
    dst = tmp_path / "dst.img"
    run("receive", dst, "-i", full, "--create")
    before = run("ls", dst, "/").stdout
    data = inc.read_bytes()
    proc = subprocess.Popen([*COMMAND, "receive", str(dst)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write(data[: len(data) // 2])
        proc.stdin.flush()
        for _ in range(100):  # until the receive has pinned its blocks
            facts = json_of("info", dst)
            assert isinstance(facts, dict)
            if facts["receiving"] == "two":
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert facts["receiving"] == "two"
        assert run("ls", dst, "/").stdout == before
        proc.stdin.write(data[len(data) // 2 :])
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    same_as_snapshot(dst, source, "two", tmp_path)
    assert run("ls", dst, "/").stdout != before
