"""`make install-bin`: put snapvol on PATH without the virtual environment activated, with
its man pages, shell completion (bash, zsh, fish), the mount(8) helper and the systemd
unit.

    .venv/bin/python scripts/install_bin.py [--prefix DIR] [--uninstall]

As root the default prefix is /usr/local; as another user it is ~/.local. What goes where:

    PREFIX/bin/snapvol                    a link to this checkout's .venv/bin/snapvol
    PREFIX/share/man/man1/snapvol*.1      one page per command (scripts/manpages.py)
    PREFIX/share/man/man8/mount.fuse.snapvol.8
    PREFIX/share/bash-completion/completions/snapvol
    PREFIX/share/zsh/site-functions/_snapvol
    PREFIX/share/fish/vendor_completions.d/snapvol.fish   (~/.config/fish/completions
                                                           for the user default)
    /sbin/mount.fuse.snapvol              a link to .venv/bin/mount.fuse.snapvol (root
                                          only: mount(8) runs helpers from /sbin alone;
                                          PREFIX/sbin when --prefix is given)
    PREFIX/lib/systemd/system/snapvol-mount@.service      (root, or --prefix)

Nothing that is not ours is ever replaced: a link is ours if it points at a `snapvol` (or
`mount.fuse.snapvol`) program in a bin directory (another checkout's: it is moved to this
one, and the report says so); a file is ours if it carries MARK. Anything else in the way
is left alone and reported, and the run exits 1. Every path is reported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import manpages  # noqa: E402  (beside this script)

MARK = "installed by snapvol's make install-bin"
VENV_BIN = Path(sys.executable).parent  # run with the checkout's .venv/bin/python
UNIT = REPO / "packaging" / "systemd" / "snapvol-mount@.service"


@dataclass(frozen=True, slots=True)
class Layout:
    bin: Path
    man: Path
    bash: Path
    zsh: Path
    fish: Path
    sbin: Path | None  # None: the mount helper is not installed (not root)
    units: Path | None

    @classmethod
    def choose(cls, prefix: Path | None) -> Layout:
        root = os.geteuid() == 0
        if prefix is not None:
            return cls._under(prefix, prefix / "share/fish/vendor_completions.d",
                              prefix / "sbin", prefix / "lib/systemd/system")
        if root:
            usr = Path("/usr/local")
            return cls._under(usr, usr / "share/fish/vendor_completions.d", Path("/sbin"),
                              usr / "lib/systemd/system")
        home = Path.home()
        return cls._under(home / ".local", home / ".config/fish/completions", None, None)

    @classmethod
    def _under(cls, prefix: Path, fish: Path, sbin: Path | None,
               units: Path | None) -> Layout:
        share = prefix / "share"
        return cls(prefix / "bin", share / "man", share / "bash-completion/completions",
                   share / "zsh/site-functions", fish, sbin, units)


class Report:
    def __init__(self) -> None:
        self.refused = 0

    def say(self, what: str) -> None:
        print(what)

    def refuse(self, path: Path, why: str) -> None:
        self.refused += 1
        print(f"left alone: {path}: {why}", file=sys.stderr)


def _ours_link(path: Path, program: str) -> bool:
    target = os.readlink(path)
    return Path(target).name == program and Path(target).parent.name == "bin"


def place_link(path: Path, target: Path, report: Report) -> None:
    if path.is_symlink():
        old = os.readlink(path)
        if not _ours_link(path, target.name):
            report.refuse(path, f"a link to {old}, not snapvol's")
            return
        if Path(old) == target:
            report.say(f"up to date: {path} -> {target}")
            return
        path.unlink()
        path.symlink_to(target)
        report.say(f"moved: {path} -> {target} (was -> {old})")
        return
    if path.exists():
        report.refuse(path, "a file that is not a snapvol link (installed some other way?)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    report.say(f"linked: {path} -> {target}")


def place_file(path: Path, text: str, report: Report) -> str | None:
    """Write `text` at `path` unless something not ours is there: "wrote", "updated",
    "up to date", or None (refused, and reported)."""
    if path.is_symlink() or (path.exists() and MARK not in path.read_text(errors="replace")):
        report.refuse(path, "not written by snapvol's make install-bin")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text)
        return "wrote"
    if path.read_text() == text:
        return "up to date"
    path.write_text(text)
    return "updated"


def remove(path: Path, ours: Callable[[Path], bool], report: Report) -> None:
    if not path.is_symlink() and not path.exists():
        return
    if not ours(path):
        report.refuse(path, "not snapvol's: kept")
        return
    path.unlink()
    report.say(f"removed: {path}")


def completion(shell: str) -> str:
    """click's completion script for `shell`, with MARK in a comment at its end (zsh
    wants its #compdef line first)."""
    env = dict(os.environ, _SNAPVOL_COMPLETE=f"{shell}_source")
    script = subprocess.run([str(VENV_BIN / "snapvol")], env=env, capture_output=True,
                            text=True, check=True).stdout
    return script.rstrip("\n") + f"\n# snapvol's completion for {shell}, {MARK}\n"


def pages() -> dict[str, str]:
    """Every man page by its path under man/ (man1/snapvol.1, ...), MARK included."""
    with tempfile.TemporaryDirectory() as tmp:
        written = manpages.write_pages(Path(tmp))
        return {str(p.relative_to(tmp)): f'.\\" {MARK}\n' + p.read_text() for p in written}


def planned(layout: Layout) -> list[tuple[Path, str | Path]]:
    """(path, contents or link target) of everything to install."""
    out: list[tuple[Path, str | Path]] = [(layout.bin / "snapvol", VENV_BIN / "snapvol")]
    out += [(layout.man / rel, text) for rel, text in pages().items()]
    out += [(layout.bash / "snapvol", completion("bash")),
            (layout.zsh / "_snapvol", completion("zsh")),
            (layout.fish / "snapvol.fish", completion("fish"))]
    if layout.sbin is not None:
        out.append((layout.sbin / "mount.fuse.snapvol", VENV_BIN / "mount.fuse.snapvol"))
    if layout.units is not None:
        unit = UNIT.read_text().replace("@BINDIR@", str(layout.bin))
        out.append((layout.units / UNIT.name, f"# {MARK}\n{unit}"))
    return out


def install(layout: Layout, report: Report) -> None:
    man: dict[str, int] = {}
    for path, what in planned(layout):
        if isinstance(what, Path):
            place_link(path, what, report)
            continue
        done = place_file(path, what, report)
        if done is None:
            continue
        if path.is_relative_to(layout.man):
            man[done] = man.get(done, 0) + 1
        else:
            report.say(f"{done}: {path}")
    if man:
        counts = ", ".join(f"{n} {how}" for how, n in man.items())
        report.say(f"man pages ({counts}): {layout.man}/man1/snapvol*.1 and "
                   f"man8/mount.fuse.snapvol.8 (man snapvol, man snapvol-snap-create, ...)")
    if layout.sbin is None:
        report.say("not installed: the mount(8) helper and the systemd unit (they go to "
                   "/sbin and /usr/local/lib/systemd/system: run make install-bin as root)")
    if layout.units is not None and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    if str(layout.bin) not in os.environ.get("PATH", "").split(os.pathsep):
        report.say(f"note: {layout.bin} is not on PATH; add it: "
                   f"export PATH=\"{layout.bin}:$PATH\"")


def uninstall(layout: Layout, report: Report) -> None:
    def ours(path: Path) -> bool:
        if path.is_symlink():
            return _ours_link(path, path.name)
        return MARK in path.read_text(errors="replace")

    for path, _ in planned(layout):
        remove(path, ours, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", type=Path, help="install under this directory "
                        "(default: /usr/local as root, ~/.local otherwise)")
    parser.add_argument("--uninstall", action="store_true",
                        help="remove what an install put there (only what is ours)")
    args = parser.parse_args()
    layout = Layout.choose(args.prefix.resolve() if args.prefix else None)
    report = Report()
    (uninstall if args.uninstall else install)(layout, report)
    sys.exit(1 if report.refused else 0)


if __name__ == "__main__":
    main()
