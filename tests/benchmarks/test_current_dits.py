"""The benchmarks on issue 22's image transformers: dit_speed.py times them (tiny stand-ins here),
gpu_model.py models them on meta (tiny stand-ins: HiDream's MoE as its dense stand-in, its
input patchified), and the cost model gives no shadow values to uninitialised tensors."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling modules

import _steps  # noqa: E402
import dit_speed  # noqa: E402
import gpu_model  # noqa: E402
from _costmodel import H100, CostModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dit_speed_times_the_current_image_transformers(tmp_path: Path) -> None:
    dit_speed.main(["--models", "qwenimage", "sana", "--width_div", "16", "--tokens", "64",
                    "--ratios", "0.5", "--rounds", "1", "--warmup", "0", "--mlp_too",
                    "--methods", "unpatched", "tome_sd", "--out_dir", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "dit_speed.csv") as f:
        rows = list(csv.DictReader(f))
    labels = [(r["model"], r["method"]) for r in rows]
    assert labels == [(m, x) for m in ("qwenimage", "sana")
                      for x in ("unpatched", "tome_sd", "tome_sd+mlp")]  # fmt: skip
    assert all(float(r["step_s"]) > 0 and r["tokens"] == "64" for r in rows)


def test_gpu_model_models_the_current_image_transformers(tmp_path: Path) -> None:
    models = sorted(_steps.CURRENT_DITS)
    rows = gpu_model.main(["--tiny", "--models", *models, "--out_dir", str(tmp_path), "--no_plot"])
    assert {r["model"] for r in rows} == set(models)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for model in models:
        mine = {r["label"]: r for r in rows if r["model"] == model}
        assert mine["unpatched"]["cluster_calls"] == 0
        assert all(r["cluster_calls"] > 0 for label, r in mine.items() if label != "unpatched")
    sana = {r["label"] for r in rows if r["model"] == "sana"}
    assert "tome_sd +cross" in sana and "tome_sd +mlp" not in sana


def test_uninitialised_tensors_get_zero_shadow_values() -> None:
    """A meta ``new_empty`` (shape-only plans' labels) from a shadowed tensor has no values to
    know: its shadow is zeros (valid indices), not arbitrary memory; a fill gives real ones."""
    cm = CostModel(H100)
    with cm:
        small = torch.zeros(2, 3, device="meta")
        cm.shadows[small] = torch.zeros(2, 3)
        labels = small.new_empty((2, 3), dtype=torch.long)
        filled = small.new_empty((2, 3)).fill_(2.0)
    assert torch.equal(cm.shadows[labels], torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(cm.shadows[filled], torch.full((2, 3), 2.0))
