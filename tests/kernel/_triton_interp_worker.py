"""Run the fused Triton ATC path under Triton's interpreter and check it (a subprocess of
tests/kernel/test_triton.py: ``TRITON_INTERPRET=1`` must be set before triton is imported).

Prints one JSON line: exactness failures against scipy (float64 metrics; whole rows, tiles
and padding masks), the float32 agreement rate, property failures and the host
synchronisations and launches of fused calls (``benchmarks/kernel_costs.py``'s counter, with
the kernel's launch stubbed out: the interpreter's bookkeeping is not what a GPU runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel test package

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.cluster.hierarchy import cut_tree, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

import atc_patch  # noqa: E402
from kernel.test_tiles import tile_rs, tiles_of  # noqa: E402

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


def _costs():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_costs.py"
    spec = importlib.util.spec_from_file_location("kernel_costs_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def sync_counts(n: int, name: str, r: int, path: str) -> dict:
    """Host synchronisations and launches of one fused call (its second; the first builds
    the cached index tensors of a tiled or masked call)."""
    costs = _costs()
    metric = torch.randn(2, 1 + n, 16)
    side = int(n**0.5)
    kw = {
        "plain": {},
        "tiles": {"grid": (side, n // side), "tile": (16, 16)},
        "mask": {"mask": torch.rand(2, 1 + n) > 0.2},
    }[path]
    with costs.stub_triton_launch() as launches:
        c = costs.count(
            lambda: atc_patch.cluster_tokens(
                metric, r, linkage=name, protected=1, backend="triton", **kw
            )
        )
    return {
        "n": n,
        "linkage": name,
        "path": path,
        "syncs": c.syncs,
        "launches": c.launches + len(launches) // 2,
    }


def tiled(failures: list) -> int:
    """Tiles (ragged, 2-D and 3-D) and padding masks: scipy's partition per tile and per
    real / padding part, and the torch path's labels."""
    gen = torch.Generator().manual_seed(1)
    cases = 0
    for name in LINKAGES:
        for grid, tile, p in (((6, 6), (4, 4), 0), ((5, 7), (3, 4), 1), ((2, 4, 5), (2, 3, 3), 1)):
            n = p + int(np.prod(grid))
            metric = torch.randn(2, n, 8, dtype=torch.float64, generator=gen)
            mask = torch.rand(2, n, generator=gen) > 0.3
            for r in (1, n // 3, n):
                kw = {"linkage": name, "protected": p, "grid": grid, "tile": tile}
                fused = atc_patch.cluster_tokens(metric, r, backend="triton", **kw)
                for i in range(2):
                    for tokens, r_t in zip(tiles_of(grid, tile), tile_rs("atc", r, grid, tile)):
                        pos = torch.tensor(tokens) + p
                        ref = scipy_cut(metric[i, pos], name, len(tokens) - r_t)
                        if len(tokens) > 1 and not same_partition(fused.labels[i, pos], ref):
                            failures.append(("tile scipy", name, grid, tile, r, i))
                masked = atc_patch.cluster_tokens(metric, r, backend="triton", mask=mask, **kw)
                want = atc_patch.cluster_tokens(metric, r, backend="torch", mask=mask, **kw)
                if not torch.equal(masked.labels, want.labels):
                    failures.append(("mask torch path", name, grid, tile, r))
                cases += 1
        metric = torch.randn(2, 41, 8, dtype=torch.float64, generator=gen)
        mask = torch.rand(2, 41, generator=gen) > 0.3
        for r in (3, 20, 38):
            plan = atc_patch.cluster_tokens(
                metric, r, linkage=name, protected=1, mask=mask, backend="triton"
            )
            for i in range(2):
                real = mask[i].clone()
                real[0] = False
                n_real = int(real.sum())
                ref = scipy_cut(metric[i, real], name, n_real - min(r, n_real - 1))
                if not same_partition(plan.labels[i, real], ref):
                    failures.append(("mask scipy", name, r, i))
            cases += 1
    return cases


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
    cases += tiled(failures)
    syncs = [
        sync_counts(n, name, n // 2, path)
        for n in (196, 1024, 4096)
        for name in LINKAGES
        for path in ("plain", "tiles", "mask")
    ]
    out = {"cases": cases, "failures": failures, "f32_agree": agree, "f32_total": total}
    print(json.dumps({**out, "syncs": syncs}))


if __name__ == "__main__":
    sys.exit(main())
