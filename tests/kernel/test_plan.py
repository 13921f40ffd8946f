"""Properties every plan must have, whatever the method (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import atc_patch
from atc_patch.kernel import max_reduction

METHOD_ARGS = [
    ("atc", {"linkage": "single"}),
    ("atc", {"linkage": "complete"}),
    ("atc", {"linkage": "average"}),
    ("tome", {}),
    ("kmedoids", {}),
    ("dpcknn", {}),
]


@st.composite
def problems(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    c = draw(st.integers(1, 8))
    p = draw(st.integers(0, min(n, 3)))
    r = draw(st.integers(0, n))
    which = draw(st.integers(0, len(METHOD_ARGS) - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, n, c, p, r, which, seed


@settings(max_examples=150, deadline=None)
@given(problems())
def test_plan_properties(problem) -> None:
    b, n, c, p, r, which, seed = problem
    method, kwargs = METHOD_ARGS[which]
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    plan = atc_patch.cluster_tokens(metric, r=r, method=method, protected=p, **kwargs)
    expected_r = min(r, max_reduction(method, n, p))
    assert plan.num_out == n - expected_r

    labels = plan.labels
    assert labels.shape == (b, n) and labels.dtype == torch.long
    assert int(labels.min()) >= 0 and int(labels.max()) == plan.num_out - 1
    for row in labels:  # every slot used
        assert row.unique().numel() == plan.num_out
    assert torch.equal(labels[:, :p], torch.arange(p).expand(b, p))  # protected keep 0..p-1
    if p:
        assert (labels[:, p:] >= p).all()  # nothing merges into a protected token

    x = torch.randn(b, n, 5, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).double()
    merged, msize = plan.merge_wavg(x, size)
    assert merged.shape == (b, plan.num_out, 5) and msize.shape == (b, plan.num_out, 1)
    torch.testing.assert_close((merged * msize).sum(1), (x * size).sum(1))  # weighted sum kept
    assert torch.equal(msize.sum(1), size.sum(1))

    back = plan.unmerge(merged)
    assert back.shape == x.shape
    # each token receives exactly its own cluster's merged row
    assert torch.equal(back, merged.gather(1, labels[..., None].expand(-1, -1, 5)))
    # merging back what was broadcast gives the same rows (mean of identical rows)
    torch.testing.assert_close(plan.merge(back, mode="mean"), merged)

    source = plan.merge_source()
    assert source.shape == (b, plan.num_out, n)
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source.sum(-1), plan.sizes())
    assert torch.equal(source.sum(1), torch.ones(b, n))  # every original token in one output


def test_merge_modes() -> None:
    labels = torch.tensor([[0, 1, 0, 1, 2]])
    plan = atc_patch.MergePlan(labels, 3)
    x = torch.tensor([[[1.0], [2.0], [3.0], [6.0], [5.0]]])
    assert plan.merge(x, "sum").flatten().tolist() == [4.0, 8.0, 5.0]
    assert plan.merge(x, "mean").flatten().tolist() == [2.0, 4.0, 5.0]
    assert plan.merge(x, "amax").flatten().tolist() == [3.0, 6.0, 5.0]
    assert plan.unmerge(plan.merge(x, "amax")).flatten().tolist() == [3, 6, 3, 6, 5]


def test_chained_source_tracking() -> None:
    """Two reductions in a row: source rows still sum to the sizes in original tokens."""
    metric = torch.randn(2, 30, 8)
    p1 = atc_patch.cluster_tokens(metric, r=10, protected=1)
    x1, s1 = p1.merge_wavg(metric)
    src = p1.merge_source()
    p2 = atc_patch.cluster_tokens(x1, r=7, protected=1)
    _, s2 = p2.merge_wavg(x1, s1)
    src2 = p2.merge_source(src)
    assert src2.shape == (2, 13, 30)
    assert torch.equal(src2.sum(-1), s2[..., 0])


def test_half_precision_clusters_in_float32() -> None:
    metric = torch.randn(2, 60, 16)
    for dtype in (torch.float16, torch.bfloat16):
        low = metric.to(dtype)
        plan = atc_patch.cluster_tokens(low, r=20, linkage="complete", protected=1)
        ref = atc_patch.cluster_tokens(low.float(), r=20, linkage="complete", protected=1)
        assert torch.equal(plan.labels, ref.labels)
        x, size = plan.merge_wavg(low)
        assert x.dtype == dtype and size.dtype == torch.float32  # sizes: exact counts
        assert plan.merge(low).dtype == dtype and plan.unmerge(x).dtype == dtype


def test_identity_plan_returns_input() -> None:
    x = torch.randn(2, 10, 4)
    plan = atc_patch.cluster_tokens(x, r=0)
    assert plan.is_identity
    assert plan.merge(x) is x and plan.unmerge(x) is x
    merged, size = plan.merge_wavg(x)
    assert merged is x and torch.equal(size, torch.ones(2, 10, 1))


def test_merge_wavg_sizes_follow_a_float64_model():
    """Token sizes are float64 in a float64 forward (log(size) is not rounded to float32)."""
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    plan = atc_patch.MergePlan(torch.tensor([[0, 0, 1, 1]]), 2)
    _, size = plan.merge_wavg(x)
    assert size.dtype == torch.float64
    _, size = plan.merge_wavg(x.float())
    assert size.dtype == torch.float32
    _, size = plan.merge_wavg(x.half(), torch.ones(1, 4, 1, dtype=torch.float64))
    assert size.dtype == torch.float64
