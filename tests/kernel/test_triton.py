"""The fused Triton ATC path: exact against scipy under Triton's interpreter, no host syncs,
and the backend switch of ``cluster_tokens``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import same_partition

import atc_patch
from atc_patch.kernel.ops import resolve_backend

from .test_atc import scipy_cuts
from .test_syncs import costs

WORKER = Path(__file__).with_name("_triton_interp_worker.py")
LINKAGES = ["single", "complete", "average"]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The worker's report (it runs the fused path with ``TRITON_INTERPRET=1`` set before
    triton is imported, which a process that already imported triton cannot do)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    src = str(Path(__file__).parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_interpreted_kernel_matches_scipy(interpreted: dict) -> None:
    """Every linkage, protected 0-2, B=2, N 2..201, r from 0 to the maximum: scipy's partition,
    every slot used, protected slots fixed, slots ordered by smallest token, sizes sum to N;
    ragged 2-D and 3-D tiles: scipy's partition per tile; padding masks: scipy's partition of
    the real tokens alone, and the torch path's labels."""
    assert interpreted["cases"] > 200
    assert interpreted["failures"] == []


def test_interpreted_float32_agreement_rate(interpreted: dict) -> None:
    rate = interpreted["f32_agree"] / interpreted["f32_total"]
    print(f"float32 agreement with float64 scipy: {rate:.1%} of {interpreted['f32_total']}")
    assert rate >= 0.9


def test_interpreted_kernel_has_no_host_sync(interpreted: dict) -> None:
    """No host read and a fixed number of launches at any N (196, 1024, 4096 tokens), whole
    rows, 16 x 16 tiles or a padding mask: plain 11, tiles 12, mask 27 (aten ops plus the
    kernel; ``docs/kernel.md``)."""
    counts = interpreted["syncs"]
    assert {s["n"] for s in counts} == {196, 1024, 4096}
    assert all(s["syncs"] == 0 for s in counts), counts
    for path, most in (("plain", 12), ("tiles", 14), ("mask", 28)):
        launches = {s["launches"] for s in counts if s["path"] == path}
        assert len(launches) == 1 and launches.pop() <= most, counts


def test_torch_path_does_sync() -> None:
    """The sync counter the worker uses can fail: the torch rounds read a flag per round."""
    metric = torch.randn(2, 50, 8)
    counted = costs.count(lambda: atc_patch.cluster_tokens(metric, 20, backend="torch"))
    assert counted.syncs > 0


def test_triton_on_cpu_without_interpreter_is_a_clear_error() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs triton interpreted")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        atc_patch.cluster_tokens(torch.randn(1, 10, 4), 3, backend="triton")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "cuda"}, "backend must be one of"),
        ({"backend": "triton", "method": "tome"}, "applies to method='atc' only"),
    ],
)
def test_bad_backend(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        atc_patch.cluster_tokens(torch.randn(1, 10, 4), 3, **kwargs)


def test_auto_backend_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, 196) == "torch"
    assert resolve_backend("auto", cuda, 196) == "triton"
    assert resolve_backend("auto", cuda, 4096) == "torch"
    assert resolve_backend("triton", cpu, 4096) == "triton"


def test_auto_backend_looks_at_the_rows(monkeypatch) -> None:
    """``"auto"`` decides by the length of the rows it clusters: a tile's, not the image's."""
    import atc_patch.kernel as kernel

    seen = []
    monkeypatch.setattr(
        kernel, "resolve_backend", lambda b, d, n: seen.append(n) or resolve_backend(b, d, n)
    )
    metric = torch.randn(1, 1 + 4096, 8)
    atc_patch.cluster_tokens(metric, 2048, protected=1, grid=(64, 64), tile=(16, 16))
    atc_patch.cluster_tokens(metric, 2048, protected=1)
    assert seen == [256, 4096]
    assert resolve_backend("auto", torch.device("cuda"), 256) == "triton"


@pytest.mark.parametrize("linkage", LINKAGES)
def test_every_backend_on_device_matches_scipy(device: torch.device, linkage: str) -> None:
    """``auto`` and (on CUDA) ``triton`` on every test device: scipy's partition."""
    metric = torch.randn(3, 41, 16, dtype=torch.float64)
    backends = ["auto", "torch"] + (["triton"] if device.type == "cuda" else [])
    ref = [scipy_cuts(metric[i, 1:], linkage, [27])[:, 0] for i in range(3)]
    for backend in backends:
        plan = atc_patch.cluster_tokens(
            metric.to(device), 13, linkage=linkage, protected=1, backend=backend
        )
        labels = plan.labels.cpu()
        assert all(same_partition(labels[i, 1:], ref[i]) for i in range(3)), backend


def test_patch_functions_accept_backend() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=2)
    atc_patch.apply_patch(model, method="atc", r=1, backend="torch")
    assert atc_patch.patch_settings(model)["backend"] == "torch"
    atc_patch.remove_patch(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        atc_patch.apply_patch(model, method="atc", r=1, backend="gpu")


def test_unet_patch_backend_option() -> None:
    """``backend`` is an ``"atc"`` option of the diffusers patch: reported, checked, the same
    outputs on the CPU ("auto" runs the torch rounds there); other methods reject it."""
    from atc_patch.testing import build_unet, unet_inputs

    unet = build_unet("tiny-sd")
    inputs = unet_inputs(unet, batch=2, height=16, width=16)
    outs = {}
    for backend in ("auto", "torch"):
        atc_patch.apply_patch(unet, method="atc", ratio=0.5, backend=backend)
        assert atc_patch.patch_settings(unet)["backend"] == backend
        with torch.no_grad():
            outs[backend] = unet(**inputs).sample
    assert torch.equal(outs["auto"], outs["torch"])
    atc_patch.remove_patch(unet)
    with torch.no_grad():
        assert not torch.equal(unet(**inputs).sample, outs["torch"])  # the patch did merge
    with pytest.raises(ValueError, match="backend must be one of"):
        atc_patch.apply_patch(unet, method="atc", ratio=0.5, backend="gpu")
    for method in ("tome_sd", "tome"):
        with pytest.raises(ValueError, match="backend applies to method='atc' only"):
            atc_patch.apply_patch(unet, method=method, ratio=0.5, backend="torch")
    atc_patch.apply_patch(unet, method="tome_sd", ratio=0.5, seed=0)
    assert "backend" not in atc_patch.patch_settings(unet)
    assert atc_patch.patch_settings(unet) is not None


@pytest.mark.parametrize(
    ("dtype", "block", "warps"), [("fp32", 256, 4), ("fp64", 32, 4), ("fp32", 4096, 8)]
)
@pytest.mark.parametrize("link", [0, 1, 2])
@pytest.mark.parametrize("has_valid", [False, True])
def test_kernel_compiles_for_hopper(
    dtype: str, block: int, warps: int, link: int, has_valid: bool
) -> None:
    """The kernel compiles to an sm_90 (H100/H200) cubin without a GPU, which the interpreter
    does not check (types of the loops, layouts, reductions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from atc_patch.kernel.triton_atc import _kernel

    kernel, _, interpreted = _kernel()
    if interpreted:
        pytest.skip("this process runs triton interpreted")
    signature = {"d_ptr": f"*{dtype}", "dmin_ptr": f"*{dtype}", "out_ptr": "*i64"}
    signature |= {"r_ptr": "*i64", "valid_ptr": "*i1", "M": "i32"}
    signature |= {"LINK": "constexpr", "BLOCK": "constexpr", "ROWS": "constexpr"}
    signature |= {"HAS_VALID": "constexpr"}
    consts = {"LINK": link, "BLOCK": block, "ROWS": max(1, min(16, 4096 // block))}
    consts |= {"HAS_VALID": has_valid}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"]
