"""ToMe and ToMe-SD: hand-derived examples and parity with the tomesd package."""

from __future__ import annotations

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d

import atc_patch
from atc_patch.kernel import max_reduction


def hand_tokens() -> torch.Tensor:
    # A = even positions {0, 2}, B = odd positions {1, 3}.
    # cos(t0, t1) = 0.995 (best edge), cos(t2, t3) = 0.707, cos(t0, t3) = 0.707, cos(t2, t1) ~ 0.1
    return torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]]])


def test_tome_r1_hand_example() -> None:
    plan = atc_patch.cluster_tokens(hand_tokens(), r=1, method="tome")
    # t0 merges into t1; order = unmerged A (t2), then B (t1, t3)
    assert plan.labels.tolist() == [[1, 1, 0, 2]]
    x = torch.tensor([[[1.0], [3.0], [10.0], [20.0]]])
    merged, size = plan.merge_wavg(x)
    assert merged.flatten().tolist() == [10.0, 2.0, 20.0]
    assert size.flatten().tolist() == [1.0, 2.0, 1.0]


def test_tome_r2_hand_example() -> None:
    plan = atc_patch.cluster_tokens(hand_tokens(), r=2, method="tome")
    # both A tokens merge: t0 -> t1 (slot 0), t2 -> t3 (slot 1)
    assert plan.labels.tolist() == [[0, 0, 1, 1]]


def test_tome_size_weighted_merge() -> None:
    plan = atc_patch.cluster_tokens(hand_tokens(), r=1, method="tome")
    x = torch.tensor([[[1.0], [4.0], [10.0], [20.0]]])
    size = torch.tensor([[[3.0], [1.0], [1.0], [2.0]]])
    merged, msize = plan.merge_wavg(x, size)
    assert merged[0, 1, 0].item() == pytest.approx((1.0 * 3 + 4.0 * 1) / 4)
    assert msize.flatten().tolist() == [1.0, 4.0, 2.0]


def test_tome_protected_class_token() -> None:
    # cls at 0 (even -> would be in A); it must never merge and keeps slot 0.
    # Unprotected A = {2, 4}, B = {1, 3}; t4 is nearly t3, t2 is far from both B tokens.
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [-1.0, 0.2], [0.0, 1.0], [0.05, 1.0]]])
    plan = atc_patch.cluster_tokens(x, r=1, method="tome", protected=1)
    assert plan.labels.tolist() == [[0, 2, 1, 3, 3]]


def test_tome_distillation_token_keeps_slot_1() -> None:
    x = torch.randn(2, 12, 4)
    plan = atc_patch.cluster_tokens(x, r=5, method="tome", protected=2)
    assert torch.equal(plan.labels[:, :2], torch.tensor([[0, 1], [0, 1]]))
    assert (plan.labels[:, 2:] >= 2).all() and plan.num_out == 7


def test_tome_at_most_half() -> None:
    assert max_reduction("tome", 197, 1) == 98
    assert max_reduction("tome", 198, 2) == 98
    assert max_reduction("tome", 5, 0) == 2
    plan = atc_patch.cluster_tokens(torch.randn(1, 197, 8), r=500, method="tome", protected=1)
    assert plan.num_out == 99


def test_tome_matches_reference_algorithm() -> None:
    """Against a line-by-line rendering of ToMe's bipartite_soft_matching + merge_wavg."""
    torch.manual_seed(3)
    metric = torch.randn(4, 197, 16)
    x = torch.randn(4, 197, 8)
    size = torch.randint(1, 5, (4, 197, 1)).float()
    r = 40
    # --- reference (ToMe, class_token=True) ---
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def ref_merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    ref_x = ref_merge(x * size)
    ref_size = ref_merge(size)
    ref_x = ref_x / ref_size
    # --- ours ---
    plan = atc_patch.cluster_tokens(metric, r=r, method="tome", protected=1)
    got_x, got_size = plan.merge_wavg(x, size)
    torch.testing.assert_close(got_x, ref_x)
    torch.testing.assert_close(got_size, ref_size)


@pytest.mark.parametrize(("h", "w"), [(8, 8), (6, 10), (7, 9), (5, 5)])
@pytest.mark.parametrize("no_rand", [True, False])
def test_tome_sd_matches_tomesd(h: int, w: int, no_rand: bool) -> None:
    metric = torch.randn(3, h * w, 16)
    x = torch.randn(3, h * w, 8)
    r = int(h * w * 0.5)
    gen_a = torch.Generator().manual_seed(7)
    gen_b = torch.Generator().manual_seed(7)
    merge, unmerge = bipartite_soft_matching_random2d(
        metric, w, h, 2, 2, r, no_rand=no_rand, generator=gen_a
    )
    plan = atc_patch.cluster_tokens(
        metric, r=r, method="tome_sd", h=h, w=w, sx=2, sy=2, no_rand=no_rand, generator=gen_b
    )
    ref = merge(x)
    got = plan.merge(x, mode="mean")
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(plan.unmerge(got), unmerge(ref))


def test_tome_sd_seeded_is_reproducible() -> None:
    metric = torch.randn(2, 64, 8)
    plans = [
        atc_patch.cluster_tokens(
            metric, r=32, method="tome_sd", h=8, w=8, generator=torch.Generator().manual_seed(0)
        )
        for _ in range(2)
    ]
    assert torch.equal(plans[0].labels, plans[1].labels)
