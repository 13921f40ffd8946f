"""benchmarks/cluster_kernels.py: --load, --threads, --baseline, batch sizes, the sklearn hint."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    path = ROOT / "benchmarks" / "cluster_kernels.py"
    spec = importlib.util.spec_from_file_location("cluster_kernels_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_load_threads_and_baseline(tmp_path, capsys, monkeypatch) -> None:
    bench = _bench()
    started = []
    popen = bench.subprocess.Popen
    monkeypatch.setattr(
        bench.subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1]
    )
    rows = bench.main(
        [
            "--framework",
            "atc_patch",
            "--input_sizes",
            "--tokens",
            "24",
            "--batch_sizes",
            "1",
            "--linkage",
            "single",
            "--runs",
            "2",
            "--throw_out",
            "0",
            "--threads",
            "1",
            "--load",
            "--load_seconds",
            "60",
            "--baseline",
            str(ROOT / "src"),
            "--no_plot",
            "--output_dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    out = capsys.readouterr().out
    assert "batch sizes [2] (2 ** --batch_sizes)" in out and "1 competing busy process" in out
    assert len(started) == 1 and started[0].poll() is not None  # the busy process has stopped
    (row,) = rows
    assert row["batch"] == 2 and row["threads"] == 1 and row["load"] == 1
    for col in ("atc_patch_ms", "atc_patch_torch_threads_ms", "baseline_ms"):
        assert row[col] > 0
    assert row["baseline_over_atc_patch_lo"] <= row["baseline_over_atc_patch"]
    assert row["baseline_over_atc_patch"] <= row["baseline_over_atc_patch_hi"]
    with open(tmp_path / "cluster_kernels.csv") as f:
        assert next(csv.DictReader(f))["batch"] == "2"


def test_batch_sizes_help_says_log2(capsys) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--help"])
    assert "log2 of the batch sizes" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--batch_sizes", "-1"], ["--runs", "0"]])
def test_bad_numbers_rejected(bad, capsys) -> None:
    with pytest.raises(SystemExit):
        _bench().main(bad)
    assert "must be an int" in capsys.readouterr().err


def test_missing_sklearn_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    with pytest.raises(SystemExit, match=r"pip install 'atc-patch\[test\]'"):
        _bench().main(["--framework", "all", "--no_plot"])
