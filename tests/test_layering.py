"""The layering rules that code review alone would let slip (DESIGN.md §2, issue 15).

Read from the source with `ast`, so they hold for every module under src/snapvol, also
ones no test imports:

- `Volume` owns its state: no module but engine/volume.py assigns a Volume field, and no
  module but engine/volume.py and engine/allocator.py touches the allocator's pin or
  assigns the allocator's fields. The rule goes by name (the fields of the two classes,
  read from their source), on any object but `self`: a different class's field of the
  same name is assigned only by that class's own methods.
- Nothing under control/, daemon/ or image/ imports fuse/: the owner process and the
  transfers must work without FUSE (control/ and daemon/ are checked once they exist).
- The modules import one another without a circle, and engine/ and image/ import
  snapvol only at module level (a function-level import guards a circle, or nothing).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapvol.engine.volume import Volume

SRC = Path(__file__).resolve().parent.parent / "src" / "snapvol"
VOLUME_PY = SRC / "engine" / "volume.py"
ALLOCATOR_PY = SRC / "engine" / "allocator.py"

SETTINGS = {"cp_interval", "dirty_limit", "background_cp"}
"""Volume attributes an owner sets (tuning, not state): the timer's interval, the dirty
limit, and whether CPs write in the background."""

NO_FUSE = ("control", "daemon", "image")
"""Packages that must not import snapvol.fuse."""

MODULE_LEVEL_IMPORTS_ONLY = ("engine", "image")


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def fields_of(path: Path, cls: str) -> set[str]:
    """Every attribute `cls` assigns on `self` in its own source, and its properties."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out: set[str] = set()
    for sub in ast.walk(node):
        for target in assigned(sub):
            if isinstance(target.value, ast.Name) and target.value.id == "self":
                out.add(target.attr)
        if isinstance(sub, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "property" for d in sub.decorator_list):
            out.add(sub.name)
    return out


def assigned(node: ast.AST) -> Iterator[ast.Attribute]:
    """The attribute targets `node` assigns, augments or deletes (tuples unpacked)."""
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    elif isinstance(node, ast.Delete):
        targets = list(node.targets)
    else:
        return
    while targets:
        t = targets.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            targets.extend(t.elts)
        elif isinstance(t, ast.Starred):
            targets.append(t.value)
        elif isinstance(t, ast.Attribute):
            yield t


def is_self(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Name) and expr.id in ("self", "cls")


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(SRC.parent)}:{getattr(node, 'lineno', 0)}: {ast.unparse(node)}"


VOLUME_FIELDS = fields_of(VOLUME_PY, "Volume") - SETTINGS
ALLOCATOR_FIELDS = fields_of(ALLOCATOR_PY, "Allocator")


def test_the_field_lists_are_read_from_the_classes() -> None:
    """The rules below would pass vacuously if the scan found no fields."""
    assert {"active", "snapshots", "root", "receive_done", "receive_flags",
            "receive_blocks", "alloc", "_active", "_root"} <= VOLUME_FIELDS
    assert {"pinned", "watch_reuse", "active", "summary"} <= ALLOCATOR_FIELDS
    assert not SETTINGS & VOLUME_FIELDS


def test_no_module_outside_volume_py_assigns_a_volume_field() -> None:
    bad = []
    for path, tree in modules():
        if path == VOLUME_PY:
            continue
        for node in ast.walk(tree):
            for target in assigned(node):
                if is_self(target.value):
                    continue  # a class's own field (Volume's are assigned only in volume.py)
                if target.attr in VOLUME_FIELDS or target.attr.startswith("receive_"):
                    bad.append(where(path, node))
    assert not bad, "Volume fields assigned outside engine/volume.py (ask Volume instead):\n" + (
        "\n".join(bad))


def test_no_module_touches_the_allocators_pin_or_fields() -> None:
    bad = []
    for path, tree in modules():
        if path in (VOLUME_PY, ALLOCATOR_PY):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "pinned":
                bad.append(where(path, node))
            for target in assigned(node):
                if not is_self(target.value) and target.attr in ALLOCATOR_FIELDS:
                    bad.append(where(path, node))
    assert not bad, ("the allocator's pin or fields touched outside engine/volume.py "
                     "(use Volume.pin / release_pin / pinned_is / table_changed):\n"
                     + "\n".join(sorted(set(bad))))


def test_volume_fields_cannot_be_set_from_outside(mem_volume: Volume) -> None:
    """The same rule at run time: the fields are properties without setters."""
    public = sorted(f for f in VOLUME_FIELDS if not f.startswith("_")
                    and isinstance(getattr(Volume, f, None), property))
    assert {"active", "snapshots", "root", "receive_done", "alloc"} <= set(public)
    for name in public:
        with pytest.raises(AttributeError):
            setattr(mem_volume, name, getattr(mem_volume, name))
    for name in SETTINGS:  # these stay settable
        setattr(mem_volume, name, getattr(mem_volume, name))


def imports_of(tree: ast.Module, name: str) -> Iterator[tuple[ast.stmt, str]]:
    """(statement, imported module) for every import in `tree` (of module `name`),
    relative ones resolved; `from pkg import mod` names pkg.mod when that is a module."""
    package = name if (SRC.parent / name.replace(".", "/") / "__init__.py").exists() else (
        name.rpartition(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            yield node, base
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                        SRC.parent / sub.replace(".", "/") / "__init__.py").exists():
                    yield node, sub


def test_control_daemon_and_image_do_not_import_fuse() -> None:
    bad = []
    for path, tree in modules():
        name = module_name(path)
        if name.split(".")[1:2] and name.split(".")[1] in NO_FUSE:
            for node, target in imports_of(tree, name):
                if target == "snapvol.fuse" or target.startswith("snapvol.fuse."):
                    bad.append(where(path, node))
    assert not bad, "fuse/ imported by " + "/".join(NO_FUSE) + ":\n" + "\n".join(
        sorted(set(bad)))


def test_engine_and_image_import_snapvol_at_module_level_only() -> None:
    bad = []
    for path, tree in modules():
        name = module_name(path)
        if name.split(".")[1:2] and name.split(".")[1] not in MODULE_LEVEL_IMPORTS_ONLY:
            continue
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node, target in imports_of(ast.Module(body=fn.body, type_ignores=[]), name):
                if target.startswith("snapvol"):
                    bad.append(where(path, node))
    assert not bad, "function-level imports in engine/ or image/:\n" + "\n".join(
        sorted(set(bad)))


def test_no_import_circle() -> None:
    """Among snapvol's modules, counting the imports made only for type checking too:
    a circle there is one the next refactoring turns into an import error."""
    graph: dict[str, set[str]] = {}
    for path, tree in modules():
        name = module_name(path)
        deps = graph.setdefault(name, set())
        for _, target in imports_of(tree, name):
            if target.startswith("snapvol") and target != name:
                deps.add(target)
    known = set(graph)
    state: dict[str, int] = {}  # 1: on the path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m] & known):
            if m.startswith(d + "."):
                continue  # a module importing its own package's __init__
            if state.get(d) == 1:
                return [*stack[stack.index(d):], d]
            if d not in state and (found := visit(d)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (circle := visit(m)) is not None:
            pytest.fail("import circle: " + " -> ".join(circle))
