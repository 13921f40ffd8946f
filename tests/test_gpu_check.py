"""benchmarks/gpu_check.py --smoke runs end to end on the CPU (the fused path interpreted)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--smoke"]
    done = subprocess.run(cmd + ["--budget", "1200"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    assert {r["section"] for r in rows} == {"exactness", "kernel", "deit", "unet"}
    exact = [r for r in rows if r["section"] == "exactness"]
    assert exact[0]["agree"] == exact[0]["cases"]  # float64: the fused path equals scipy
    fused = [r for r in rows if r["section"] == "kernel" and r["name"] == "triton"]
    assert fused and all(r["syncs"] == "0" for r in fused if r["syncs"])
    assert "## deit" in (tmp_path / "gpu_check.md").read_text()
