"""Clustering-kernel speed: atc_patch vs the reference per-sample scikit-learn / scipy loops.

The counterpart of the ATC paper's ``benchmark_atc_framework.py``. Every configuration is timed
side by side in one process run, and the CSV reports each framework's time and its ratio to
atc_patch (the machines are shared and noisy: compare ratios, not absolute milliseconds).

    python benchmarks/cluster_kernels.py --framework all --input_sizes 224 --batch_sizes 6 \
        --reduction_ratio 0.7 --linkage average complete single

``--input_sizes`` are image sizes (patch 16: 224 px -> 196 tokens); ``--tokens`` gives token
counts directly (4096 = Stable Diffusion at 512 px). ``--batch_sizes`` are powers of two
(6 -> 64). ``--reduction_ratio`` is the fraction of tokens KEPT (``K = int(ratio * N)``),
as in the reference script.

Timing is round-robin (every framework once per round, in a shuffled order; the median over
rounds). atc_patch keeps its CPU buffers between calls (``atc_patch.release_workspace``); the
``atc_patch_cold`` columns free them before every call, i.e. what a first call costs.
"""

from __future__ import annotations

import argparse
import csv
import functools
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from atc_patch.kernel.atc import agglomerative_labels_ws
from atc_patch.kernel.distance import negative_cosine_workspace
from atc_patch.kernel.scratch import release_workspace

FRAMEWORKS = ("sklearn", "scipy", "atc_patch")


def sklearn_loop(metric: torch.Tensor, k: int, linkage: str) -> list[np.ndarray]:
    """The reference implementation: scikit-learn on the CPU, one sample at a time."""
    from sklearn.cluster import AgglomerativeClustering

    out = []
    for sample in metric:
        x = sample.detach().cpu().numpy()
        model = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage=linkage)
        out.append(model.fit(x).labels_)
    return out


def scipy_loop(metric: torch.Tensor, k: int, linkage: str) -> list[np.ndarray]:
    """scipy's hierarchy on the CPU, one sample at a time (pdist + linkage + fcluster)."""
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import pdist

    out = []
    for sample in metric:
        x = sample.detach().cpu().numpy()
        z = scipy_linkage(pdist(x, metric="cosine"), method=linkage)
        out.append(fcluster(z, t=k, criterion="maxclust"))
    return out


def ours(metric: torch.Tensor, k: int, linkage: str, stats: dict | None = None) -> torch.Tensor:
    """atc_patch: the whole batch at once, on the input's device."""
    with torch.no_grad():
        return agglomerative_labels_ws(
            negative_cosine_workspace(metric), metric.shape[1] - k, linkage, stats
        )


def ours_cold(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """atc_patch as a first call: its reusable CPU buffers are freed before every call."""
    release_workspace()
    return ours(metric, k, linkage)


def time_calls(fns: dict[str, Callable[[], object]], runs: int, throw_out: int) -> dict:
    """Median wall time in ms of each function, timed round-robin: ``throw_out`` warm-up
    rounds, then ``runs`` rounds in which every function runs once, in a shuffled order (so
    that load changes on a shared machine, and cache effects, hit all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for rep in range(throw_out + runs):
        shuffle(order)  # no function always runs right after the same other one
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            if rep >= throw_out:
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--framework", default="all", choices=[*FRAMEWORKS, "all"])
    ap.add_argument("--input_sizes", type=int, nargs="*", default=[224])
    ap.add_argument("--patch_size", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="*", default=[], help="token counts, as well")
    ap.add_argument("--emb_size", type=int, default=64)
    ap.add_argument("--batch_sizes", type=int, nargs="*", default=[0, 6], help="powers of two")
    ap.add_argument("--reduction_ratio", type=float, default=0.7, help="fraction of tokens kept")
    ap.add_argument("--linkage", nargs="*", default=["average", "complete", "single"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--throw_out", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--output_dir", default="outputs/cluster_kernels")
    ap.add_argument("--no_plot", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    frameworks = FRAMEWORKS if args.framework == "all" else (args.framework,)
    sizes = [(s // args.patch_size) ** 2 for s in args.input_sizes] + list(args.tokens)
    configs = [(n, 2**b, link) for n in sizes for b in args.batch_sizes for link in args.linkage]
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for n, batch, link in tqdm(configs, desc="kernels"):
        metric = torch.randn(batch, n, args.emb_size, generator=gen)
        k = int(args.reduction_ratio * n)
        stats: dict = {}
        ours(metric, k, link, stats)
        row = {"tokens": n, "batch": batch, "clusters": k, "linkage": link}
        row.update(rounds=stats.get("rounds", 0), host_syncs=stats.get("syncs", 0))
        fns = {"sklearn": sklearn_loop, "scipy": scipy_loop, "atc_patch": ours}
        calls = {fw: functools.partial(fns[fw], metric, k, link) for fw in frameworks}
        if "atc_patch" in frameworks:
            calls["atc_patch_cold"] = functools.partial(ours_cold, metric, k, link)
        for fw, ms in time_calls(calls, args.runs, args.throw_out).items():
            row[f"{fw}_ms"] = round(ms, 2)
        if "atc_patch" in frameworks:
            for fw in frameworks:
                if fw != "atc_patch":
                    for ours_name in ("atc_patch", "atc_patch_cold"):
                        ratio = row[f"{fw}_ms"] / row[f"{ours_name}_ms"]
                        row[f"{fw}_over_{ours_name}"] = round(ratio, 2)
        rows.append(row)
        tqdm.write(str(row))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cluster_kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not args.no_plot:
        shown = (*frameworks, "atc_patch_cold") if "atc_patch" in frameworks else frameworks
        _plot(rows, shown, out / "cluster_kernels.png")
    print(f"wrote {out / 'cluster_kernels.csv'}")
    return rows


def _plot(rows: list[dict], frameworks: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linkages = sorted({r["linkage"] for r in rows})
    fig, axes = plt.subplots(1, len(linkages), figsize=(5 * len(linkages), 4), squeeze=False)
    for ax, link in zip(axes[0], linkages):
        sel = [r for r in rows if r["linkage"] == link]
        labels = [f"N={r['tokens']}\nB={r['batch']}" for r in sel]
        width = 0.8 / len(frameworks)
        for j, fw in enumerate(frameworks):
            xs = [i + j * width for i in range(len(sel))]
            ax.bar(xs, [r[f"{fw}_ms"] for r in sel], width, label=fw)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sel))], labels)
        ax.set_yscale("log")
        ax.set_ylabel("ms per batch (median)")
        ax.set_title(f"{link} linkage")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
