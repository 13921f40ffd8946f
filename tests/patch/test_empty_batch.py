"""An empty batch (B = 0) gives empty results of the right shape, in the kernel and in models."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import atc_patch
from atc_patch.kernel import MergePlan

CASES = [
    ("atc", {"linkage": "single"}),
    ("atc", {"linkage": "complete"}),
    ("atc", {"linkage": "average"}),
    ("tome", {}),
    ("kmedoids", {}),
    ("dpcknn", {}),
    ("tome_sd", {"h": 2, "w": 5}),
]


@pytest.mark.parametrize(("method", "kwargs"), CASES)
@pytest.mark.parametrize("protected", [0, 1])
def test_kernel_empty_batch(method: str, kwargs: dict, protected: int) -> None:
    if method == "tome_sd" and protected:
        pytest.skip("tome_sd merges a full grid")
    plan = atc_patch.cluster_tokens(
        torch.randn(0, 10, 8), 3, method=method, protected=protected, **kwargs
    )
    # The number of slots is what a batch of one would get: the shape depends on N, not B.
    one = atc_patch.cluster_tokens(
        torch.randn(1, 10, 8), 3, method=method, protected=protected, **kwargs
    )
    assert plan.labels.shape == (0, 10) and plan.labels.dtype == torch.long
    assert plan.num_out == one.num_out
    x = torch.randn(0, 10, 4)
    merged, size = plan.merge_wavg(x)
    assert merged.shape == (0, plan.num_out, 4) and size.shape == (0, plan.num_out, 1)
    assert plan.merge(x, mode="amax").shape == (0, plan.num_out, 4)
    assert plan.unmerge(merged).shape == (0, 10, 4)
    assert plan.merge_source().shape == (0, plan.num_out, 10)
    assert plan.sizes().shape == (0, plan.num_out)


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
@pytest.mark.parametrize("path", ["tiles", "mask", "tiles + mask"])
def test_kernel_empty_batch_tiled_or_masked(method: str, path: str) -> None:
    def call(b: int) -> atc_patch.MergePlan:
        kw = {"grid": (3, 3), "tile": (2, 2)} if "tiles" in path else {}
        if "mask" in path:
            kw["mask"] = torch.ones(b, 10, dtype=torch.bool)
        return atc_patch.cluster_tokens(torch.randn(b, 10, 8), 3, method, protected=1, **kw)

    plan, one = call(0), call(1)
    assert plan.labels.shape == (0, 10) and plan.num_out == one.num_out
    assert plan.merge(torch.randn(0, 10, 4)).shape == (0, plan.num_out, 4)


def test_empty_plan_from_labels() -> None:
    plan = MergePlan(torch.zeros(0, 6, dtype=torch.long), 4)
    assert plan.merge(torch.randn(0, 6, 3)).shape == (0, 4, 3)


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
def test_timm_vit_empty_batch(method: str) -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=7
    ).eval()
    atc_patch.apply_patch(model, method=method, r=8, prop_attn=True, trace_source=True)
    with torch.no_grad():
        out = model(torch.randn(0, 3, 224, 224))
    assert out.shape == (0, 7)


@pytest.mark.parametrize(
    ("method", "prop_attn"), [(m, p) for m in ("atc", "tome") for p in (False, True)]
)
def test_torchvision_vit_empty_batch(method: str, prop_attn: bool) -> None:
    model = torchvision.models.VisionTransformer(
        image_size=224,
        patch_size=16,
        num_layers=2,
        num_heads=3,
        hidden_dim=48,
        mlp_dim=96,
        num_classes=5,
    ).eval()
    atc_patch.apply_patch(model, method=method, r=8, prop_attn=prop_attn)
    with torch.no_grad():
        out = model(torch.randn(0, 3, 224, 224))
    assert out.shape == (0, 5)
