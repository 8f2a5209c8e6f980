"""Getting started: `make install-bin` (scripts/install_bin.py) into a scratch prefix, the
man pages it generates rendered by man(1), the systemd unit checked by systemd-analyze,
the link that runs snapvol without the virtual environment, and shell completion of
snapshot names driven through click's environment protocol and through the real bash
script it installs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import run

REPO = Path(__file__).resolve().parent.parent
INSTALL = [sys.executable, str(REPO / "scripts" / "install_bin.py")]
VENV_BIN = Path(sys.executable).parent


def install(prefix: Path, *extra: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*INSTALL, "--prefix", str(prefix), *extra], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("prefix")
    install(where)
    return where


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("vol") / "vol.img"
    run("create", image, "--size", "32M")
    for name in ("hourly.0", "hourly.1", "daily.0"):
        run("snap", "create", image, name)
    return image


def man(*args: str, prefix: Path) -> str:
    proc = subprocess.run(["man", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MANPATH=str(prefix / "share" / "man"),
                                   MANWIDTH="80"), check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no groff warnings
    return proc.stdout


def test_man_pages_render_for_every_command(prefix: Path) -> None:
    pages = prefix / "share" / "man"
    names = sorted(p.name for p in (pages / "man1").iterdir())
    for want in ("snapvol.1", "snapvol-snap.1", "snapvol-snap-create.1", "snapvol-mount.1",
                 "snapvol-mounts.1", "snapvol-verify.1"):
        assert want in names
    assert (pages / "man8" / "mount.fuse.snapvol.8").exists()
    for page in [*(pages / "man1").iterdir(), pages / "man8" / "mount.fuse.snapvol.8"]:
        text = man("-l", str(page), prefix=prefix)
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION"):
            assert f"\n{section}\n" in f"\n{text}", (page.name, text[:400])
    snap = man("-l", str(pages / "man1" / "snapvol-snap-list.1"), prefix=prefix)
    assert "snapvol snap list [OPTIONS] IMAGE" in snap and "-o FIELD,..." in snap
    # `man snapvol-snap` finds the page by name where the install put it
    assert "snapvol-snap-create(1)" in man("snapvol-snap", prefix=prefix)
    top = man("snapvol", prefix=prefix)
    assert "EXIT STATUS" in top and "mount.fuse.snapvol(8)" in top
    helper = man("8", "mount.fuse.snapvol", prefix=prefix)
    assert "/srv/vol.img  /mnt/vol  fuse.snapvol  defaults  0  0" in helper


def test_the_link_runs_snapvol_without_the_venv(prefix: Path, vol: Path) -> None:
    link = prefix / "bin" / "snapvol"
    assert link.is_symlink() and Path(os.readlink(link)) == VENV_BIN / "snapvol"
    env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": str(prefix)}  # no venv
    proc = subprocess.run(["snapvol", "snap", "list", "-H", "-o", "name", str(vol)], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.split() == ["hourly.0", "hourly.1", "daily.0"]
    helper = prefix / "sbin" / "mount.fuse.snapvol"
    assert Path(os.readlink(helper)) == VENV_BIN / "mount.fuse.snapvol"


def test_the_systemd_unit_checks_clean(prefix: Path) -> None:
    unit = prefix / "lib" / "systemd" / "system" / "snapvol-mount@.service"
    text = unit.read_text()
    assert f"ExecStart={prefix}/bin/snapvol mount --foreground $OPTIONS ${{IMAGE}} %f" in text
    instance = unit.with_name("snapvol-mount@mnt-vol.service")  # verify wants an instance
    instance.write_text(text)
    try:
        proc = subprocess.run(["systemd-analyze", "verify", str(instance)],
                              capture_output=True, text=True, timeout=60, check=False,
                              env=dict(os.environ, MANPATH=str(prefix / "share" / "man")))
    finally:
        instance.unlink()
    assert proc.returncode == 0, proc.stderr


def test_install_never_replaces_what_is_not_ours(tmp_path: Path) -> None:
    install(tmp_path)
    page = tmp_path / "share" / "man" / "man1" / "snapvol-cat.1"
    page.write_text("someone else's page\n")
    mine = tmp_path / "bin" / "snapvol"
    mine.unlink()
    mine.write_text("#!/bin/sh\necho another snapvol\n")
    proc = install(tmp_path, code=1)
    assert f"left alone: {mine}: a file that is not a snapvol link" in proc.stderr
    assert f"left alone: {page}: not written by snapvol's make install-bin" in proc.stderr
    assert page.read_text() == "someone else's page\n"
    assert mine.read_text() == "#!/bin/sh\necho another snapvol\n"
    # a link of another checkout's is ours: it moves here, and the report says so
    mine.unlink()
    mine.symlink_to("/elsewhere/.venv/bin/snapvol")
    page.unlink()
    proc = install(tmp_path)
    assert f"moved: {mine} -> {VENV_BIN / 'snapvol'} (was -> /elsewhere/.venv/bin/snapvol)" \
        in proc.stdout
    assert "up to date: " in proc.stdout and "(24 up to date, 1 wrote)" in proc.stdout
    # uninstall removes what is ours and keeps what is not
    page.write_text("someone else's page\n")
    proc = install(tmp_path, "--uninstall", code=1)
    assert page.exists() and not mine.exists() and not mine.is_symlink()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["share/man/man1/snapvol-cat.1"]


def complete(shell: str, words: str, cword: int | str) -> list[str]:
    """What snapvol answers a shell's TAB, through click's environment protocol."""
    env = dict(os.environ, _SNAPVOL_COMPLETE=f"{shell}_complete", COMP_WORDS=words,
               COMP_CWORD=str(cword))
    proc = subprocess.run([str(VENV_BIN / "snapvol")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def test_completion_lists_snapshot_names(vol: Path) -> None:
    img = str(vol)
    assert complete("bash", f"snapvol snap delete {img} ", 4) == [
        "plain,hourly.0", "plain,hourly.1", "plain,daily.0"]
    assert complete("bash", f"snapvol snap delete {img} hou", 4) == [
        "plain,hourly.0", "plain,hourly.1"]
    # zsh: type, value, help lines; fish: one value a line
    assert complete("zsh", f"snapvol send {img} daily.0 --base h", 5) == [
        "plain", "hourly.0", "_", "plain", "hourly.1", "_"]
    assert complete("fish", f"snapvol ls {img} / --snapshot d", "d") == ["plain,daily.0"]
    assert complete("bash", f"snapvol verify {img}@hourly.", 2) == [
        f"plain,{img}@hourly.0", f"plain,{img}@hourly.1"]
    assert complete("bash", f"snapvol snap delete {img[:-3]}", 3) == [f"file,{img[:-3]}"]
    assert complete("bash", f"snapvol snap restore {img} ", 4)[0] == "plain,hourly.0"


def test_completion_is_silent_on_any_error(tmp_path: Path) -> None:
    assert complete("bash", f"snapvol snap delete {tmp_path / 'missing.img'} ", 4) == []
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    assert complete("bash", f"snapvol snap delete {junk} ", 4) == []
    assert complete("bash", f"snapvol snap delete {tmp_path} ", 4) == []


def test_the_installed_bash_script_completes_snapshots(prefix: Path, vol: Path) -> None:
    script = prefix / "share" / "bash-completion" / "completions" / "snapvol"
    bash = (f"source {script}\n"
            f"COMP_WORDS=(snapvol snap delete {vol} hourly.); COMP_CWORD=4\n"
            "_snapvol_completion snapvol\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n')
    proc = subprocess.run(["bash", "--norc", "-c", bash], capture_output=True, text=True,
                          timeout=60, check=False,
                          env=dict(os.environ, PATH=f"{prefix / 'bin'}:/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hourly.0", "hourly.1"]
    zsh = (prefix / "share" / "zsh" / "site-functions" / "_snapvol").read_text()
    assert zsh.startswith("#compdef snapvol\n")  # compinit reads the first line
    fish = (prefix / "share" / "fish" / "vendor_completions.d" / "snapvol.fish").read_text()
    assert "complete --no-files --command snapvol" in fish
