"""Run the fused Triton ATC path under Triton's interpreter and check it (a subprocess of
tests/test_triton_kernel.py: ``TRITON_INTERPRET=1`` must be set before triton is imported).

Prints one JSON line: exactness failures against scipy (float64 metrics), the float32
agreement rate, property failures and the host synchronisations / ops of fused calls.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.cluster.hierarchy import cut_tree, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

import atc_patch  # noqa: E402

LINKAGES = ("single", "complete", "average")


def same_partition(a, b) -> bool:
    a, b = np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()
    pairs = set(zip(a, b, strict=True))
    return len(a) == len(b) and len(pairs) == len(set(a)) == len(set(b))


def scipy_cut(x: torch.Tensor, method: str, k: int) -> np.ndarray:
    """scipy on float64 cosine distances of one sample ``(M, C)``: labels of ``k`` clusters."""
    x = x.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return cut_tree(linkage(squareform(d, checks=False), method=method), n_clusters=k)[:, 0]


def r_values(m: int) -> list[int]:
    if m <= 8:
        return list(range(m))
    return sorted({0, 1, m // 3, m - 2, m - 1})


def check(metric: torch.Tensor, r: int, name: str, p: int, failures: list, exact: bool) -> bool:
    """One fused call against scipy and the plan properties; returns the partition agreement."""
    b, n, _ = metric.shape
    m = n - p
    plan = atc_patch.cluster_tokens(metric, r, linkage=name, protected=p, backend="triton")
    labels = plan.labels
    ok = plan.num_out == n - r and labels.shape == (b, n) and labels.dtype == torch.long
    ok = ok and torch.equal(labels[:, :p], torch.arange(p).expand(b, p))
    sizes = plan.sizes()
    ok = ok and bool((sizes >= 1).all()) and bool((sizes.sum(1) == n).all())  # every slot used
    agree = True
    for i in range(b):
        free = labels[i, p:]
        ok = ok and free.unique().numel() == m - r and int(free.min()) == p
        firsts = [int((free == s).nonzero()[0, 0]) for s in free.unique().tolist()]
        ok = ok and firsts == sorted(firsts)  # slots in the order of their smallest token
        agree = agree and same_partition(free, scipy_cut(metric[i, p:], name, m - r))
    if not ok:
        failures.append(("properties", name, n, p, r))
    if exact and not agree:
        failures.append(("scipy", name, n, p, r))
    return agree


def sync_counts(n: int, name: str, r: int) -> dict:
    """Host synchronisations and top-level ops of one fused call, from the profiler."""
    metric = torch.randn(2, n, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        atc_patch.cluster_tokens(metric, r, linkage=name, protected=1, backend="triton")
    names = [e.name for e in prof.events()]
    syncs = sum(x in ("aten::_local_scalar_dense", "aten::item") for x in names)
    top = sum(e.cpu_parent is None and e.name.startswith("aten::") for e in prof.events())
    return {"n": n, "linkage": name, "syncs": syncs, "top_level_ops": top}


def main() -> None:
    failures: list = []
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for name in LINKAGES:
        for n in (2, 3, 5, 9, 24):
            for p in (0, 1, 2):
                if n - p < 2:
                    continue
                metric = torch.randn(2, n, 8, dtype=torch.float64, generator=gen)
                for r in r_values(n - p):
                    check(metric, r, name, p, failures, exact=True)
                    cases += 1
        for n, p in ((64, 2), (130, 0), (201, 1)):
            metric = torch.randn(2, n, 16, dtype=torch.float64, generator=gen)
            m = n - p
            for r in (1, m // 3, m - 1) if n < 200 else (m // 4, m - 1):
                check(metric, r, name, p, failures, exact=True)
                cases += 1
    agree = total = 0
    for _ in range(8):  # float32 metrics against float64 scipy: an agreement rate
        n = int(torch.randint(8, 100, (1,), generator=gen))
        metric = torch.randn(2, n, 32, generator=gen)
        r = int(torch.randint(1, n, (1,), generator=gen))
        for name in LINKAGES:
            agree += check(metric, r, name, 0, failures, exact=False)
            total += 1
    half = torch.randn(2, 40, 16, generator=gen).to(torch.bfloat16)
    want = atc_patch.cluster_tokens(half.float(), 13, backend="triton").labels
    if not torch.equal(atc_patch.cluster_tokens(half, 13, backend="triton").labels, want):
        failures.append(("bf16 not clustered in float32",))
    syncs = [sync_counts(n, name, 3) for n in (197, 1024) for name in LINKAGES[:1]]
    syncs += [sync_counts(197, name, 59) for name in LINKAGES[1:]]
    out = {"cases": cases, "failures": failures, "f32_agree": agree, "f32_total": total}
    print(json.dumps({**out, "syncs": syncs}))


if __name__ == "__main__":
    sys.exit(main())
