"""Run the snapvol benchmarks and print each figure beside its anchor (`make bench`).

    python bench/run.py [--scale tiny|full] [--only NAME ...] [--json PATH]
                        [--workdir DIR] [--profile DIR] [--strict]

The scale defaults to $SNAPVOL_BENCH_SCALE, else `full`. Results go to
bench/results/latest.json unless --json says otherwise. The exit status is 1 when a
benchmark failed to run, and with --strict also when a figure missed its target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as a script: make `bench` importable as a package.
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench import (  # noqa: E402
    big_dir,
    fuse_io,
    image_transfer,
    online_fsck,
    plane_algebra,
    replicate_tree,
    seq_io,
    small_files,
    snap_create,
    snap_memory,
)
from bench.common import (  # noqa: E402
    SCALES,
    Context,
    Figure,
    fmt_value,
    profile_summary,
    scale_from_env,
)
from snapvol.runtime import tune_gc  # noqa: E402

BENCHMARKS: list[ModuleType] = [seq_io, snap_create, plane_algebra, small_files, big_dir,
                                image_transfer, replicate_tree, fuse_io, snap_memory,
                                online_fsck]
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default=None,
                   help="benchmark sizes (default: $SNAPVOL_BENCH_SCALE or full)")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run only these benchmarks, by name or number: "
                        + ", ".join(f"{i}={m.NAME}" for i, m in enumerate(BENCHMARKS, 1)))
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory on the disk under test (default: the system "
                        "temporary directory); removed afterwards")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="cProfile the snapvol side of each figure; .prof files go to DIR "
                        "(profiled figures are slower than real)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a figure misses its target")
    return p.parse_args(argv)


def select(only: list[str] | None) -> list[ModuleType]:
    if not only:
        return BENCHMARKS
    chosen = []
    for key in only:
        for i, mod in enumerate(BENCHMARKS, 1):
            if key in (mod.NAME, str(i)):
                chosen.append(mod)
                break
        else:
            names = ", ".join(m.NAME for m in BENCHMARKS)
            raise SystemExit(f"no benchmark {key!r}; choose from {names} or 1..{len(BENCHMARKS)}")
    return chosen


def render(figures: list[Figure], errors: dict[str, str], console: Console,
           scale: str) -> None:
    table = Table(title=f"snapvol benchmarks ({scale} scale)")
    table.add_column("benchmark")
    table.add_column("figure", justify="right", no_wrap=True)
    table.add_column("anchor")
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("target", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("note", style="dim")
    styles = {"PASS": "green", "MISS": "bold red", "info": "dim"}
    for f in figures:
        anchor = "" if not f.anchor else f"{f.anchor}: {fmt_value(f.anchor_value, f.unit)}"
        ratio = "" if f.ratio is None or math.isnan(f.ratio) else f"{f.ratio:.3g}"
        status = f.status
        table.add_row(
            f"{f.bench}: {f.name}",
            fmt_value(f.value, f.unit),
            anchor,
            ratio,
            "; ".join(t.text for t in f.targets) or "-",
            f"[{styles[status]}]{status}[/]",
            f.note,
        )
    for name, err in errors.items():
        table.add_row(name, "-", "-", "", "-", "[bold red]ERROR[/]", "see above")
        console.print(f"[bold red]{name} failed:[/]\n{err}", markup=True, highlight=False)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_gc()  # the settings the snapvol commands and the mount daemon run with
    if args.scale is not None:
        os.environ["SNAPVOL_BENCH_SCALE"] = args.scale
    scale = scale_from_env()
    mods = select(args.only)
    console = Console(width=max(180, shutil.get_terminal_size().columns))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="snapvol-bench-", dir=args.workdir) as work:
        ctx = Context(scale, Path(work), args.profile)
        for mod in mods:
            print(f"{mod.TITLE} ({scale.name})", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                figures.extend(mod.run(ctx))
            except Exception:
                errors[mod.TITLE] = traceback.format_exc()
            timings[mod.NAME] = time.perf_counter() - t0
    render(figures, errors, console, scale.name)
    if ctx.profiles:
        for label, stats in ctx.profiles.items():
            console.print(f"[bold]profile: {label}[/] (top by own time)")
            console.print(profile_summary(stats), markup=False, highlight=False)
    report = {
        "scale": scale.name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),  # UTC, as snapvol
        "host": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "system": platform.platform(),
        },
        "profiled": args.profile is not None,
        "seconds": timings,
        "figures": [f.as_json() for f in figures],
        "errors": errors,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    console.print(f"results: {args.json}")
    missed = [f for f in figures if f.status == "MISS"]
    if errors or (args.strict and missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
