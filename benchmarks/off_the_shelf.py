"""Off-the-shelf study: accuracy and throughput of token reduction without retraining.

The counterpart of the ATC paper's off-the-shelf experiment. By default it runs on the digits
ViT that ships with atc_patch (offline); with ``--model`` and ``--data`` it runs on any timm
ViT and an ImageFolder (class folders in the model's class order, e.g. ImageNet val)::

    python benchmarks/off_the_shelf.py                                      # digits, keep rates
    python benchmarks/off_the_shelf.py --r 2 4 6 8 --r_schedule decrease    # digits, r schedule
    python benchmarks/off_the_shelf.py --method atc tome --linkage average --keep_rate 0.7 0.5
    python benchmarks/off_the_shelf.py --model vit_small_patch16_224 --pretrained \\
        --data /path/to/imagenet/val --num_images 2000 --r 8 16 --r_schedule decrease

Writes ``off_the_shelf_<model>.csv`` (one row per method and schedule, the unpatched model
first) and ``off_the_shelf_<model>.png`` (accuracy vs patch tokens kept) to ``--output_dir``
and prints the table. Weights are only downloaded with ``--pretrained``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atc_patch.demo import (
    KEEP_RATES,
    REDUCTION_LOC,
    Batches,
    format_table,
    plot_accuracy,
    run_study,
    write_csv,
)
from atc_patch.kernel import LINKAGES

LABELS = {"tome": "ToMe", "kmedoids": "K-Medoids", "dpcknn": "DPC-KNN"}
VIT_METHODS = ("atc", "tome", "kmedoids", "dpcknn")


def method_list(methods: list[str], linkages: list[str]) -> list[tuple[str, str, str | None]]:
    """``(label, method, linkage)`` for every requested method (ATC once per linkage)."""
    out: list[tuple[str, str, str | None]] = []
    for m in methods:
        if m == "atc":
            out += [(f"ATC {link}", "atc", link) for link in linkages]
        else:
            out.append((LABELS[m], m, None))
    return out


def schedule_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``apply_patch`` schedule options from ``--r``/``--r_schedule`` or ``--keep_rate``."""
    if args.r is not None and args.keep_rate is not None:
        raise SystemExit("give --r or --keep_rate, not both")
    if args.r is not None:
        return [{"r": r, "r_schedule": args.r_schedule} for r in args.r]
    if args.keep_rate is None and args.model != "digits":
        return [{"r": r, "r_schedule": args.r_schedule} for r in (4, 8, 12, 16)]
    loc = tuple(args.reduction_loc) if args.reduction_loc else REDUCTION_LOC
    return [{"keep_rate": k, "reduction_loc": loc} for k in (args.keep_rate or KEEP_RATES)]


def digits_setup(batch_size: int, num_images: int | None = None) -> tuple[nn.Module, Batches]:
    """The shipped digits ViT and (the first ``num_images`` of) its test split, in batches."""
    from atc_patch.digits import load_model, load_test_split, normalize

    model, _ = load_model()
    images, labels = load_test_split()
    x, labels = normalize(images[:num_images]), labels[:num_images]
    return model, [
        (x[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(x), batch_size)
    ]


def timm_setup(args: argparse.Namespace) -> tuple[nn.Module, Batches]:
    """A timm model (``pretrained`` only when asked) and a seeded ImageFolder subset."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    if not args.data:
        raise SystemExit(f"--model {args.model} needs --data /path/to/imagefolder")
    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    dataset = ImageFolder(args.data, transform=transform)
    n = min(args.num_images or 1000, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    subset = torch.utils.data.Subset(dataset, order.tolist())
    loader = torch.utils.data.DataLoader(
        subset, batch_size=args.batch_size, num_workers=args.workers
    )
    return model, loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits", help="'digits' (shipped) or a timm model name")
    p.add_argument("--data", default=None, help="ImageFolder root (for a timm model)")
    p.add_argument("--pretrained", action="store_true", help="download timm weights")
    p.add_argument(
        "--num_images", type=int, default=None, help="images used (all digits; 1000 ImageFolder)"
    )
    p.add_argument("--method", nargs="+", default=list(VIT_METHODS), choices=VIT_METHODS)
    p.add_argument("--linkage", nargs="+", default=list(LINKAGES), choices=LINKAGES)
    p.add_argument("--r", type=int, nargs="+", default=None, help="tokens removed per block")
    p.add_argument("--r_schedule", default="constant", choices=("constant", "decrease"))
    p.add_argument("--keep_rate", type=float, nargs="+", default=None)
    p.add_argument("--reduction_loc", type=int, nargs="+", default=None)
    p.add_argument("--no_prop_attn", action="store_true", help="disable proportional attention")
    p.add_argument("--batch_size", type=int, default=270)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes per run (interleaved rounds, median kept)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output_dir", default="outputs/off_the_shelf")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reduction_loc and args.r is not None:
        raise SystemExit("--reduction_loc goes with --keep_rate, not with --r")
    schedules = schedule_list(args)
    methods = method_list(args.method, args.linkage)
    model, batches = (
        digits_setup(args.batch_size, args.num_images)
        if args.model == "digits"
        else timm_setup(args)
    )
    results = run_study(
        model,
        batches,
        schedules,
        methods,
        progress=not args.no_progress,
        prop_attn=not args.no_prop_attn,
        repeats=args.repeats,
    )
    print(format_table(results))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"off_the_shelf_{args.model.replace('/', '_')}"
    write_csv(results, out / f"{stem}.csv")
    plot_accuracy(results, out / f"{stem}.png", title=f"{args.model}: accuracy vs tokens kept")
    print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
