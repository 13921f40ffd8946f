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

The ATC paper's ``validate_ots_sslbackbone.py`` command runs as written (``--model-type``
selects this mode)::

    python benchmarks/off_the_shelf.py --data /data/imagenet --batch_size 256 \
        --model-type swag --model-name vit_base_patch16 --input-size 384 \
        --r 0 5 10 15 20 25 30 35 40 45 --merge_fn atc --linkage single --r-sched decrease

``--model-type augreg`` is a timm ViT (``--model-name vit_base_patch16_224``, timm weights),
``swag`` torchvision's ViT with the SWAG end-to-end weights (``vit_base_patch16`` /
``vit_b16_in1k`` -> ``vit_b_16``, ``vit_large_patch16`` / ``vit_l16_in1k`` -> ``vit_l_16``,
``vit_huge_patch14`` / ``vit_h14_in1k`` -> ``vit_h_14``), ``mae`` a timm ViT with global
pooling and MAE's fine-tuned weights from ``--checkpoint`` (default
``./pretrained_models/mae_finetuned_vit_{base,large,huge}.pth``, as the reference). Each ``r``
is evaluated on ``<data>/val`` (ImageFolder) as the reference evaluates it (proportional
attention except on MAE; ATC removes ``r - 1`` tokens per block, see
``atc_patch.train.models.reference_r``; tests/pretrained/test_reference_golden.py checks these
forwards against the official code); ``r=0`` is the unpatched model. Results go to
``<results-dir>/<r-sched>/<type>_<name>_<size>_<merge_fn>[_<linkage>].csv``
(``;``-separated, the reference's columns plus images/s), with a tqdm bar.
``--no-pretrained`` builds random weights (offline smoke tests).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atc_patch.demo import (
    KEEP_RATES,
    REDUCTION_LOC,
    format_table,
    plot_accuracy,
    run_study,
    write_csv,
)
from atc_patch.demo.study import Batches
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
    from atc_patch.demo.digits import load_model, load_test_split, normalize

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


SWAG_NAMES = {
    "vit_b_16": ("vit_b_16", "ViT_B_16_Weights"),
    "vit_l_16": ("vit_l_16", "ViT_L_16_Weights"),
    "vit_h_14": ("vit_h_14", "ViT_H_14_Weights"),
}
SWAG_ALIASES = {
    "vit_base_patch16": "vit_b_16",
    "vit_b16_in1k": "vit_b_16",
    "vit_large_patch16": "vit_l_16",
    "vit_l16_in1k": "vit_l_16",
    "vit_huge_patch14": "vit_h_14",
    "vit_h14_in1k": "vit_h_14",
}
MAE_FILES = {
    "vit_base_patch16": "mae_finetuned_vit_base.pth",
    "vit_large_patch16": "mae_finetuned_vit_large.pth",
    "vit_huge_patch14": "mae_finetuned_vit_huge.pth",
}


def _swag_model(name: str, input_size: int, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    key = SWAG_ALIASES.get(name, name)
    if key not in SWAG_NAMES:
        valid = sorted(set(SWAG_NAMES) | set(SWAG_ALIASES))
        raise SystemExit(f"unknown SWAG model {name!r}; valid: {valid}")
    builder, weights_enum = SWAG_NAMES[key]
    if pretrained:
        weights = getattr(tvm, weights_enum).IMAGENET1K_SWAG_E2E_V1
        return getattr(tvm, builder)(weights=weights)
    return getattr(tvm, builder)(weights=None, image_size=input_size)


def _load_weights(model: nn.Module, path: str) -> None:
    from atc_patch.pretrained import load_checkpoint, select_state_dict

    state, _ = select_state_dict(load_checkpoint(path), ema=False)
    if "fc_norm.weight" in state and getattr(model, "fc_norm", None) is None:
        state = dict(state)  # MAE checkpoint into a class-token model: fc_norm is its norm
        state["norm.weight"], state["norm.bias"] = (
            state.pop("fc_norm.weight"),
            state.pop("fc_norm.bias"),
        )
    model.load_state_dict(state)


def reference_setup(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """The reference's model, ImageNet-val loader and result-file name for ``--model-type``."""
    import timm
    from torchvision import transforms as T

    from atc_patch.train.datasets import build_dataset

    bicubic = T.InterpolationMode.BICUBIC
    size, pretrained = args.input_size, args.pretrained is not False
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if args.model_type == "augreg":
        model = timm.create_model(
            args.model_name, pretrained=pretrained and not args.checkpoint, img_size=size
        )  # timm resamples the position embeddings of weights made for another size
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        resize = int(256 / 224 * size)
    elif args.model_type == "swag":
        model = _swag_model(args.model_name, size, pretrained and not args.checkpoint)
        resize = size
    else:
        from atc_patch.train.models import MAE_NAMES

        if args.model_name not in MAE_NAMES:
            raise SystemExit(f"unknown MAE model {args.model_name!r}; valid: {list(MAE_NAMES)}")
        model = timm.create_model(
            MAE_NAMES[args.model_name], pretrained=False, global_pool="avg", img_size=size
        )
        if pretrained and not args.checkpoint:
            args.checkpoint = str(Path(args.pretrained_dir) / MAE_FILES[args.model_name])
        resize = int(size / (224 / 256)) if size <= 224 else size
    if args.checkpoint:
        _load_weights(model, args.checkpoint)
    transform = T.Compose(
        [
            T.Resize(resize, interpolation=bicubic),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    if not args.data:
        raise SystemExit("--model-type needs --data (the ImageNet root with val/<class>/...)")
    dataset, _ = build_dataset("imagenet", args.data, args.split, transform)
    if args.num_images:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = torch.utils.data.Subset(dataset, order[: args.num_images].tolist())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers
    )
    merge = args.method[0]
    stem = f"{args.model_type}_{args.model_name}_{args.input_size}_{merge}"
    if merge != "tome":
        stem += f"_{args.linkage[0]}"
    return model.eval(), loader, stem + ".csv"


@torch.no_grad()
def reference_study(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Top-1/top-5 and images/s of ``--model-type`` at every ``--r`` (``r=0``: unpatched)."""
    import time

    from timm.utils import accuracy
    from tqdm.auto import tqdm

    import atc_patch
    from atc_patch.train.models import reference_r

    if len(args.method) != 1 or len(args.linkage) != 1:
        raise SystemExit("--model-type takes one --merge_fn and one --linkage")
    if args.keep_rate is not None:
        raise SystemExit("--model-type uses --r (tokens removed per block), not --keep_rate")
    model, loader, name = reference_setup(args)
    depth = len(model.blocks) if hasattr(model, "blocks") else len(model.encoder.layers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    rows = []
    params = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    for r in tqdm(
        args.r or [0],
        desc=f"{args.model_type} {args.model_name}",
        unit="r",
        disable=args.no_progress,
    ):
        atc_patch.remove_patch(model)
        if r:
            method = args.method[0]
            opts: dict[str, Any] = {"linkage": args.linkage[0]} if method == "atc" else {}
            rs = reference_r(method, r, args.r_schedule, depth)
            opts.update(
                {"r": rs} if isinstance(rs, list) else {"r": r, "r_schedule": args.r_schedule}
            )
            # The reference's MAE patch runs without proportional attention, the others with.
            atc_patch.apply_patch(model, method=method, prop_attn=args.model_type != "mae", **opts)
        top1 = top5 = seconds = 0.0
        count = 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            start = time.perf_counter()
            out = model(x)
            seconds += time.perf_counter() - start
            a1, a5 = accuracy(out, y, topk=(1, min(5, out.shape[1])))
            top1, top5, count = top1 + float(a1) * len(y), top5 + float(a5) * len(y), count + len(y)
        rows.append(
            {
                "Model": args.model_name,
                "Img_Size": args.input_size,
                "r": r,
                "Top-1": top1 / count,
                "Top-5": top5 / count,
                "Param": params,
                "images_per_s": round(count / seconds, 1),
            }
        )
        print(rows[-1])
    atc_patch.remove_patch(model)
    out_dir = Path(args.results_dir) / args.r_schedule
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (args.results_file or name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path} (images/s on a shared machine: compare rows of one run only)")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits", help="'digits' (shipped) or a timm model name")
    p.add_argument("--data", default=None, help="ImageFolder root (for a timm model)")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="download weights (default: only with --model-type)",
    )
    p.add_argument(
        "--model-type",
        "--model_type",
        dest="model_type",
        default=None,
        choices=("augreg", "swag", "mae"),
        help="the reference's off-the-shelf study",
    )
    p.add_argument(
        "--model-name", "--model_name", "-m", dest="model_name", default="vit_tiny_patch16_224"
    )
    p.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=224)
    p.add_argument("--checkpoint", default="", help="local weights (state dict or {'model': ..})")
    p.add_argument("--pretrained_dir", default="./pretrained_models", help="MAE weights folder")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--results-dir", "--results_dir", dest="results_dir", default="./tome_notrain_results"
    )
    p.add_argument("--results-file", "--results_file", dest="results_file", default="")
    p.add_argument(
        "--num_images", type=int, default=None, help="images used (all digits; 1000 ImageFolder)"
    )
    p.add_argument(
        "--method",
        "--merge_fn",
        "--merge-fn",
        dest="method",
        nargs="+",
        default=None,
        choices=VIT_METHODS,
    )
    p.add_argument("--linkage", nargs="+", default=None, choices=LINKAGES)
    p.add_argument("--r", type=int, nargs="+", default=None, help="tokens removed per block")
    p.add_argument(
        "--r_schedule",
        "--r-sched",
        "--r_sched",
        dest="r_schedule",
        default="constant",
        choices=("constant", "decrease"),
    )
    p.add_argument("--keep_rate", type=float, nargs="+", default=None)
    p.add_argument("--reduction_loc", type=int, nargs="+", default=None)
    p.add_argument("--no_prop_attn", action="store_true", help="disable proportional attention")
    p.add_argument("--batch_size", "--batch-size", "-b", dest="batch_size", type=int, default=None)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes per run (interleaved rounds, median kept)",
    )
    p.add_argument("--workers", "--num_workers", "-j", dest="workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output_dir", default="outputs/off_the_shelf")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.model_type is not None:  # the reference's defaults
        args.method = args.method or ["tome"]
        args.linkage = args.linkage or ["average"]
        args.batch_size = args.batch_size or 256
        args.r = args.r if args.r is not None else [0]
    args.method = args.method or list(VIT_METHODS)
    args.linkage = args.linkage or list(LINKAGES)
    args.batch_size = args.batch_size or 270
    args.pretrained = bool(args.pretrained) if args.model_type is None else args.pretrained
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_type is not None:
        reference_study(args)
        return
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
