"""Clustering-kernel speed: atc_patch vs the reference per-sample scikit-learn / scipy loops.

The counterpart of the ATC paper's ``benchmark_atc_framework.py``. Every configuration is timed
side by side in one process run, and the CSV reports each framework's time and its ratio to
atc_patch (the machines are shared and noisy: compare ratios, not absolute milliseconds).

    python benchmarks/cluster_kernels.py --framework all --input_sizes 224 --batch_sizes 6 \
        --reduction_ratio 0.7 --linkage average complete single
    python benchmarks/cluster_kernels.py --output_dir out --framework sklearn --input_sizes 224 \
        256 --emb_size 64 --runs 1000 --throw_out 0.25 --reduction_ratio 0.25 \
        --batch_sizes 0 1 2 3 4 5 6 7 8 9 10 --linkage complete    # the reference README's

``--input_sizes`` are image sizes (patch 16: 224 px -> 196 tokens); ``--tokens`` gives token
counts directly (4096 = Stable Diffusion at 512 px). ``--batch_sizes`` are log2 of the batch
sizes, as in the reference script: 0 -> 1, 6 -> 64 (the actual sizes are printed).
``--reduction_ratio`` is the fraction of tokens KEPT (``K = int(ratio * N)``), as in the
reference script.

Timing is round-robin (every framework once per round, in a shuffled order; the median over
the rounds left after the first ``--throw_out`` fraction). Ratios ``a_over_b`` are the median
of the per-round ratios, with their min and max
(``_lo``, ``_hi``) as the spread. atc_patch keeps its CPU buffers between calls
(``atc_patch.release_workspace``); the ``atc_patch_cold`` columns free them before every call,
i.e. what a first call costs. ``atc_patch_torch_threads`` runs the kernel on torch's thread
setting whatever the load (``set_kernel_threads("torch")``, the behaviour before the kernel
learnt to drop to one thread on an oversubscribed machine); ``atc_patch`` is the default
(``"auto"``).

``--baseline DIR`` also times another checkout's kernel (``DIR/atc_patch/kernel``, e.g. the
``src`` folder of main) as ``baseline``, to compare before and after a change in one run.

``--load N`` starts N busy processes (pure Python loops, ~one core each) for the timing, to
measure an oversubscribed machine; they stop when the run ends, when this process dies, or
after ``--load_seconds`` at the latest. ``--threads`` sets torch's intra-op threads.

Needs scikit-learn for ``--framework sklearn`` / ``all``: ``pip install 'atc-patch[test]'``
(or ``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from atc_patch.demo.argtypes import fraction, non_negative_int, positive_int
from atc_patch.kernel.atc import agglomerative_labels_ws
from atc_patch.kernel.distance import negative_cosine_workspace
from atc_patch.kernel.scratch import release_workspace
from atc_patch.kernel.threads import kernel_threads, set_kernel_threads

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


def load_baseline(src: str) -> Callable[..., torch.Tensor]:
    """``ours`` with the kernel of another checkout (``src/atc_patch/kernel``), imported as a
    separate package so that both versions live in this process."""
    init = Path(src) / "atc_patch" / "kernel" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "_baseline_kernel", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None or not init.is_file():
        raise SystemExit(f"--baseline: no kernel package at {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    atc = importlib.import_module("_baseline_kernel.atc")
    distance = importlib.import_module("_baseline_kernel.distance")

    def baseline(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
        with torch.no_grad():
            ws = distance.negative_cosine_workspace(metric)
            return atc.agglomerative_labels_ws(ws, metric.shape[1] - k, linkage)

    return baseline


def ours_torch_threads(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """atc_patch on torch's thread setting whatever the load (the kernel before "auto")."""
    previous = set_kernel_threads("torch")
    try:
        return ours(metric, k, linkage)
    finally:
        set_kernel_threads(previous)


_BUSY = """
import os, sys, time
end, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(100000):
        pass
"""


@contextlib.contextmanager
def competing_load(processes: int, seconds: float) -> Iterator[None]:
    """Run ``processes`` busy Python processes (about one core each) during the block.

    Each stops by itself after ``seconds`` or when this process dies; all are stopped (by
    their process id) when the block ends.
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUSY, str(seconds)]) for _ in range(processes)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def _need_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--framework sklearn/all needs scikit-learn: pip install 'atc-patch[test]' "
            "(or pip install scikit-learn), or pass --framework scipy / atc_patch"
        ) from None


def time_calls(
    fns: dict[str, Callable[[], object]], runs: int, throw_out: float
) -> dict[str, list[float]]:
    """Wall times in ms of each function (one per kept round), timed round-robin: ``runs``
    rounds in which every function runs once, in a shuffled order (so that load changes on a
    shared machine, and cache effects, hit all alike); the first ``throw_out`` fraction of the
    rounds is warm-up and dropped, as the reference script does."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    warm = int(runs * throw_out)
    for rep in range(runs):
        shuffle(order)  # no function always runs right after the same other one
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            if rep >= warm:
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--framework", default="all", choices=[*FRAMEWORKS, "all"])
    ap.add_argument("--input_sizes", type=int, nargs="*", default=[224])
    ap.add_argument("--patch_size", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="*", default=[], help="token counts, as well")
    ap.add_argument("--emb_size", type=int, default=64)
    ap.add_argument(
        "--batch_sizes",
        type=non_negative_int,
        nargs="*",
        default=[0, 6],
        help="log2 of the batch sizes, as in the reference script: 0 -> 1, 6 -> 64",
    )
    ap.add_argument("--reduction_ratio", type=float, default=0.7, help="fraction of tokens kept")
    ap.add_argument("--linkage", nargs="*", default=["average", "complete", "single"])
    ap.add_argument("--runs", type=positive_int, default=6, help="rounds, warm-up included")
    ap.add_argument(
        "--throw_out",
        type=fraction,
        default=0.25,
        help="fraction of the rounds discarded as warm-up (the reference's flag)",
    )
    ap.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    ap.add_argument(
        "--load",
        type=non_negative_int,
        nargs="?",
        const=1,
        default=0,
        help="busy processes competing during the timing (--load alone: 1)",
    )
    ap.add_argument("--load_seconds", type=float, default=900, help="the busy processes' limit")
    ap.add_argument("--baseline", default=None, help="src dir of a checkout to time as well")
    ap.add_argument("--output_dir", default="outputs/cluster_kernels")
    ap.add_argument("--no_plot", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    frameworks = FRAMEWORKS if args.framework == "all" else (args.framework,)
    if "sklearn" in frameworks:
        _need_sklearn()
    sizes = [(s // args.patch_size) ** 2 for s in args.input_sizes] + list(args.tokens)
    batches = [2**b for b in args.batch_sizes]
    print(
        f"batch sizes {batches} (2 ** --batch_sizes), tokens {sizes}, torch threads "
        f"{torch.get_num_threads()}, {args.load} competing busy process(es), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    configs = [(n, batch, link) for n in sizes for batch in batches for link in args.linkage]
    with competing_load(args.load, args.load_seconds):
        rows = _run(configs, frameworks, args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cluster_kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not args.no_plot:
        shown = [c[: -len("_ms")] for c in rows[0] if c.endswith("_ms")]
        _plot(rows, tuple(shown), out / "cluster_kernels.png")
    print(f"wrote {out / 'cluster_kernels.csv'}")
    return rows


def _run(configs: list[tuple[int, int, str]], frameworks: tuple[str, ...], args) -> list[dict]:
    rows: list[dict] = []
    baseline = load_baseline(args.baseline) if args.baseline else None
    gen = torch.Generator().manual_seed(0)
    for n, batch, link in tqdm(configs, desc="kernels"):
        metric = torch.randn(batch, n, args.emb_size, generator=gen)
        k = int(args.reduction_ratio * n)
        stats: dict = {}
        ours(metric, k, link, stats)
        row = {"tokens": n, "batch": batch, "clusters": k, "linkage": link}
        row.update(rounds=stats.get("rounds", 0), host_syncs=stats.get("syncs", 0))
        row.update(threads=torch.get_num_threads(), load=args.load)
        with kernel_threads("cpu"):  # what "auto" picks now (1 when oversubscribed)
            row["auto_threads"] = torch.get_num_threads()
        row["loadavg"] = round(os.getloadavg()[0], 1)
        fns = {"sklearn": sklearn_loop, "scipy": scipy_loop, "atc_patch": ours}
        calls = {fw: functools.partial(fns[fw], metric, k, link) for fw in frameworks}
        ours_names = []
        if "atc_patch" in frameworks:
            calls["atc_patch_cold"] = functools.partial(ours_cold, metric, k, link)
            calls["atc_patch_torch_threads"] = functools.partial(
                ours_torch_threads, metric, k, link
            )
            ours_names = ["atc_patch", "atc_patch_cold", "atc_patch_torch_threads"]
        if baseline is not None:
            calls["baseline"] = functools.partial(baseline, metric, k, link)
        times = time_calls(calls, args.runs, args.throw_out)
        for fw, ts in times.items():
            row[f"{fw}_ms"] = round(statistics.median(ts), 2)
        pairs = [(fw, o) for fw in frameworks if fw != "atc_patch" for o in ours_names[:2]]
        if ours_names:
            pairs.append(("atc_patch_torch_threads", "atc_patch"))
        if ours_names and baseline is not None:
            pairs += [("baseline", "atc_patch"), ("baseline", "atc_patch_torch_threads")]
        for a, b in pairs:
            ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
            row[f"{a}_over_{b}"] = round(statistics.median(ratios), 2)
            row[f"{a}_over_{b}_lo"] = round(min(ratios), 2)
            row[f"{a}_over_{b}_hi"] = round(max(ratios), 2)
        rows.append(row)
        tqdm.write(str(row))
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
