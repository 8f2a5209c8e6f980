"""The benchmark runner at its tiny scale: every benchmark runs and reports its figures.

Figures at this scale mean nothing, so nothing here looks at a time or a target; the test
only proves that `make bench` would not fall over half-way through a long run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {"1 sequential I/O", "2 snapshot create", "3 plane difference", "4 small files",
           "5 big directory", "6 image transfer", "7 replicate tree",
           "8 FUSE mount", "9 snapshot memory", "10 online fsck"}


def test_every_benchmark_runs_at_tiny_scale(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, SNAPVOL_BENCH_SCALE="tiny")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--json", str(out),
         "--workdir", str(work)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["scale"] == "tiny"
    assert report["errors"] == {}
    assert {f["bench"] for f in report["figures"]} == BENCHES
    for fig in report["figures"]:
        assert math.isfinite(fig["value"]) and fig["value"] >= 0, fig
        assert fig["status"] in ("PASS", "MISS", "info"), fig
        if fig["anchor"] and fig["anchor_value"] is not None:
            assert math.isfinite(fig["ratio"]), fig
    assert list(work.iterdir()) == [], "the runner left scratch files behind"
    assert "snapvol benchmarks" in proc.stdout
