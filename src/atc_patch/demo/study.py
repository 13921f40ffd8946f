"""The demo's study: every token-reduction method on one model, measured and reported.

:func:`run_study` evaluates a model unpatched and then patched with each method at each
schedule (``apply_patch`` options), returning one :class:`Result` per run (accuracy, forward
time, tokens actually kept); :func:`format_table`, :func:`write_csv`, :func:`plot_accuracy`
and :func:`plot_clusters` report them. ``benchmarks/off_the_shelf.py`` reuses them::

    results = run_study(model, [(x, y)], [{"keep_rate": 0.5, "reduction_loc": (1, 2, 3)}])
    print(format_table(results))
"""

from __future__ import annotations

import csv
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..patch import apply_patch, patch_settings, remove_patch

# (label, method, linkage) of every method the demo compares, in table order.
METHODS: tuple[tuple[str, str, str | None], ...] = (
    ("ATC single", "atc", "single"),
    ("ATC complete", "atc", "complete"),
    ("ATC average", "atc", "average"),
    ("ToMe", "tome", None),
    ("K-Medoids", "kmedoids", None),
    ("DPC-KNN", "dpcknn", None),
)
KEEP_RATES = (0.8, 0.65, 0.5)
QUICK_KEEP_RATES = (0.5,)
REDUCTION_LOC = (1, 2, 3)  # the shipped model has 4 blocks: reduce in each block after the first

Batches = Iterable[tuple[Tensor, Tensor]]


@dataclass
class Result:
    """One row of the study: a method at one schedule (``method="none"``: unpatched)."""

    label: str
    method: str
    linkage: str | None
    schedule: str
    tokens_in: int
    tokens_out: int
    tokens_mean: float
    tokens_per_block: str
    correct: int
    total: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def images_per_s(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else float("nan")

    def row(self) -> dict[str, Any]:
        """The CSV row: every field plus accuracy and images/s."""
        return {**asdict(self), "accuracy": self.accuracy, "images_per_s": self.images_per_s}


# --- measuring ----------------------------------------------------------------------------------


def _mlp_token_counts(model: nn.Module) -> tuple[list[int], list[Any]]:
    """Hook every block's MLP to record how many tokens it sees (after that block's merge)."""
    counts: list[int] = []
    handles = [
        blk.mlp.register_forward_pre_hook(lambda _m, args: counts.append(int(args[0].shape[1])))
        for blk in model.blocks
    ]
    return counts, handles


@torch.no_grad()
def time_forward(model: nn.Module, batches: Batches) -> float:
    """Seconds spent in ``model``'s forward passes over ``batches`` (data loading excluded)."""
    seconds = 0.0
    for x, _ in batches:
        start = time.perf_counter()
        model(x)
        seconds += time.perf_counter() - start
    return seconds


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, label: str = "", schedule: str = "") -> Result:
    """Accuracy, forward time and token counts of ``model`` over ``batches`` of (x, labels).

    Only the forward passes are timed. Token counts exclude the prefix (class) tokens and are
    read from the first batch: ``tokens_out`` after the last block, ``tokens_mean`` averaged
    over the blocks' MLPs (a proxy for the compute that is left), ``tokens_per_block`` the
    count after every block (``"64/32/16/8"``).
    """
    model.eval()
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    warm = next(iter(batches), None)
    if warm is not None:  # one small untimed forward: first-call allocations, lazy init
        model(warm[0][:8])
    counts, handles = _mlp_token_counts(model)
    correct = total = 0
    seconds = 0.0
    for x, y in batches:
        start = time.perf_counter()
        logits = model(x)
        seconds += time.perf_counter() - start
        for h in handles:  # the token counts of the first batch are enough
            h.remove()
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    per_block = [c - prefix for c in counts[: len(model.blocks)]]
    tokens_in = int(model.patch_embed.num_patches) if hasattr(model, "patch_embed") else -1
    settings = patch_settings(model) or {}
    return Result(
        label=label or "unpatched",
        method=settings.get("method", "none"),
        linkage=settings.get("linkage"),
        schedule=schedule or "-",
        tokens_in=tokens_in,
        tokens_out=per_block[-1] if per_block else tokens_in,
        tokens_mean=sum(per_block) / max(len(per_block), 1),
        tokens_per_block="/".join(str(c) for c in per_block) or str(tokens_in),
        correct=correct,
        total=total,
        seconds=seconds,
    )


def describe_schedule(options: dict[str, Any]) -> str:
    """A short name for a schedule given as ``apply_patch`` options."""
    if options.get("keep_rate") is not None:
        locs = options.get("reduction_loc", ())
        locs = ",".join(str(v) for v in (locs if isinstance(locs, (list, tuple)) else [locs]))
        mode = options.get("keep_rate_mode", "target")
        return f"keep {options['keep_rate']:g} @ {locs}" + ("" if mode == "target" else f" {mode}")
    r = options.get("r", 0)
    if isinstance(r, (list, tuple)):
        return "r=[" + ",".join(str(v) for v in r) + "]"
    return f"r={r} {options.get('r_schedule', 'constant')}"


Job = tuple[str, str, str | None, dict[str, Any]]  # (label, method, linkage, schedule options)


def _patch_for(model: nn.Module, job: Job, prop_attn: bool) -> None:
    """Put ``model`` in the state ``job`` asks for (unpatched for method ``"none"``)."""
    _, method, linkage, options = job
    remove_patch(model)
    if method != "none":
        link = {"linkage": linkage} if linkage else {}
        apply_patch(model, method=method, prop_attn=prop_attn, **link, **options)


def run_study(
    model: nn.Module,
    batches: Batches,
    schedules: Sequence[dict[str, Any]],
    methods: Sequence[tuple[str, str, str | None]] = METHODS,
    progress: bool = True,
    prop_attn: bool = True,
    repeats: int = 1,
) -> list[Result]:
    """Evaluate ``model`` unpatched, then patched with every method at every schedule.

    ``schedules`` are ``apply_patch`` options (``{"keep_rate": .7, "reduction_loc": (1, 2)}``
    or ``{"r": 4, "r_schedule": "decrease"}``). With ``repeats > 1`` every run is timed that
    many times, in rounds that go through all runs in turn (so a change in machine load hits
    every run alike), and the median time is kept. The model is left unpatched afterwards.
    """
    from tqdm.auto import tqdm

    jobs: list[Job] = [("unpatched", "none", None, {})]
    jobs += [(lab, m, link, s) for s in schedules for lab, m, link in methods]
    results = []
    times: list[list[float]] = []
    total = len(jobs) * max(repeats, 1)
    with tqdm(total=total, desc="atc_patch demo", unit="run", disable=not progress) as bar:
        for job in jobs:
            bar.set_postfix_str(f"{job[0]} {describe_schedule(job[3]) if job[3] else ''}")
            _patch_for(model, job, prop_attn)
            sched = describe_schedule(job[3]) if job[3] else ""
            results.append(evaluate(model, batches, job[0], sched))
            times.append([results[-1].seconds])
            bar.update()
        for _ in range(max(repeats, 1) - 1):
            for job, t in zip(jobs, times):
                bar.set_postfix_str(f"timing {job[0]}")
                _patch_for(model, job, prop_attn)
                t.append(time_forward(model, batches))
                bar.update()
    remove_patch(model)
    for result, t in zip(results, times):
        result.seconds = statistics.median(t)
    return results


# --- reporting ----------------------------------------------------------------------------------


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table; ``speed`` is throughput relative to the first (unpatched) row.

    ``tokens`` are the patch tokens left after the last block, ``kept`` after each block and
    ``mean`` their average over the blocks (what the MLPs see), out of ``tokens_in`` (64 for
    the digits ViT): what the forward passes actually kept, not what the schedule asked.
    """
    base = results[0].images_per_s if results else float("nan")
    width = max([len(r.tokens_per_block) for r in results] + [4])
    head = (
        f"{'method':<13} {'schedule':<18} {'tokens':>6} {'kept':>{width}} {'mean':>6} "
        f"{'acc %':>7} {'img/s':>7} {'speed':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.label:<13} {r.schedule:<18} {r.tokens_out:>6d} {r.tokens_per_block:>{width}} "
            f"{r.tokens_mean:>6.1f} {100 * r.accuracy:>7.2f} {r.images_per_s:>7.0f} "
            f"{r.images_per_s / base:>5.2f}x"
        )
    return "\n".join(lines)


def write_csv(results: Sequence[Result], path: Path) -> None:
    rows = [r.row() for r in results]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy(results: Sequence[Result], path: Path, title: str = "") -> None:
    """Accuracy (%) against patch tokens kept after the last block, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = [r for r in results if r.method == "none"]
    for label in dict.fromkeys(r.label for r in results if r.method != "none"):
        rows = sorted((r for r in results if r.label == label), key=lambda r: r.tokens_out)
        style = "-o" if label.startswith("ATC") else "--s"
        ax.plot([r.tokens_out for r in rows], [100 * r.accuracy for r in rows], style, label=label)
    if base:
        ax.axhline(100 * base[0].accuracy, color="k", lw=0.8, ls=":", label="unpatched")
    ax.set_xlabel("patch tokens kept after the last block")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy vs tokens kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def plot_clusters(
    model: nn.Module,
    images: Tensor,
    path: Path,
    options: dict[str, Any],
    methods: Sequence[tuple[str, str, str | None]] = METHODS[:4],
    scale: int = 32,
) -> None:
    """Draw each method's final clusters (``trace_source=True``) over uint8 digits ``images``.

    The 8x8 digits are upscaled ``scale`` times for display; rows are methods, columns digits.
    Each cluster is drawn in one colour of its own (``make_visualization(fill="cluster")``),
    so a cluster of pixels that do not touch still reads as one; the row label gives the
    tokens the method actually kept.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..vis import last_source, make_visualization
    from .digits import PIXEL_MAX, normalize

    grey = (images[:, 0].float() / PIXEL_MAX * 255).round().to(torch.uint8).numpy()
    big = [np.repeat(np.kron(g, np.ones((scale, scale), np.uint8))[..., None], 3, -1) for g in grey]
    rows: list[tuple[str, list[Any]]] = [("input", big)]
    for label, method, linkage in methods:
        link = {"linkage": linkage} if linkage else {}
        with warnings.catch_warnings():  # the study already warned about missed targets
            warnings.simplefilter("ignore")
            apply_patch(model, method=method, trace_source=True, **link, **options)
        model(normalize(images))
        source = last_source(model)
        prefix = int(model.num_prefix_tokens)
        vis = [
            make_visualization(b, source[i], patch_size=scale, class_token=prefix, fill="cluster")
            for i, b in enumerate(big)
        ]
        rows.append((f"{label}\n{source.shape[1] - prefix} tokens", vis))
        remove_patch(model)
    fig, axes = plt.subplots(
        len(rows), len(big), figsize=(1.6 * len(big), 1.7 * len(rows)), squeeze=False
    )
    for r, (name, pics) in enumerate(rows):
        for c, pic in enumerate(pics):
            ax = axes[r][c]
            ax.imshow(pic)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"Clusters after the last block ({describe_schedule(options)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
