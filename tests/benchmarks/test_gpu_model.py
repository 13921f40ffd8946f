"""benchmarks/gpu_model.py and its cost model (benchmarks/_costmodel.py, _clustercost.py):
flash attention by formula, host syncs counted, clustering charged, the CSV's columns."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling modules

import _clustercost  # noqa: E402
import _steps  # noqa: E402
import gpu_model  # noqa: E402
from _costmodel import H100, H200, CostModel, to_device  # noqa: E402

import atc_patch  # noqa: E402


def test_flash_attention_is_costed_by_its_formula() -> None:
    b, h, nq, nk, d = 2, 3, 40, 56, 16
    q = torch.empty(b, h, nq, d, device="meta", dtype=torch.bfloat16)
    k = torch.empty(b, h, nk, d, device="meta", dtype=torch.bfloat16)
    with CostModel(H100) as cm:
        out = F.scaled_dot_product_attention(q, k, k)
    flops = 4 * b * h * nq * nk * d
    nbytes = 2 * (2 * q.numel() + 2 * k.numel())  # q, k, v, o in bf16
    assert out.shape == q.shape and out.is_meta
    t = cm.totals
    assert (t.flops, t.bytes, t.launches, t.syncs) == (flops, nbytes, 1, 0)
    assert t.seconds == pytest.approx(max(nbytes / 3.35e12, flops / 600e12) + 4e-6, rel=1e-12)
    assert t.seconds_by["attention"] == pytest.approx(t.seconds)

    mask = torch.empty(b, 1, 1, nk, device="meta", dtype=torch.bfloat16)  # a key bias
    with CostModel(H200) as cm:
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    assert (cm.totals.flops, cm.totals.bytes) == (flops, nbytes + 2 * b * nk)


def test_matmul_and_convolution_flops() -> None:
    a = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    w = torch.empty(32, 48, device="meta", dtype=torch.bfloat16)
    x = torch.empty(2, 8, 16, 16, device="meta", dtype=torch.bfloat16)
    conv = torch.empty(12, 8, 3, 3, device="meta", dtype=torch.bfloat16)
    with CostModel(H100) as cm:
        a @ w
    assert cm.totals.flops == 2 * 64 * 32 * 48 and cm.totals.launches == 1
    with CostModel(H100) as cm:
        F.conv2d(x, conv, padding=1)
    assert cm.totals.flops == 2 * (2 * 12 * 16 * 16) * (8 * 3 * 3)
    with CostModel(H100) as cm:  # views and allocations are free
        x.reshape(2, -1)[:, :4].unsqueeze(0).transpose(0, 1)
        torch.empty(3, device="meta")
    assert (cm.totals.launches, cm.totals.seconds) == (0, 0.0)
    with CostModel(H100) as cm:  # a reshape that must copy is one kernel
        x.transpose(1, 2).reshape(2, -1)
    assert cm.totals.launches == 1 and cm.totals.bytes == 2 * 2 * x.numel()


def test_host_syncs_are_counted_and_answered() -> None:
    x = torch.empty(4, 5, device="meta")
    with CostModel(H100) as cm:
        value = x.sum().item()
        flag = bool((x > 0).all())
        listed = x[0].tolist()
        where = torch.nonzero(x)
    assert (value, flag, listed) == (0.0, True, [0.0] * 5)
    assert where.shape == (20, 2) and cm.totals.syncs == 4

    with CostModel(H100, devices={"cpu"}) as cm:  # CPU tensors standing for device ones
        y = torch.arange(6.0)
        assert int(y.max()) == 5 and y.tolist()[1] == 1.0
        with torch.inference_mode():
            assert y.argmax().item() == 5
    assert cm.totals.syncs == 3
    with CostModel(H100) as cm:  # on meta, host tensors are host work: nothing charged
        int(torch.arange(3).max())
    assert (cm.totals.syncs, cm.totals.launches) == (0, 0)


def test_shadows_give_real_values_and_copies_to_the_device_sync() -> None:
    ids = torch.arange(12.0).reshape(4, 3)
    cm = CostModel(H100)
    meta = to_device(cm, ids)
    with cm:
        assert meta.is_meta and int(meta[:, 1].round().long().max()) == 10
        assert torch.equal(meta[:, 0] * 2, torch.arange(0.0, 24.0, 6.0, device="meta"))
        torch.ones(3).to("meta")  # a host -> device copy waits for the device
    assert cm.totals.syncs == 3


def test_clustering_on_meta_is_charged_and_shape_only() -> None:
    metric = torch.empty(2, 300, 16, device="meta", dtype=torch.bfloat16)
    rows = torch.empty(4, 300, 16, device="meta", dtype=torch.bfloat16)
    with CostModel(H100) as cm, _clustercost.clustering_on_meta(cm) as calls:
        fused = atc_patch.kernel.cluster_tokens(metric, 100, "atc", backend="triton")
        fused_seconds = cm.totals.seconds
        torch_path = atc_patch.kernel.cluster_tokens(metric, 100, "atc", backend="torch")
        tome = atc_patch.kernel.cluster_tokens(metric, 40, "tome")
        r = to_device(cm, torch.full((4,), 10))
        labels = torch.ops.atc_patch.atc_labels(rows, None, r, "average", "triton")
        torch_labels = torch.ops.atc_patch.atc_labels(rows, None, r, "average", "torch")
    assert (fused.num_out, torch_path.num_out, tome.num_out) == (200, 200, 260)
    assert fused.labels.is_meta and fused.labels.shape == (2, 300)
    assert labels.is_meta and labels.shape == torch_labels.shape == (4, 300)
    assert calls.count == 5 and calls.how == {
        "atc triton (formula)": 2,
        "atc torch (CPU stand-in)": 2,
        "tome (CPU stand-in)": 1,
    }
    # The fused kernel: 100 sequential merges of one 300-token row (2 blocks of 256) at 2 us,
    # and a handful of launches, no host sync.
    assert fused_seconds > 100 * 2 * 2e-6
    assert calls.launches[0] <= 10 and calls.syncs[0] == 0
    assert _clustercost.fused_kernel_seconds(2, 300, 100, 132, 2e-6, 256) == pytest.approx(4e-4)
    assert _clustercost.fused_kernel_seconds(264, 300, 100, 132, 2e-6, 256) == pytest.approx(8e-4)
    # The torch path's rounds synchronise with the host.
    assert calls.syncs[1] >= 3 and calls.syncs[4] >= 1 and calls.syncs[3] == 0
    assert cm.totals.seconds_by["cluster"] == pytest.approx(cm.totals.seconds)


def test_tiled_fused_clustering_is_one_program_per_tile() -> None:
    """64 x 64 tokens in 16 x 16 tiles: 16 rows of 256 tokens per sample, r split evenly (128
    each), one wave on 132 SMs; the whole image would be one 4096-token row per sample."""
    metric = torch.empty(2, 4096, 16, device="meta", dtype=torch.bfloat16)
    mask = torch.ones(2, 4096, dtype=torch.bool, device="meta")
    seconds, launches = {}, {}
    for name, opts in (
        ("whole", {}),
        ("tiled", {"grid": (64, 64), "tile": (16, 16)}),
        ("masked", {"grid": (64, 64), "tile": (16, 16), "mask": mask}),
    ):
        with CostModel(H100) as cm, _clustercost.clustering_on_meta(cm) as calls:
            plan = atc_patch.kernel.cluster_tokens(metric, 2048, backend="triton", **opts)
        assert plan.num_out == 2048 and plan.labels.shape == (2, 4096)
        assert calls.how == {"atc triton (formula)": 1} and calls.syncs == [0]
        launches[name] = calls.launches[0]
        seconds[name] = cm.totals.seconds_by["cluster"]
    # The kernel's measured counts (docs/kernel.md): 8 plain, 12 tiled, 27 masked, at any N.
    assert launches["whole"] <= 10 and launches["tiled"] <= 15 and launches["masked"] <= 30
    kernel = _clustercost.fused_kernel_seconds(32, 256, 128, 132, 2e-6)
    assert kernel == pytest.approx(128 * 2e-6)
    assert seconds["tiled"] == pytest.approx(kernel, rel=0.5)
    assert seconds["whole"] > 20 * seconds["tiled"]  # 2048 merges x 16 blocks vs 128 x 1


def test_tiny_models_run_on_meta_with_positive_costs(tmp_path: Path) -> None:
    rows = gpu_model.main(
        ["--tiny", "--models", "sd15", "flux", "--out_dir", str(tmp_path), "--no_plot"]
    )
    with open(tmp_path / "gpu_model.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == _steps.COLUMNS
        documented = {"model", "resolution", "batch", "label", "status", "ms", "ratio"}
        documented |= {"launches", "syncs", "cluster_calls", "hbm_gb", "cluster_ms", "source"}
        assert documented <= set(reader.fieldnames)
        written = list(reader)
    assert len(written) == len(rows) == 2 * len(_steps.DIFFUSION_ROWS)
    ok = {(r["model"], r["label"]): r for r in rows if r["status"] == "ok"}
    for model in ("sd15", "flux"):
        base = ok[(model, "unpatched")]
        assert base["ms"] > 0 and base["launches"] > 0 and base["ratio"] == 1.0
        assert base["syncs"] == 0 and base["cluster_calls"] == 0 and base["attention_ms"] > 0
        for method in ("tome_sd", "atc"):
            r = ok[(model, method)]
            assert r["ms"] > 0 and r["cluster_calls"] > 0 and r["cluster_ms"] > 0
            assert r["ratio"] == pytest.approx(r["ms"] / base["ms"], abs=1e-3)
    # tome_sd seeds on the device, ATC's fused path reads nothing: no host sync in a step.
    for model in ("sd15", "flux"):
        assert ok[(model, "tome_sd")]["syncs"] == ok[(model, "atc triton")]["syncs"] == 0
    assert all(r["status"] == "ok" or r["status"].startswith("n/a") for r in rows)


def test_rows_the_library_rejects_are_reported(tmp_path: Path, monkeypatch) -> None:
    rows = (_steps.Row("unpatched"), _steps.Row("bogus", "atc", {"no_such_option": 1}))
    monkeypatch.setattr(_steps, "DIFFUSION_ROWS", rows)
    out = gpu_model.main(["--tiny", "--models", "sd15", "--out_dir", str(tmp_path), "--no_plot"])
    bogus = [r for r in out if r["label"] == "bogus"]
    assert bogus[0]["status"] == "n/a (option not available)"
    assert "no_such_option" in bogus[0]["note"] and "ms" not in bogus[0]


def test_hardware_options() -> None:
    args = gpu_model.parse(["--hardware", "h200", "--launch_us", "0", "--sms", "100"])
    hw = gpu_model.hardware(args)
    assert (hw.bandwidth, hw.launch_s, hw.sms) == (4.8e12, 0.0, 100)
    assert math.isclose(hw.peak_flops, 600e12)
    with pytest.raises(SystemExit):
        gpu_model.parse(["--per_merge_us", "0"])
