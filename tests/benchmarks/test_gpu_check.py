"""benchmarks/gpu_check.py --smoke runs end to end on the CPU (the fused path interpreted), and
its "steps" section writes benchmarks/gpu_model.py's columns, so the two CSVs join."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling modules

import _steps  # noqa: E402
import gpu_check  # noqa: E402
import gpu_model  # noqa: E402


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--smoke"]
    done = subprocess.run(cmd + ["--budget", "1200"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    assert {r["section"] for r in rows} == {"exactness", "kernel", "deit", "steps"}
    exact = [r for r in rows if r["section"] == "exactness"]
    assert exact[0]["agree"] == exact[0]["cases"]  # float64: the fused path equals scipy
    fused = [r for r in rows if r["section"] == "kernel" and r["name"] == "triton"]
    assert fused and all(r["syncs"] == "0" for r in fused if r["syncs"])
    assert "## deit" in (tmp_path / "gpu_check.md").read_text()
    steps = list(csv.DictReader(open(tmp_path / "gpu_steps.csv")))
    compiled = [r for r in steps if r["label"].endswith("[reduce-overhead]")]
    steps = [r for r in steps if r not in compiled]
    assert len(steps) == sum(len(_steps.rows_for(s)) for s in _steps.TINY_SETUPS)
    status = {(r["model"], r["label"]): r["status"] for r in steps}
    assert all(status[(s.model, "unpatched")] == "ok" for s in _steps.TINY_SETUPS)
    assert status[("sd15", "atc triton")] == "ok"  # the fused path, interpreted
    for label in _steps.RECOMMENDED["unet"]:  # the GPU settings, the fused path interpreted
        assert status[("sd15", label)] == "ok"
    # The recommended rows compiled (fullgraph; CUDA graphs on a GPU), where time allowed.
    done = {(r["model"], r["label"]) for r in compiled if r["status"] == "ok"}
    assert ("sd15", f"{_steps.RECOMMENDED['unet'][0]} [reduce-overhead]") in done


def test_steps_section_joins_the_cost_model(tmp_path: Path, monkeypatch) -> None:
    setups = (_steps.Setup("deit_s", 64, 2, tiny=True), _steps.Setup("sd15", 64, 2, tiny=True))
    monkeypatch.setattr(gpu_check, "TINY_SETUPS", setups)
    monkeypatch.setattr(
        _steps,
        "VIT_ROWS",
        (_steps.Row("unpatched"), _steps.Row("tome r=4", "tome", {"r": 4})),
    )
    rows = (
        _steps.Row("unpatched"),
        _steps.Row("tome_sd", "tome_sd", {"ratio": 0.5, "seed": 0}),
        _steps.Row("bogus", "atc", {"no_such_option": 1}),
    )
    monkeypatch.setattr(_steps, "DIFFUSION_ROWS", rows)
    gpu_check.main([str(tmp_path / "check"), "--smoke", "--sections", "steps", "--budget", "120"])
    gpu_model.main(
        ["--tiny", "--out_dir", str(tmp_path / "model"), "--no_plot", "--models", "deit_s", "sd15"]
    )

    def read(path: Path) -> tuple[tuple, dict]:
        with open(path) as f:
            reader = csv.DictReader(f)
            out = {(r["model"], r["resolution"], r["batch"], r["label"]): r for r in reader}
        return tuple(reader.fieldnames), out

    columns, measured = read(tmp_path / "check" / "gpu_steps.csv")
    compiled = {k: v for k, v in measured.items() if k[3].endswith("[reduce-overhead]")}
    measured = {k: v for k, v in measured.items() if k not in compiled}
    assert [k[3] for k in compiled] == ["unpatched [reduce-overhead]"]  # sd15 (none for DeiT)
    model_columns, modelled = read(tmp_path / "model" / "gpu_model.csv")
    assert columns == model_columns == _steps.COLUMNS
    assert measured.keys() == modelled.keys() and len(measured) == 5
    for key, m in measured.items():
        assert m["status"] == modelled[key]["status"]
        assert m["source"].startswith("measured") and modelled[key]["source"].startswith("model")
        if m["status"] == "ok":
            assert float(m["ms"]) > 0 and float(m["ms_q25"]) <= float(m["ms_q75"])
    assert measured[("sd15", "64", "2", "bogus")]["status"] == "n/a (option not available)"
    base, tome = (
        measured[("deit_s", "64", "2", "unpatched")],
        measured[("deit_s", "64", "2", "tome r=4")],
    )
    assert float(base["ratio"]) == 1.0 and float(tome["cluster_calls"]) == 2
    assert float(measured[("sd15", "64", "2", "tome_sd")]["cluster_calls"]) > 0


def test_untiled_fused_rows_above_the_cap_are_skipped() -> None:
    fused = _steps.Row("atc triton", "atc", {"ratio": 0.5, "backend": "triton"})
    tiled = _steps.Row("tiled", "atc", {"ratio": 0.5, "backend": "triton", "tile": (32, 32)})
    big, small = _steps.Setup("sd15", 1024, 2), _steps.Setup("sdxl", 1024, 2)
    assert (big.tokens, small.tokens, _steps.Setup("deit_s", 224, 256).tokens) == (16384, 4096, 197)
    assert gpu_check._fused_too_long(big, fused, 4096)
    assert not gpu_check._fused_too_long(small, fused, 4096)
    assert not gpu_check._fused_too_long(big, tiled, 4096)
    assert not gpu_check._fused_too_long(big, _steps.Row("atc", "atc", {"ratio": 0.5}), 4096)
