"""Listings people read and scripts parse, through the CLI as a process: what `snap list`,
`dump --list`, `info` and `ls -l` show by default on an 80-column terminal and in a pipe,
`-H` and `-o FIELD,...`, one time zone (UTC, with its Z) whatever TZ says, and progress
bars in binary units whose last figures are the summary's."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
from datetime import UTC, datetime
from pathlib import Path

import pytest

from test_cli import COMMAND, MIB, fails, run

REPLICA = "replica-1a2b3c4d-20250601T120000.123456Z"  # as long as replicate's names
LONG = "weekly." + "x" * 93  # 100 characters: longer than a terminal line leaves
UTC_TIME = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def on_terminal(*args: str | Path, columns: int = 80,
                env: dict[str, str] | None = None) -> str:
    """Run snapvol with stdout and stderr on a pty of `columns` columns; its output."""
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    child = subprocess.Popen([*COMMAND, *map(str, args)], stdout=sub, stderr=sub,
                             stdin=subprocess.DEVNULL, close_fds=True,
                             env={k: v for k, v in (env or os.environ).items()
                                  if k not in ("COLUMNS", "LINES")})
    os.close(sub)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError as err:
            assert err.errno == errno.EIO  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert child.wait(timeout=60) == 0, seen
    assert b"Traceback" not in seen, seen
    return seen.decode()


@pytest.fixture
def snapped(tmp_path: Path) -> Path:
    image = tmp_path / "vol.img"
    run("create", image, "--size", "32M")
    for name in ("hourly.0", REPLICA, LONG):
        run("snap", "create", image, name)
    return image


def test_snap_list_fits_80_columns_and_never_cuts_a_name(snapped: Path) -> None:
    shown = on_terminal("snap", "list", snapped, columns=80)
    lines = shown.replace("\r\n", "\n").rstrip("\n").split("\n")
    assert lines[0].split() == ["CREATED", "RECLAIMABLE", "NAME"]
    assert len(lines) == 4, lines  # one line per snapshot: no row wrapped or cut
    names = [line.split()[-1] for line in lines[1:]]
    assert names == ["hourly.0", REPLICA, LONG]  # every name whole, oldest first
    for line in lines[:3]:  # the name comes last: only the long name's line is long
        assert len(line) <= 80, line
    for line in lines[1:]:
        assert UTC_TIME.match(line) and line.split()[2] == "KiB"
    assert "guid" not in shown.lower()  # the GUID is -v's


def test_snap_list_in_a_pipe_keeps_every_row_on_one_line(snapped: Path) -> None:
    out = run("snap", "list", "-v", snapped).stdout.decode()
    lines = out.rstrip("\n").split("\n")
    assert lines[0].split() == ["CREATED", "RECLAIMABLE", "KIND", "ORIGIN", "GUID", "ID",
                                "CP", "REPLICA_FOR", "NAME"]
    assert len(lines) == 4 and len(lines[3]) > 200  # a wide row stays one line
    listed = json.loads(run("snap", "list", "--json", snapped).stdout)
    for row, line in zip(listed, lines[1:], strict=True):
        cells = line.split()
        assert cells[-1] == row["name"] and cells[5] == row["guid"]
        assert cells[3:5] == ["snapshot", "here"] and cells[6] == str(row["snap_id"])


def test_snap_list_for_scripts(snapped: Path) -> None:
    listed = json.loads(run("snap", "list", "--json", snapped).stdout)
    out = run("snap", "list", "-H", snapped).stdout.decode()
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows == [[str(r["created_ns"]), str(r["reclaimable"]), r["name"]] for r in listed]
    out = run("snap", "list", "-H", "-o", "guid,name,cp,kind", snapped).stdout.decode()
    assert [line.split("\t") for line in out.splitlines()] == [
        [r["guid"], r["name"], str(r["cp_count"]), "snapshot"] for r in listed]
    picked = run("snap", "list", "-o", "name,reclaimable", snapped).stdout.decode()
    assert picked.splitlines()[0].split() == ["NAME", "RECLAIMABLE"]
    assert picked.splitlines()[1].split()[0] == "hourly.0"
    fails("snap", "list", "-o", "name,size", snapped,
          says="unknown field 'size': the fields are name, created, reclaimable")
    empty = snapped.parent / "empty.img"
    run("create", empty, "--size", "32M")
    assert run("snap", "list", empty).stdout == b"no snapshots\n"
    assert run("snap", "list", "-H", empty).stdout == b""  # nothing to parse


def test_one_time_zone_whatever_tz_says(snapped: Path, tmp_path: Path) -> None:
    listed = json.loads(run("snap", "list", "--json", snapped).stdout)
    want = datetime.fromtimestamp(listed[0]["created_ns"] // 10**9, UTC)
    env = dict(os.environ, TZ="America/Los_Angeles")
    for tz in ("America/Los_Angeles", "Asia/Tokyo", "UTC"):
        env["TZ"] = tz
        out = subprocess.run([*COMMAND, "snap", "list", str(snapped)], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert out.splitlines()[1].startswith(want.strftime("%Y-%m-%dT%H:%M:%SZ"))
    info = run("info", snapped).stdout.decode()
    facts = json.loads(run("info", "--json", snapped).stdout)
    created = datetime.fromtimestamp(facts["created_ns"] // 10**9, UTC)
    assert f"created                 {created:%Y-%m-%dT%H:%M:%SZ}" in info
    (tmp_path / "f").write_bytes(b"x")
    os.utime(tmp_path / "f", (0, 1_750_000_000))
    run("put", snapped, tmp_path / "f")
    assert "2025-06-15T15:06:40Z f" in run("ls", "-l", snapped).stdout.decode()
    # replicate names its snapshots in the same zone: replica-<uuid8>-<UTC time>Z
    run("replicate", snapped, tmp_path / "mirror.img", "--create")
    made = [r["name"] for r in json.loads(run("snap", "list", "--json", snapped).stdout)
            if r["replica"]]
    stamp = datetime.strptime(made[0].rsplit("-", 1)[1], "%Y%m%dT%H%M%S.%fZ")
    assert abs(stamp.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() < 120


def test_info_and_dump_list_for_scripts(snapped: Path, tmp_path: Path) -> None:
    facts = json.loads(run("info", "--json", snapped).stdout)
    rows = dict(line.split("\t") for line in run("info", "-H", snapped).stdout.decode()
                .splitlines())
    assert rows["size"] == str(facts["size"]) == str(32 * MIB)
    assert rows["used"] == str(facts["used"]) and rows["created"] == str(facts["created_ns"])
    assert rows["snapshots"] == "3"
    human = run("info", snapped).stdout.decode()
    assert "size                    32.0 MiB" in human
    run("dump", snapped, "hourly.0", "--level", "0", "-o", tmp_path / "d0")
    dumps = json.loads(run("dump", "--list", "--json", snapped).stdout)
    out = run("dump", "--list", "-H", snapped).stdout.decode()
    assert [line.split("\t") for line in out.splitlines()] == [
        ["0", "hourly.0", "-", str(dumps[0]["time_ns"]), str(dumps[0]["bytes"])]]
    wide = run("dump", "--list", "-v", snapped).stdout.decode().splitlines()
    assert wide[0].split() == ["LEVEL", "SNAPSHOT", "BASE", "TIME", "SIZE", "GUID", "CP"]
    assert dumps[0]["guid"] in wide[1]
    fails("dump", snapped, "hourly.0", "--level", "1", "-H", "-o", tmp_path / "d1",
          says="-H and -v shape the listing: use them with --list")


def test_progress_bars_speak_the_summary_s_units(tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    run("create", image, "--size", "64M")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(os.urandom(3 * MIB))
    (tree / "sub" / "b.bin").write_bytes(os.urandom(MIB // 2))
    os.link(tree / "a.bin", tree / "sub" / "a.link")  # counted once, as the summary does
    with open(tree / "sparse.bin", "wb") as f:
        f.truncate(8 * MIB)
        f.write(b"data")
    shown = ESCAPES.sub("", on_terminal("put", image, tree))
    summary = shown.strip().splitlines()[-1]
    assert summary == ("copied 3 files, 2 directories, 1 hard link; 11.5 MiB "
                       "(3.5 MiB of data, the rest holes)"), summary
    # the bar's last state says what the summary says: 3 of 3 files, 11.5 MiB of 11.5 MiB
    assert "3/3 files" in shown and "11.5 MiB/11.5 MiB" in shown, shown
    assert re.search(r"\d iB/s|\d [KMG]iB/s", shown), shown  # a binary rate, never MB/s
    assert not re.search(r"\d ?[kMG]B\b", shown), shown
    got = ESCAPES.sub("", on_terminal("get", image, "/tree", tmp_path / "back"))
    assert got.strip().splitlines()[-1] == summary
    assert "3/3 files" in got and "11.5 MiB/11.5 MiB" in got
