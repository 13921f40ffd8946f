"""On the ``meta`` device ``cluster_tokens`` returns a correctly shaped plan for every method
and path (token counts never depend on the data), and every plan operation runs on it."""

from __future__ import annotations

import pytest
import torch

import atc_patch

CASES = [
    ("atc", {"linkage": "average"}),
    ("atc", {"linkage": "single", "backend": "triton"}),
    ("tome", {}),
    ("kmedoids", {}),
    ("dpcknn", {}),
    ("atc", {"grid": (6, 8), "tile": (4, 4)}),
    ("tome", {"grid": (6, 8), "tile": (4, 4)}),
    ("kmedoids", {"grid": (6, 8), "tile": (5, 3)}),
    ("dpcknn", {"mask": True}),
    ("atc", {"grid": (6, 8), "tile": (4, 4), "mask": True}),
]


@pytest.mark.parametrize(("method", "kwargs"), CASES)
@pytest.mark.parametrize("r", [0, 7, 30, 500])
def test_meta_plan_has_the_shapes_of_a_real_one(method: str, kwargs: dict, r: int) -> None:
    n, c = 1 + 48, 8
    kwargs = dict(kwargs)
    if kwargs.pop("mask", False):
        kwargs["mask"] = torch.ones(2, n, dtype=torch.bool)
    cpu_kw = {k: v for k, v in kwargs.items() if k != "backend"}  # (triton: meta only here)
    real = atc_patch.cluster_tokens(torch.randn(2, n, c), r, method, protected=1, **cpu_kw)
    meta_kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    plan = atc_patch.cluster_tokens(
        torch.empty(2, n, c, device="meta"), r, method, protected=1, **meta_kw
    )
    assert plan.num_out == real.num_out
    assert plan.labels.device.type == "meta" and plan.labels.shape == (2, n)
    assert plan.labels.dtype == torch.long
    x = torch.empty(2, n, 16, device="meta")
    merged, size = plan.merge_wavg(x)
    assert merged.shape == (2, plan.num_out, 16) and size.shape == (2, plan.num_out, 1)
    assert plan.merge(x, mode="amax").shape == (2, plan.num_out, 16)
    assert plan.unmerge(merged).shape == (2, n, 16)
    assert plan.merge_source().shape == (2, plan.num_out, n)
    assert plan.merge_source(torch.empty(2, n, 5, device="meta")).shape == (2, plan.num_out, 5)
    assert plan.sizes().shape == (2, plan.num_out)


@pytest.mark.parametrize(("r", "grid"), [(40, (8, 8)), (100, (8, 8)), (50, (2, 6, 6))])
def test_meta_tome_sd(r: int, grid: tuple) -> None:
    n = 72 if len(grid) == 3 else 64
    kw = {"grid": grid, "st": 2} if len(grid) == 3 else {"grid": grid}
    real = atc_patch.cluster_tokens(torch.randn(2, n, 8), r, "tome_sd", **kw)
    plan = atc_patch.cluster_tokens(torch.empty(2, n, 8, device="meta"), r, "tome_sd", **kw)
    assert plan.num_out == real.num_out and plan.labels.is_meta
