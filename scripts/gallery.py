"""Draw the pictures of the documentation's gallery (docs/gallery/*.png).

Everything comes from what ships with the package (the digits ViT and its test split) or from
timings taken here on random-init models; nothing is downloaded.

    python scripts/gallery.py              # all pictures (about two minutes on two cores)
    python scripts/gallery.py --only clusters accuracy
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import atc_patch
from atc_patch import demo
from atc_patch.demo.digits import load_model, load_test_split, normalize

OUT = Path(__file__).resolve().parent.parent / "docs" / "gallery"
PICTURES = ("clusters", "accuracy", "kernel", "sd")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def clusters(out: Path) -> None:
    """Cluster maps of every method over eight test digits."""
    model, _ = load_model()
    images, _ = load_test_split()
    options = {"keep_rate": 0.5, "reduction_loc": (1, 2, 3)}
    demo.plot_clusters(model, images[:8], out / "clusters.png", options, methods=demo.METHODS)


def accuracy(out: Path) -> None:
    """Off-the-shelf accuracy against the patch tokens kept, every method."""
    model, _ = load_model()
    images, labels = load_test_split()
    x = normalize(images)
    batches = [(x[i : i + 270], labels[i : i + 270]) for i in range(0, len(x), 270)]
    schedules = [{"keep_rate": k, "reduction_loc": (1, 2, 3)} for k in (0.8, 0.65, 0.5, 0.35)]
    results = demo.run_study(model, batches, schedules, progress=False)
    demo.plot_accuracy(results, out / "accuracy_vs_tokens.png", title="digits ViT, off the shelf")


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel(out: Path, batch: int = 16, repeats: int = 15) -> None:
    """One clustering call: batched ATC vs the per-sample scikit-learn and scipy loops."""
    import numpy as np
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import pdist
    from sklearn.cluster import AgglomerativeClustering

    sizes = (65, 197, 577)
    rows: dict[str, list[float]] = {}
    for n in sizes:
        metric = torch.randn(batch, n, 64)
        r = n // 3
        k = n - 1 - r

        def sklearn_loop(m=metric, k=k) -> None:
            for s in m[:, 1:].numpy():
                AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit(s)

        def scipy_loop(m=metric, k=k) -> None:
            for s in m[:, 1:].numpy().astype(np.float64):
                cut_tree(linkage(pdist(s, "cosine"), "average"), n_clusters=k)

        calls = {
            "atc_patch ATC average": lambda m=metric, r=r: atc_patch.cluster_tokens(
                m, r, "atc", linkage="average", protected=1
            ),
            "atc_patch ATC single": lambda m=metric, r=r: atc_patch.cluster_tokens(
                m, r, "atc", linkage="single", protected=1
            ),
            "scikit-learn loop (reference code)": sklearn_loop,
            "scipy loop": scipy_loop,
            "ToMe plan": lambda m=metric, r=r: atc_patch.cluster_tokens(m, r, "tome", protected=1),
        }
        for name, fn in calls.items():
            rows.setdefault(name, []).append(1e3 * _median_time(fn, repeats))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, ms in rows.items():
        ax.plot(sizes, ms, "-o" if name.startswith("atc_patch") else "--s", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tokens per sample (r = N / 3 removed)")
    ax.set_ylabel(f"ms per call, batch {batch}")
    ax.set_title(f"One clustering call on this CPU ({torch.get_num_threads()} threads)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kernel_speed.png", dpi=110)
    plt.close(fig)


def sd(out: Path, repeats: int = 3) -> None:
    """UNet step time against ratio, relative to the unpatched step."""
    from atc_patch.testing import build_unet, unet_inputs

    unet = build_unet("tiny-sd")
    inputs = unet_inputs(unet, batch=2, height=64, width=64)
    ratios = (0.25, 0.5, 0.75)

    @torch.no_grad()
    def step() -> None:
        unet(**inputs)

    base = _median_time(step, repeats)
    lines: dict[str, list[float]] = {}
    for label, method, link in (
        ("ToMe-SD", "tome_sd", None),
        ("ATC average", "atc", "average"),
        ("ATC single", "atc", "single"),
    ):
        for ratio in ratios:
            extra = {"linkage": link} if link else {}
            atc_patch.apply_patch(unet, method=method, ratio=ratio, **extra)
            lines.setdefault(label, []).append(_median_time(step, repeats) / base)
            atc_patch.remove_patch(unet)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for label, rel in lines.items():
        ax.plot(ratios, rel, "-o", label=label)
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="unpatched")
    ax.set_xlabel("ratio (fraction of tokens merged in the 64x64 blocks)")
    ax.set_ylabel("step time / unpatched")
    ax.set_title(
        f"tiny SD-layout UNet, 64x64 latents, batch 2 (unpatched {base:.2f} s)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sd_step_time.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    p.add_argument("--only", nargs="+", choices=PICTURES, default=list(PICTURES))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        t0 = time.perf_counter()
        {"clusters": clusters, "accuracy": accuracy, "kernel": kernel, "sd": sd}[name](args.out)
        print(f"{name}: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
