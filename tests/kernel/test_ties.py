"""Ties and rounding (issue 20, item 6): the distance matrix is exactly symmetric with a zero
diagonal, partitions do not move with 1e-6 relative noise, a sample's labels do not depend on
the rest of the batch, and exact ties (equal tokens) are broken the same way wherever the
sample sits in a batch."""

from __future__ import annotations

import pytest
import torch
from conftest import same_partition

import atc_patch
from atc_patch.kernel.distance import cosine_distance, negative_cosine_workspace

METHODS = ["atc", "tome", "kmedoids", "dpcknn"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distances_are_exactly_symmetric_with_a_zero_diagonal(dtype: torch.dtype) -> None:
    metric = torch.randn(3, 300, 24, dtype=dtype) * torch.rand(3, 300, 1, dtype=dtype) * 50
    d = cosine_distance(metric)
    assert torch.equal(d, d.mT)
    assert torch.equal(d.diagonal(dim1=1, dim2=2), torch.zeros(3, 300, dtype=dtype))
    ws = negative_cosine_workspace(metric)
    block = ws.d[:, :300, :300]
    assert torch.equal(block, block.mT)


def _part(labels: torch.Tensor) -> set:
    return {frozenset((labels == v).nonzero().flatten().tolist()) for v in labels.unique()}


@pytest.mark.parametrize("method", METHODS)
def test_relative_noise_does_not_change_partitions(method: str) -> None:
    """``d06``'s check: 60 random samples, 1e-6 relative noise, 10 of 64 tokens removed."""
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(60):
        m = torch.randn(1, 65, 16, generator=gen)
        m2 = m * (1 + 1e-6 * torch.randn(m.shape, generator=gen))
        p1 = atc_patch.cluster_tokens(m, 10, method, protected=1).labels[0]
        p2 = atc_patch.cluster_tokens(m2, 10, method, protected=1).labels[0]
        changed += _part(p1) != _part(p2)
    assert changed == 0


@pytest.mark.parametrize("method", ["atc", "kmedoids", "dpcknn"])
def test_well_separated_groups_are_found_under_noise(method: str) -> None:
    """16 groups of 4 near-copies: cutting to 16 clusters gives the groups, noise or not."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(16, 32, generator=gen)
    metric = centres.repeat_interleave(4, dim=0)[None] + 0.01 * torch.randn(
        1, 64, 32, generator=gen
    )
    groups = torch.arange(64) // 4
    for _ in range(20):
        noisy = metric * (1 + 1e-6 * torch.randn(metric.shape, generator=gen))
        labels = atc_patch.cluster_tokens(noisy, 48, method).labels[0]
        assert same_partition(labels, groups)


def _grouped_with_ties(gen: torch.Generator) -> torch.Tensor:
    """``(1, 1 + 48, 8)``: 12 distinct tokens, each four times (exact ties everywhere)."""
    base = torch.randn(1, 12, 8, generator=gen)
    return torch.cat([torch.randn(1, 1, 8, generator=gen), base.repeat(1, 4, 1)], dim=1)


PATHS = {
    "plain": {},
    "tiles": {"grid": (6, 8), "tile": (4, 3)},
    "mask": {"mask": True},
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", METHODS)
def test_a_batch_equals_per_sample_calls_bit_for_bit(method: str, path: str) -> None:
    gen = torch.Generator().manual_seed(2)
    metric = torch.cat([torch.randn(4, 49, 8, generator=gen), _grouped_with_ties(gen)])
    kw = dict(PATHS[path])
    mask = torch.rand(5, 49, generator=gen) > 0.3 if kw.pop("mask", False) else None
    for r in (7, 20, 40):
        together = atc_patch.cluster_tokens(metric, r, method, protected=1, mask=mask, **kw)
        for i in range(5):
            one = None if mask is None else mask[i : i + 1]
            alone = atc_patch.cluster_tokens(
                metric[i : i + 1], r, method, protected=1, mask=one, **kw
            )
            assert torch.equal(together.labels[i], alone.labels[0]), (method, path, r, i)


@pytest.mark.parametrize("method", METHODS + ["tome_sd"])
def test_equal_tokens_give_the_same_partition_in_any_batch(method: str) -> None:
    """A sample full of exact ties, in batches of different companions and order: the same
    labels every time (ties are broken inside the sample, never by its neighbours)."""
    gen = torch.Generator().manual_seed(3)
    sample = _grouped_with_ties(gen)[:, 1:]  # 48 tokens: a 6 x 8 grid for tome_sd
    kw = {"h": 6, "w": 8, "no_rand": True} if method == "tome_sd" else {}
    want = atc_patch.cluster_tokens(sample, 30, method, **kw).labels[0]
    for b in (2, 3, 7):
        others = torch.randn(b - 1, 48, 8, generator=gen)
        for at in range(b):
            batch = torch.cat([others[:at], sample, others[at:]])
            got = atc_patch.cluster_tokens(batch, 30, method, **kw).labels[at]
            assert torch.equal(got, want), (method, b, at)
