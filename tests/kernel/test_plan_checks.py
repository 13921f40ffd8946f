"""MergePlan input checks (issue 10.10) and float32 token sizes whatever the model dtype (10.5)."""

from __future__ import annotations

import pytest
import timm
import torch

import atc_patch
from atc_patch.kernel import MergePlan


@pytest.fixture
def plan() -> MergePlan:
    return atc_patch.cluster_tokens(torch.randn(2, 20, 8), 5, protected=1)


@pytest.mark.parametrize(
    "size",
    [torch.ones(2, 20), torch.ones(2, 19, 1), torch.rand(2, 20, 16) + 1, torch.ones(2, 20, 1, 1)],
)
def test_size_must_be_b_n_1(plan: MergePlan, size: torch.Tensor) -> None:
    with pytest.raises(
        ValueError, match=r"size must be a \(B, N, 1\) tensor with \(B, N\) = \(2, 20\)"
    ):
        plan.merge_wavg(torch.randn(2, 20, 16), size)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_size_must_be_positive(plan: MergePlan, bad: float) -> None:
    size = torch.ones(2, 20, 1)
    size[1, 7] = bad
    with pytest.raises(ValueError, match="size must be positive"):
        plan.merge_wavg(torch.randn(2, 20, 16), size)


def test_size_bool_rejected(plan: MergePlan) -> None:
    with pytest.raises(ValueError, match="real"):
        plan.merge_wavg(torch.randn(2, 20, 16), torch.ones(2, 20, 1, dtype=torch.bool))


def test_other_tensors_name_themselves(plan: MergePlan) -> None:
    with pytest.raises(ValueError, match=r"^x must be a \(B, N, C\) tensor"):
        plan.merge(torch.randn(2, 19, 4))
    with pytest.raises(ValueError, match=r"^source must be a \(B, N, N0\) tensor"):
        plan.merge_source(torch.eye(20))


@pytest.mark.parametrize(
    ("labels", "num_out", "match"),
    [
        (
            torch.tensor([[0, 5, 1]]),
            2,
            r"labels must be in \[0, num_out\) = \[0, 2\), got .*\[0, 5\]",
        ),
        (torch.tensor([[0, -1, 1]]), 2, r"labels must be in \[0, num_out\)"),
        (torch.tensor([[0.0, 1, 1]]), 2, r"labels must be a \(B, N\) integer tensor, got dtype"),
        (torch.tensor([[True, False]]), 2, "integer tensor"),
        (torch.tensor([0, 1]), 2, r"labels must be a \(B, N\) integer tensor, got \(2,\)"),
        (torch.tensor([[0, 0, 2]]), 3, "every one of the num_out = 3 slots"),
        (torch.tensor([[0, 1]]), 3, r"num_out must be in \[1, N\]"),
        (torch.tensor([[0, 1]]), 0, r"num_out must be in \[1, N\]"),
        (torch.tensor([[0, 1]]), 1.5, "num_out must be an int"),
    ],
)
def test_bad_labels(labels: torch.Tensor, num_out, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MergePlan(labels, num_out)


def test_labels_of_any_integer_dtype() -> None:
    plan = MergePlan(torch.tensor([[0, 1, 1]], dtype=torch.int32), 2)
    assert plan.labels.dtype == torch.long
    assert torch.equal(plan.merge(torch.ones(1, 3, 1), mode="sum"), torch.tensor([[[1.0], [2.0]]]))


def test_validate_false_skips_value_checks() -> None:
    MergePlan(torch.tensor([[0, 0]]), 2, validate=False)  # unused slot: the caller's promise


# --- sizes in float32 (issue 10.5) -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sizes_above_256_are_exact(dtype: torch.dtype) -> None:
    x = torch.ones(1, 602, 8)
    x[0, -1] = -1  # 601 identical tokens and one other: one cluster of 601
    plan = atc_patch.cluster_tokens(x, 600)
    merged, size = plan.merge_wavg(torch.randn(1, 602, 4).to(dtype))
    assert merged.dtype == dtype and size.dtype == torch.float32
    assert sorted(size.flatten().tolist()) == [1.0, 601.0]


def test_float64_sizes_stay_float64() -> None:
    plan = atc_patch.cluster_tokens(torch.randn(1, 10, 4), 4)
    _, size = plan.merge_wavg(torch.randn(1, 10, 3), torch.ones(1, 10, 1, dtype=torch.float64))
    assert size.dtype == torch.float64


def test_bf16_vit_sizes_are_exact_counts() -> None:
    """A bf16 ViT with proportional attention: the sizes are the true cluster sizes (from the
    source map) and sum to the input token count; bf16 sizes would round 257 and above."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=448, num_classes=3
    ).eval()
    model = model.to(torch.bfloat16)
    atc_patch.apply_patch(
        model, method="atc", linkage="single", r=[775, 0], prop_attn=True, trace_source=True
    )
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, out: seen.append(out.size))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 448, 448, dtype=torch.bfloat16))
    assert out.shape == (2, 3) and torch.isfinite(out.float()).all()
    (size,) = seen
    assert size.dtype == torch.float32 and size.shape == (2, 785 - 775, 1)
    assert torch.equal(size.sum(dim=1), torch.full((2, 1), 785.0))
    true = atc_patch.last_source(model).double().sum(dim=-1, keepdim=True)
    assert torch.equal(size.double(), true)
    assert size.max() > 256  # the case bf16 cannot count
