"""benchmarks/vit_speed.py: a smoke run writes one CSV row per model and configuration."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling modules

import vit_speed  # noqa: E402


def test_smoke_run_writes_every_configuration(tmp_path: Path) -> None:
    models = ["naflex_so400m", "hf_siglip2_so400m"]  # the two NaFlex batches
    vit_speed.main(["--tiny", "--rounds", "1", "--models", *models, "--out_dir", str(tmp_path)])
    with open(tmp_path / "vit_speed.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [m for m in models for _ in range(5)]
    for r in rows:
        assert float(r["images_per_s"]) > 0
        assert (r["config"] == "unpatched") == (r["tokens_out"] == r["tokens_in"])
