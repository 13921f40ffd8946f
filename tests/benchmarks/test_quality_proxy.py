"""benchmarks/quality_proxy.py: the relative error of the noise prediction per patch setting,
zero for a patch that removes nothing, written as CSV (tiny stand-ins here)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling modules

import _steps  # noqa: E402
import quality_proxy  # noqa: E402


def test_quality_proxy_rows_and_csv(tmp_path: Path, monkeypatch) -> None:
    rows = (
        _steps.Row("unpatched"),
        _steps.Row("nothing", "atc", {"ratio": 0.0, "plan_scope": "resolution"}),
        _steps.Row("tome_sd", "tome_sd", {"ratio": 0.5, "seed": 0}),
        _steps.Row("kept", "atc", {"ratio": 0.5, "backend": "triton", "reuse_steps": 2}),
        _steps.Row("kv", "atc", {"ratio": 0.5, "tile": (4, 4), "merge": "kv"}),
        _steps.Row("bad", "atc", {"ratio": 0.5, "blocks": (0,)}),  # a DiT option on a UNet
    )
    monkeypatch.setattr(quality_proxy, "DIFFUSION_ROWS", rows)
    out = quality_proxy.main(["--tiny", "--models", "sd15", "--resolution", "128", "--steps",
                              "2", "--out_dir", str(tmp_path)])  # fmt: skip
    got = {r["label"]: r for r in out}
    assert set(got) == {"nothing", "tome_sd", "kept", "kv", "bad"}
    assert got["nothing"]["rel_l2_mean"] == 0.0
    assert all(got[k]["rel_l2_mean"] > 0 for k in ("tome_sd", "kept", "kv"))
    assert "backend" not in got["kept"]["options"]  # the plans do not depend on it
    assert got["kv"]["rel_l2_mean"] < got["tome_sd"]["rel_l2_mean"]
    assert got["bad"]["status"] == "n/a (rejected)"
    with open(tmp_path / "quality_proxy.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 5 and tuple(written[0]) == quality_proxy.COLUMNS
    assert len(written[1]["rel_l2_steps"].split()) == 2
