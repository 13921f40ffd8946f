"""The benchmarks on issue 22's video transformers: dit_speed.py times them (tiny stand-ins,
``--frames``) and gpu_model.py models them on meta (tiny stand-ins) with the video rows (3-D
tiles), whose goals are checked on the recommended row."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling modules

import _steps  # noqa: E402
import dit_speed  # noqa: E402
import gpu_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dit_speed_times_the_video_transformers(tmp_path: Path) -> None:
    models = list(dit_speed.VIDEO)
    dit_speed.main(["--models", *models, "--width_div", "16", "--frames", "2", "--ratios", "0.5",
                    "--rounds", "1", "--warmup", "0", "--methods", "unpatched", "tome_sd",
                    "--out_dir", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "dit_speed.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, x) for m in models for x in ("unpatched", "tome_sd")
    ]
    for r in rows:
        (_, h, w), _ = dit_speed.VIDEO[r["model"]]
        assert float(r["step_s"]) > 0 and r["tokens"] == str(2 * h * w)


def test_gpu_model_models_the_video_transformers(tmp_path: Path) -> None:
    models = sorted(_steps.VIDEO_DITS)
    rows = gpu_model.main(["--tiny", "--models", *models, "--out_dir", str(tmp_path), "--no_plot"])
    assert {r["model"] for r in rows} == set(models)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for model in models:
        mine = {r["label"]: r for r in rows if r["model"] == model}
        assert set(mine) == {r.label for r in _steps.VIDEO_ROWS}
        assert mine["unpatched"]["cluster_calls"] == 0
        assert all(r["cluster_calls"] > 0 for label, r in mine.items() if label != "unpatched")
    goals = (tmp_path / "gpu_model_goals.md").read_text()
    assert all(_steps.VIDEO_DITS[m].name in goals for m in models)
