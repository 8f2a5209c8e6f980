"""Values that parse but make no sense: refused where they are given, with a one-line
error naming the range, and never a half-made image left behind (issue 10, item 19)."""

from __future__ import annotations

import math
import os
import resource
import subprocess
from pathlib import Path

import pytest

from fusemount import is_mounted
from snapvol.engine.volume import MAX_CP_INTERVAL, MIN_CP_INTERVAL, Volume
from snapvol.errors import VolumeError
from snapvol.layout.constants import MAX_VOLUME_BLOCKS
from test_cli import COMMAND, fails, run


@pytest.mark.parametrize("size", ["8E", "5P", "9999999999999999999999E",
                                  str(MAX_VOLUME_BLOCKS * 4096 + 4096)])
def test_create_refuses_sizes_past_the_format(tmp_path: Path, size: str) -> None:
    path = tmp_path / "v.img"
    fails("create", path, "--size", size, says="too large: a volume holds at most")
    assert not path.exists()
    run("create", path, "--size", "8M")  # the retry is not blocked by a leftover
    assert path.stat().st_size == 8 << 20


def test_create_refuses_sizes_past_the_file_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "v.img"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY))

    proc = subprocess.run([*COMMAND, "create", str(path), "--size", "8M"], capture_output=True,
                          text=True, timeout=60, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("snapvol: error: ") and proc.stderr.count("\n") == 1
    assert "ulimit -f" in proc.stderr and "Traceback" not in proc.stderr
    assert not path.exists()


def test_create_removes_what_it_made_when_formatting_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.img"

    def broken(dev: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Volume, "format", classmethod(lambda cls, dev: broken(dev)))
    with pytest.raises(OSError, match="No space"):
        Volume.create(path, 8 << 20)
    assert not path.exists()

    def interrupted(dev: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Volume, "format", classmethod(lambda cls, dev: interrupted(dev)))
    with pytest.raises(KeyboardInterrupt):
        Volume.create(path, 8 << 20)
    assert not path.exists()


def test_create_never_removes_a_file_it_did_not_make(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone replaced the new image while it was being formatted: theirs stays."""
    path = tmp_path / "v.img"

    def replaced(dev: object) -> None:
        os.unlink(path)
        path.write_bytes(b"someone else's file")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Volume, "format", classmethod(lambda cls, dev: replaced(dev)))
    with pytest.raises(OSError):
        Volume.create(path, 8 << 20)
    assert path.read_bytes() == b"someone else's file"


def test_create_leaves_nothing_when_opening_the_new_volume_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.img"

    def refuse(cls: type[Volume], *args: object, **kwargs: object) -> Volume:
        raise VolumeError("cannot open it")

    monkeypatch.setattr(Volume, "open", classmethod(refuse))
    with pytest.raises(VolumeError, match="cannot open it"):
        Volume.create(path, 8 << 20)
    assert not path.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308", "0", "-1", "0.01",
                                   str(MAX_CP_INTERVAL * 2)])
def test_mount_refuses_cp_intervals_out_of_range(tmp_path: Path, value: str) -> None:
    image, mnt = tmp_path / "v.img", tmp_path / "mnt"
    run("create", image, "--size", "8M")
    mnt.mkdir()
    try:
        err = fails("mount", image, mnt, "--cp-interval", value, says="--cp-interval")
        assert f"use {MIN_CP_INTERVAL:g} to {MAX_CP_INTERVAL:g} seconds" in err
    finally:
        if is_mounted(mnt):  # accepted after all: leave no mount process behind
            run("unmount", "--force", mnt, code=None)
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e308, 0.0, -5.0])
def test_cp_timer_refuses_intervals_it_cannot_keep(tmp_path: Path, value: float) -> None:
    with Volume.create(tmp_path / "v.img", 8 << 20) as vol:
        with pytest.raises(VolumeError, match="out of range"):
            vol.start_cp_timer(value)
        assert vol._timer is None  # no thread left spinning or dead
        vol.start_cp_timer(0.5)
        assert vol._timer is not None and vol._timer.is_alive()
        assert vol.cp_interval == 0.5
