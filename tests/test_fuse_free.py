"""The owner and its control protocol stand without FUSE (DESIGN.md §2): nothing under
control/, daemon/ or image/ imports snapvol.fuse or pyfuse3 (main's tests/test_layering.py
checks that too), the CLI imports snapvol.fuse only in its mount command, and loading the
CLI, the control client and the owner does not load pyfuse3."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import snapvol

SRC = Path(snapvol.__file__).parent
FUSE_FREE = ("control", "daemon", "image")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
            out.add(node.module)
    return out


def _fuse(module: str) -> bool:
    return module == "pyfuse3" or module.split(".")[:2] == ["snapvol", "fuse"]


def test_control_daemon_and_image_import_nothing_of_fuse() -> None:
    found = []
    for package in FUSE_FREE:
        files = sorted((SRC / package).rglob("*.py"))
        assert files, package
        for path in files:
            found += [f"{path.relative_to(SRC)} imports {m}" for m in _imports(path)
                      if _fuse(m)]
    assert found == []


def test_the_cli_imports_fuse_only_to_mount() -> None:
    found = [f"{path.name} imports {m}" for path in sorted((SRC / "cli").glob("*.py"))
             if path.name != "mount.py" for m in _imports(path) if _fuse(m)]
    assert found == []


def test_loading_the_cli_and_the_owner_leaves_pyfuse3_unloaded() -> None:
    code = ("import sys, snapvol.cli.main, snapvol.control.ops, snapvol.daemon.owner; "
            "print('pyfuse3' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "False"
