"""Padding masks (``mask=``, True = a real token): real and padding tokens never merge, real
tokens receive the merges first, and the real tokens' partition does not depend on the padding
tokens' values (issue 20, item 4); ATC's real partition is scipy's on the real tokens alone."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import same_partition

import atc_patch
from atc_patch.kernel import max_reduction

from .test_atc import scipy_cuts
from .test_tiles import tile_rs, tiles_of

METHODS = ["atc", "tome", "kmedoids", "dpcknn"]


def padded(b: int, n: int, protected: int, gen: torch.Generator) -> torch.Tensor:
    """A (B, N) mask: sample 0 padded at the end, sample 1 scattered, sample 2 unpadded."""
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, n - n // 3 :] = False
    mask[1, protected:] = torch.rand(n - protected, generator=gen) > 0.4
    return mask


def cap(method: str, tokens: int) -> int:
    return tokens // 2 if method == "tome" else max(tokens - 1, 0)


CASES = [  # (tokens N, protected, grid, tile)
    (40, 0, None, None),
    (41, 1, None, None),
    (1 + 48, 1, (6, 8), (4, 3)),
    (2 + 60, 2, (3, 4, 5), (2, 3, 3)),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "protected", "grid", "tile"), CASES)
def test_padding_values_do_not_change_the_real_tokens(method, n, protected, grid, tile) -> None:
    gen = torch.Generator().manual_seed(1)
    metric = torch.randn(3, n, 8, generator=gen)
    mask = padded(3, n, protected, gen)
    kw = {"protected": protected, "grid": grid, "tile": tile, "mask": mask}
    for r in (3, n // 3, n):
        plan = atc_patch.cluster_tokens(metric, r, method, **kw)
        other = metric.clone()
        pad = ~mask
        pad[:, :protected] = False
        other[pad] = torch.randn(int(pad.sum()), 8, generator=gen) * 5
        other[1, -1] = float("nan") if not mask[1, -1] else other[1, -1]
        again = atc_patch.cluster_tokens(other, r, method, **kw)
        assert again.num_out == plan.num_out
        real = mask.clone()
        real[:, :protected] = True
        assert torch.equal(plan.labels[real], again.labels[real]), (method, r)
        masked = max_reduction(method, n, protected, grid=grid, tile=tile, masked=True)
        assert plan.num_out == n - min(r, masked)
        for i in range(3):  # a padding token never shares a slot with a real one
            assert not set(plan.labels[i][real[i]].tolist()) & set(plan.labels[i][pad[i]].tolist())
            if pad[i].any():  # slots: protected, every real cluster, then the padding ones
                assert plan.labels[i][real[i]].max() < plan.labels[i][pad[i]].min()
        atc_patch.MergePlan(plan.labels, plan.num_out, validate=True)


@pytest.mark.parametrize("method", METHODS)
def test_real_tokens_receive_the_merges_first(method: str) -> None:
    n, protected, grid, tile = 1 + 48, 1, (6, 8), (4, 3)
    gen = torch.Generator().manual_seed(2)
    metric = torch.randn(3, n, 8, generator=gen)
    mask = padded(3, n, protected, gen)
    tiles = tiles_of(grid, tile)
    for r in (5, 20, 40):
        plan = atc_patch.cluster_tokens(
            metric, r, method, protected=protected, grid=grid, tile=tile, mask=mask
        )
        for i in range(3):
            for tokens, r_t in zip(tiles, tile_rs(method, r, grid, tile, masked=True)):
                pos = torch.tensor(tokens) + protected
                is_real = mask[i, pos]
                n_real = int(is_real.sum())
                r_real = min(r_t, cap(method, n_real))
                real_slots = plan.labels[i, pos][is_real].unique().numel()
                pad_slots = plan.labels[i, pos][~is_real].unique().numel()
                assert real_slots == n_real - r_real
                assert pad_slots == (len(tokens) - n_real) - (r_t - r_real)


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
@pytest.mark.parametrize("protected", [0, 1])
def test_atc_real_partition_is_scipys_on_the_real_tokens(linkage: str, protected: int) -> None:
    n = 60 + protected
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(3, n, 8, generator=gen, dtype=torch.float64)
    mask = padded(3, n, protected, gen)
    for r in (4, 25, 57):
        plan = atc_patch.cluster_tokens(metric, r, linkage=linkage, protected=protected, mask=mask)
        for i in range(3):
            real = mask[i].clone()
            real[:protected] = False
            n_real = int(real.sum())
            r_real = min(r, n_real - 1)
            ref = scipy_cuts(metric[i, real], linkage, [n_real - r_real])[:, 0]
            assert same_partition(plan.labels[i, real], ref), (linkage, r, i)


@pytest.mark.parametrize("linkage", ["single", "average"])
def test_tiled_atc_with_mask_is_scipys_per_tile(linkage: str) -> None:
    grid, tile, protected = (7, 6), (4, 4), 1
    n = protected + math.prod(grid)
    gen = torch.Generator().manual_seed(4)
    metric = torch.randn(2, n, 8, generator=gen, dtype=torch.float64)
    mask = padded(2, n, protected, gen)
    r = 20
    plan = atc_patch.cluster_tokens(
        metric, r, linkage=linkage, protected=protected, grid=grid, tile=tile, mask=mask
    )
    for i in range(2):
        for tokens, r_t in zip(tiles_of(grid, tile), tile_rs("atc", r, grid, tile, masked=True)):
            pos = torch.tensor(tokens) + protected
            real = mask[i, pos]
            r_real = min(r_t, max(int(real.sum()) - 1, 0))
            for part, r_part in ((real, r_real), (~real, r_t - r_real)):
                count = int(part.sum())
                if count >= 2:
                    ref = scipy_cuts(metric[i, pos[part]], linkage, [count - r_part])[:, 0]
                    assert same_partition(plan.labels[i, pos[part]], ref)


def test_integer_mask_equals_bool_mask() -> None:
    metric = torch.randn(2, 30, 8)
    mask = torch.rand(2, 30) > 0.3
    a = atc_patch.cluster_tokens(metric, 10, mask=mask)
    b = atc_patch.cluster_tokens(metric, 10, mask=mask.long())  # transformers' attention_mask
    assert torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("method", ["atc", "kmedoids"])
def test_all_real_mask_equals_no_mask_below_the_reserved_slot(method: str) -> None:
    """With every token real the partition is the unmasked one (r up to N - protected - 2:
    a masked row keeps one slot for padding, whatever the mask holds)."""
    metric = torch.randn(3, 41, 8)
    ones = torch.ones(3, 41, dtype=torch.bool)
    for r in (5, 20, 38):
        plain = atc_patch.cluster_tokens(metric, r, method, protected=1)
        masked = atc_patch.cluster_tokens(metric, r, method, protected=1, mask=ones)
        assert torch.equal(plain.labels, masked.labels)
    assert atc_patch.cluster_tokens(metric, 100, method, protected=1, mask=ones).num_out == 3


def test_protected_tokens_ignore_their_mask_value() -> None:
    metric = torch.randn(2, 20, 8)
    mask = torch.rand(2, 20) > 0.3
    flipped = mask.clone()
    flipped[:, :2] = ~flipped[:, :2]
    a = atc_patch.cluster_tokens(metric, 6, protected=2, mask=mask)
    b = atc_patch.cluster_tokens(metric, 6, protected=2, mask=flipped)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.labels[:, :2], torch.tensor([[0, 1], [0, 1]]))


def test_merged_mask_is_real_first() -> None:
    """What a patch does with the mask after a merge: amax over each cluster."""
    metric = torch.randn(2, 1 + 30, 8)
    mask = torch.rand(2, 31) > 0.3
    mask[:, 0] = True
    plan = atc_patch.cluster_tokens(metric, 12, "tome", protected=1, mask=mask)
    merged = plan.merge(mask[..., None].float(), mode="amax")[..., 0].bool()
    for row in merged:
        k = int(row.sum())
        assert row[:k].all() and not row[k:].any()
