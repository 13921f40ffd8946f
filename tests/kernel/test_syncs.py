"""No host synchronisation (issue 21): ``cluster_tokens`` on CPU tensors treated as a GPU's,
every op counted by a ``TorchDispatchMode`` (``benchmarks/kernel_costs.py``): zero syncs for
ToMe, ToMe-SD, K-Medoids and DPC-KNN on every path; the torch ATC rounds read one flag per
round (plus the last). The fused path's count is in ``test_triton_kernel.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import atc_patch
from atc_patch.kernel.atc import agglomerative_labels
from atc_patch.kernel.distance import cosine_distance


def _costs():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_costs.py"
    spec = importlib.util.spec_from_file_location("kernel_costs_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


costs = _costs()


def test_the_counter_sees_host_reads() -> None:
    """The counter can fail: each kind of host read is counted."""
    t = torch.randn(10)
    for read in (
        lambda: bool((t > 0).all()),
        lambda: t.sum().item(),
        lambda: int(t.argmax()),
        lambda: t.tolist(),
        lambda: t.nonzero(),
        lambda: t[t > 0],
    ):
        assert costs.count(read, warmup=False).syncs == 1
    with torch.inference_mode():  # where int() of a CPU tensor bypasses the dispatcher
        x = t.argmax()
        assert costs.count(lambda: int(x), warmup=False).syncs == 1
    assert costs.count(lambda: (t * 2).sum(), warmup=False).syncs == 0
    assert costs.count(lambda: (t * 2).sum(), warmup=False).launches == 2


def _mask(b: int, n: int) -> torch.Tensor:
    mask = torch.rand(b, n) > 0.2
    mask[0, -n // 4 :] = False
    return mask


PATHS = {
    "plain": {},
    "tiles": {"grid": (8, 12), "tile": (5, 5)},
    "mask": {"mask": True},
    "tiles + mask": {"grid": (8, 12), "tile": (5, 5), "mask": True},
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", ["tome", "kmedoids", "dpcknn"])
@pytest.mark.parametrize("protected", [0, 1])
def test_no_host_sync(method: str, path: str, protected: int) -> None:
    n = protected + 96
    metric = torch.randn(2, n, 16)
    kw = dict(PATHS[path])
    if kw.pop("mask", False):
        kw["mask"] = _mask(2, n)
    c = costs.count(lambda: atc_patch.cluster_tokens(metric, 40, method, protected=protected, **kw))
    assert c.syncs == 0, dict(c.sync_ops)


@pytest.mark.parametrize("no_rand", [True, False])
@pytest.mark.parametrize("grid", [(8, 12), (2, 8, 6)])
def test_tome_sd_has_no_host_sync(no_rand: bool, grid: tuple) -> None:
    metric = torch.randn(2, 96, 16)
    gen = None if no_rand else torch.Generator().manual_seed(0)
    st = {"st": 2} if len(grid) == 3 else {}
    c = costs.count(
        lambda: atc_patch.cluster_tokens(
            metric, 40, "tome_sd", grid=grid, no_rand=no_rand, generator=gen, **st
        )
    )
    assert c.syncs == 0, dict(c.sync_ops)


def test_cosine_distance_has_no_host_sync() -> None:
    """``normalize_tokens`` sanitises unconditionally (it once read ``isfinite(...).all()``)."""
    metric = torch.randn(2, 50, 8)
    metric[0, 3, 1] = float("nan")
    assert costs.count(lambda: cosine_distance(metric)).syncs == 0


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
@pytest.mark.parametrize(("b", "n"), [(2, 256), (16, 90)])
def test_torch_atc_reads_one_flag_per_round(linkage: str, b: int, n: int) -> None:
    """The torch rounds loop on the host: one read per round, one to stop, one per batch
    subset (b >= 8); the cut and the distance matrix add none."""
    metric = torch.randn(b, n, 16, dtype=torch.float64)
    dist = cosine_distance(metric)
    stats: dict = {}
    c = costs.count(lambda: agglomerative_labels(dist, n // 2, linkage, stats.clear() or stats))
    assert c.syncs == stats["syncs"] == stats["rounds"] + 1 + stats.get("subsets", 0)
    assert set(c.sync_ops) == {"tolist"}


@pytest.mark.parametrize("path", list(PATHS))
def test_torch_atc_call_syncs_are_its_rounds(path: str) -> None:
    n = 1 + 96
    metric = torch.randn(2, n, 16)
    kw = dict(PATHS[path])
    if kw.pop("mask", False):
        kw["mask"] = _mask(2, n)
    c = costs.count(lambda: atc_patch.cluster_tokens(metric, 40, protected=1, **kw))
    assert 1 <= c.syncs <= 12 and set(c.sync_ops) == {"tolist"}, dict(c.sync_ops)
