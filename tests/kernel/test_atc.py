"""ATC exactness: the partition must equal scipy's linkage + cut_tree on the same distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import same_partition
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

import atc_patch
from atc_patch.kernel.atc import Workspace, agglomerative_labels, agglomerative_labels_ws
from atc_patch.kernel.distance import cosine_distance

from ._rounds_reference import boruvka_rounds, rnn_rounds

LINKAGES = ["single", "complete", "average"]


def scipy_cuts(metric: torch.Tensor, method: str, ks: list[int]) -> np.ndarray:
    """Reference: scipy on float64 cosine distances of one sample ``(N, C)``; ``(N, len(ks))``."""
    x = metric.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method=method)
    return cut_tree(z, n_clusters=ks)


def r_values(m: int) -> list[int]:
    """Every feasible r for small M; 0, the maximum and a spread in between for larger M."""
    if m <= 40:
        return list(range(m))
    picks = {0, 1, m // 4, m // 3, m // 2, (2 * m) // 3, m - 2, m - 1}
    return sorted(picks)


SMALL = (2, 3, 4, 5, 8, 13, 24, 40)
LARGE = (65, 128, 197, 300)
CASES = [(n, p) for n in SMALL for p in (0, 1, 2) if n - p >= 2] + [
    (n, p) for n in LARGE for p in (0, 1)
]


@pytest.mark.parametrize("linkage_name", LINKAGES)
@pytest.mark.parametrize(("n", "protected"), CASES)
def test_atc_matches_scipy_float64(linkage_name: str, n: int, protected: int) -> None:
    b, c = 3, 16
    metric = torch.randn(b, n, c, dtype=torch.float64)
    m = n - protected
    rs = r_values(m)
    refs = [scipy_cuts(metric[i, protected:], linkage_name, [m - r for r in rs]) for i in range(b)]
    for j, r in enumerate(rs):
        plan = atc_patch.cluster_tokens(
            metric, r=r, method="atc", linkage=linkage_name, protected=protected
        )
        assert plan.num_out == n - r
        labels = plan.labels
        assert labels.shape == (b, n)
        assert torch.equal(labels[:, :protected], torch.arange(protected).expand(b, protected))
        for i in range(b):
            got = labels[i, protected:]
            assert got.unique().numel() == m - r
            assert same_partition(got, refs[i][:, j]), (linkage_name, n, protected, r, i)


def test_atc_float32_agreement_rate() -> None:
    """float32 metrics: the partition agrees with float64 scipy on >= 99% of random cases."""
    agree = total = 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        n = int(torch.randint(8, 200, (1,), generator=gen))
        metric = torch.randn(2, n, 32, generator=gen)
        r = int(torch.randint(0, n, (1,), generator=gen))
        for name in LINKAGES:
            plan = atc_patch.cluster_tokens(metric, r=r, method="atc", linkage=name)
            for i in range(2):
                ref = scipy_cuts(metric[i], name, [n - r])[:, 0]
                agree += same_partition(plan.labels[i], ref)
                total += 1
    rate = agree / total
    print(f"float32 ATC agreement with float64 scipy: {agree}/{total} = {rate:.2%}")
    assert rate >= 0.99, f"float32 agreement {rate:.2%} < 99%"


@pytest.mark.parametrize("linkage_name", LINKAGES)
def test_atc_large_grid_exact(linkage_name: str) -> None:
    """Stable-Diffusion-sized input (1024 tokens here, 4096 in the benchmark) stays exact."""
    n = 1024
    metric = torch.randn(1, n, 32, dtype=torch.float64)
    r = n // 2
    plan = atc_patch.cluster_tokens(metric, r=r, method="atc", linkage=linkage_name)
    ref = scipy_cuts(metric[0], linkage_name, [n - r])[:, 0]
    assert same_partition(plan.labels[0], ref)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fewer_than_two_free_tokens(n: int) -> None:
    """Nothing or one token to cluster: r is clamped to 0 and protected tokens stay put."""
    metric = torch.randn(2, n, 4)
    plan = atc_patch.cluster_tokens(metric, r=5, protected=n - 1)
    assert plan.num_out == n
    assert torch.equal(plan.labels, torch.arange(n).expand(2, n))


def test_slots_ordered_by_smallest_token() -> None:
    metric = torch.randn(2, 50, 8, dtype=torch.float64)
    labels = atc_patch.cluster_tokens(metric, r=20, linkage="average").labels
    for row in labels:
        firsts = [int((row == s).nonzero()[0]) for s in range(30)]
        assert firsts == sorted(firsts)


@pytest.mark.parametrize("linkage_name", LINKAGES)
@pytest.mark.parametrize(("n", "r"), [(60, 20), (197, 59), (197, 150)])
def test_rounds_match_the_schedule(linkage_name: str, n: int, r: int) -> None:
    """The kernel stops as early as its rule allows: a kernel that keeps stale neighbours or
    misses reciprocal pairs still cuts exactly, only later, and this catches it."""
    metric = torch.randn(4, n, 16, dtype=torch.float64)
    dist = cosine_distance(metric)
    stats: dict = {}
    labels = agglomerative_labels(dist, r, linkage_name, stats)
    if linkage_name == "single":
        want = max(boruvka_rounds(dist[i].numpy(), r) for i in range(4))
    else:
        want = max(rnn_rounds(dist[i].numpy(), r, linkage_name) for i in range(4))
    assert stats["rounds"] == want
    assert stats["syncs"] <= 2 * stats["rounds"] + 2  # host synchronisations per call
    for i in range(4):
        assert same_partition(labels[i], scipy_cuts(metric[i], linkage_name, [n - r])[:, 0])


@pytest.mark.parametrize("linkage_name", LINKAGES)
def test_wide_batch_finishing_at_different_rounds(linkage_name: str) -> None:
    """B >= 8: once half the samples are done the rest go on as a smaller batch (a copy of
    their matrices); their records must land back in the right samples."""
    b, n, r = 16, 90, 40
    metric = torch.randn(b, n, 8, dtype=torch.float64)
    metric[::3] *= torch.linspace(0.2, 3.0, n, dtype=torch.float64)[:, None]  # mixed shapes
    dist = cosine_distance(metric)
    stats: dict = {}
    labels = agglomerative_labels(dist, r, linkage_name, stats)
    per_sample = [
        boruvka_rounds(dist[i].numpy(), r)
        if linkage_name == "single"
        else rnn_rounds(dist[i].numpy(), r, linkage_name)
        for i in range(b)
    ]
    assert len(set(per_sample)) > 1  # the samples really finish at different rounds
    assert stats["rounds"] == max(per_sample)
    if linkage_name != "single":
        assert stats["subsets"] >= 1
    for i in range(b):
        assert same_partition(labels[i], scipy_cuts(metric[i], linkage_name, [n - r])[:, 0]), i


@pytest.mark.parametrize("linkage_name", ["complete", "average"])
def test_repeated_batch_subsets(linkage_name: str) -> None:
    """A wide batch with a deep cut shrinks several times (here at rounds of the same parity,
    which once made a subset copy read and write the same buffer); every sample still gets
    its own partition."""
    b, n, r = 128, 64, 56
    metric = torch.randn(b, n, 16, dtype=torch.float64)
    stats: dict = {}
    labels = agglomerative_labels(cosine_distance(metric), r, linkage_name, stats)
    assert stats["subsets"] >= 2
    for i in range(b):
        assert same_partition(labels[i], scipy_cuts(metric[i], linkage_name, [n - r])[:, 0]), i


@pytest.mark.parametrize("linkage_name", LINKAGES)
def test_points_on_an_arc(linkage_name: str) -> None:
    """1-D structure (tokens on an arc): long nearest-neighbour chains, large Borůvka trees."""
    n = 150
    angle = torch.rand(3, n, dtype=torch.float64) * 3.0
    metric = torch.stack([angle.cos(), angle.sin()], dim=-1)
    for r in (1, n // 4, n // 2, n - 2):
        labels = atc_patch.cluster_tokens(metric, r=r, linkage=linkage_name).labels
        for i in range(3):
            assert same_partition(labels[i], scipy_cuts(metric[i], linkage_name, [n - r])[:, 0])


@pytest.mark.parametrize("linkage_name", LINKAGES)
def test_asymmetric_nearest_neighbour_cycle_does_not_stall(linkage_name: str) -> None:
    """A matmul may be asymmetric in the last bit; the rounds read rows, so a near-tie can form
    a 3-cycle of nearest neighbours with no reciprocal pair. It must still finish."""
    d = torch.tensor([[0.0, 1.0, 3.0, 9.0], [3.0, 0.0, 1.0, 9.0], [1.0, 3.0, 0.0, 9.0]])
    d = torch.cat([d, torch.tensor([[9.0, 9.0, 9.0, 0.0]])])[None].double()
    for r in (1, 2, 3):
        ws = Workspace.empty(1, 4, d.dtype, d.device)
        ws.d[:, :4, :4] = d
        labels = agglomerative_labels_ws(ws.finish(), r, linkage_name)
        assert labels.shape == (1, 4) and labels.unique().numel() == 4 - r


@pytest.mark.parametrize("linkage_name", LINKAGES)
def test_exact_ties_finish_with_valid_labels(linkage_name: str) -> None:
    """Duplicated tokens (flat image regions) tie exactly; ties may break either way, but every
    slot is used and the call finishes."""
    base = torch.randn(2, 6, 8)
    metric = base.repeat_interleave(7, dim=1)  # 42 tokens, 6 distinct
    metric[1, :20] = 1.0  # 20 identical tokens
    for r in (5, 30, 36, 41):
        labels = atc_patch.cluster_tokens(metric, r=r, linkage=linkage_name).labels
        for row in labels:
            assert row.unique().numel() == 42 - r and int(row.max()) == 41 - r
        if r == 36:  # exactly the 6 distinct tokens remain in sample 0
            assert same_partition(labels[0], torch.arange(42) // 7)


def test_batch_elements_are_independent() -> None:
    """A sample's partition does not depend on what else is in the batch."""
    metric = torch.randn(5, 80, 16, dtype=torch.float64)
    for name in LINKAGES:
        together = atc_patch.cluster_tokens(metric, r=37, linkage=name).labels
        for i in range(5):
            alone = atc_patch.cluster_tokens(metric[i : i + 1], r=37, linkage=name).labels
            assert torch.equal(together[i], alone[0])
