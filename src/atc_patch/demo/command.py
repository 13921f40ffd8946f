"""The ``atc-patch`` command (also ``python -m atc_patch``): how much accuracy each
token-reduction method keeps as tokens are removed, on the digits ViT that ships with the
package, offline. Writes ``results.csv``, ``table.txt``, ``accuracy_vs_tokens.png`` and
``clusters.png`` (docs/demo.md)::

    atc-patch --quick --output_dir /tmp/demo
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..schedule import make_schedule
from .argtypes import keep_rate, positive_int
from .study import (
    KEEP_RATES,
    QUICK_KEEP_RATES,
    REDUCTION_LOC,
    Result,
    format_table,
    plot_accuracy,
    plot_clusters,
    run_study,
    write_csv,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's arguments; bad values end in argparse's usage error (exit status 2)."""
    return _parser().parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atc-patch",
        description="Accuracy and throughput of every token-reduction method on the digits ViT "
        "that ships with atc_patch (offline, about a minute on a CPU).",
    )
    p.add_argument("--output_dir", default="outputs/demo", help="where the CSV and PNGs go")
    p.add_argument(
        "--keep_rate", type=keep_rate, nargs="+", default=None, help=f"default {KEEP_RATES}"
    )
    p.add_argument("--reduction_loc", type=int, nargs="+", default=list(REDUCTION_LOC))
    p.add_argument("--batch_size", type=positive_int, default=270)
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="timed passes per run (interleaved rounds, median kept)",
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    p.add_argument("--quick", action="store_true", help="fewer images and keep rates (tests)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def run_demo(argv: Sequence[str] | None = None) -> list[Result]:
    """Run the demo; returns the results (also printed and written to ``--output_dir``)."""
    from .digits import load_model, load_test_split, normalize

    parser = _parser()
    args = parser.parse_args(argv)
    model, info = load_model()
    try:  # reduction_loc must name blocks of the shipped model
        make_schedule(keep_rate=0.5, reduction_loc=args.reduction_loc).per_block(
            len(model.blocks), 64
        )
    except ValueError as e:
        parser.error(f"argument --reduction_loc: {e}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    images, labels = load_test_split()
    if args.quick:
        images, labels = images[:48], labels[:48]
    x = normalize(images)
    batches = [
        (x[i : i + args.batch_size], labels[i : i + args.batch_size])
        for i in range(0, len(x), args.batch_size)
    ]
    keep_rates = args.keep_rate or (QUICK_KEEP_RATES if args.quick else KEEP_RATES)
    loc = tuple(args.reduction_loc)
    schedules = [{"keep_rate": k, "reduction_loc": loc} for k in keep_rates]

    print(
        f"digits ViT ({info.config['depth']} blocks, {info.config['embed_dim']}-dim, 64 pixel "
        f"tokens + class token); {len(labels)} test images; recorded test accuracy "
        f"{100 * info.test_accuracy:.2f}%"
    )
    results = run_study(
        model, batches, schedules, progress=not args.no_progress, repeats=args.repeats
    )
    table = format_table(results)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    write_csv(results, out / "results.csv")
    plot_accuracy(
        results, out / "accuracy_vs_tokens.png", title="digits ViT: accuracy vs tokens kept"
    )
    vis_options = {"keep_rate": min(keep_rates), "reduction_loc": loc}
    plot_clusters(model, images[: 3 if args.quick else 8], out / "clusters.png", vis_options)
    print(f"wrote {out / 'results.csv'}, {out / 'accuracy_vs_tokens.png'}, {out / 'clusters.png'}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """The ``atc-patch`` command (also ``python -m atc_patch``); see :func:`run_demo`."""
    run_demo(argv)
