"""Command-line flags shared by the training scripts, in the reference scripts' spellings.

Every multi-word flag is accepted with dashes and with underscores (``--drop-path`` and
``--drop_path``, ``--batch-size`` and ``--batch_size``): the DeiT script of the reference
uses dashes, its MAE script underscores, and its README mixes them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from .datasets import DATASETS
from .models import (
    METHODS,
    REFERENCE_NAMES,
    create_model,
    reduction_options,
    reference_r,
    resolve_model,
)

DATASET_CHOICES = [d for d in DATASETS if d != "imagefolder"]
MODEL_HELP = f"{', '.join(REFERENCE_NAMES)}, digits, or a timm model name"


def flag(p: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    """Add ``--name`` with both its dashed and underscored spellings (dest: underscores)."""
    dashed, under = name.replace("_", "-"), name.replace("-", "_")
    names = [f"--{dashed}"] + ([f"--{under}"] if under != dashed else [])
    p.add_argument(*names, dest=under, **kw)


def add_ema(p: argparse.ArgumentParser, default: bool = True) -> None:
    p.add_argument("--model-ema", "--model_ema", dest="model_ema", action="store_true")
    p.add_argument("--no-model-ema", "--no_model_ema", dest="model_ema", action="store_false")
    p.set_defaults(model_ema=default)
    flag(p, "model_ema_decay", type=float, default=0.99996)
    flag(p, "model_ema_force_cpu", action="store_true")


def add_optimizer(
    p: argparse.ArgumentParser,
    lr: float | None,
    min_lr: float,
    warmup_lr: float,
    warmup_epochs: int,
) -> None:
    flag(p, "opt", default="adamw", help="any timm optimizer name")
    flag(p, "opt_eps", default=1e-8, type=float)
    flag(p, "opt_betas", default=None, type=float, nargs="+")
    flag(p, "clip_grad", type=float, default=None)
    flag(p, "momentum", type=float, default=0.9)
    flag(p, "weight_decay", type=float, default=0.05)
    flag(p, "sched", default="cosine", help="any timm scheduler name (create_scheduler_v2)")
    flag(p, "lr", type=float, default=lr)
    flag(p, "warmup_lr", type=float, default=warmup_lr)
    flag(p, "min_lr", type=float, default=min_lr)
    flag(p, "decay_epochs", type=float, default=30)
    flag(p, "warmup_epochs", type=int, default=warmup_epochs)
    flag(p, "cooldown_epochs", type=int, default=0)
    p.add_argument(
        "--decay-rate", "--decay_rate", "--dr", dest="decay_rate", type=float, default=0.1
    )
    flag(
        p,
        "sched_in_steps",
        action="store_true",
        help="step the schedule per optimizer step instead of per epoch",
    )


def add_augmentation(
    p: argparse.ArgumentParser, mixup: float, cutmix: float, color_jitter: float | None
) -> None:
    flag(p, "color_jitter", type=float, default=color_jitter)
    p.add_argument(
        "--aa", type=str, default="rand-m9-mstd0.5-inc1", help="RandAugment policy ('' for none)"
    )
    p.add_argument("--smoothing", type=float, default=0.1)
    flag(p, "train_interpolation", type=str, default="bicubic")
    p.add_argument("--reprob", type=float, default=0.25)
    p.add_argument("--remode", type=str, default="pixel")
    p.add_argument("--recount", type=int, default=1)
    p.add_argument(
        "--mixup",
        type=float,
        default=None,
        help=f"mixup alpha (default {mixup}; 0 for multi-label data)",
    )
    p.add_argument(
        "--cutmix",
        type=float,
        default=None,
        help=f"cutmix alpha (default {cutmix}; 0 for multi-label data)",
    )
    p.set_defaults(default_mixup=mixup, default_cutmix=cutmix)
    flag(p, "cutmix_minmax", type=float, nargs="+", default=None)
    flag(p, "mixup_prob", type=float, default=1.0)
    flag(p, "mixup_switch_prob", type=float, default=0.5)
    flag(p, "mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])


def add_run(p: argparse.ArgumentParser, output_dir: str = "") -> None:
    flag(p, "output_dir", default=output_dir, help="where checkpoints and logs go ('' = none)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help="continue from this checkpoint.pth")
    flag(p, "start_epoch", default=0, type=int)
    p.add_argument("--eval", action="store_true", help="only evaluate")
    flag(p, "dist_eval", action="store_true", help="shard evaluation over the processes")
    p.add_argument("--num_workers", "--num-workers", "-j", dest="num_workers", default=10, type=int)
    flag(p, "pin_mem", action="store_true")
    p.add_argument("--no-pin-mem", "--no_pin_mem", dest="pin_mem", action="store_false")
    p.set_defaults(pin_mem=True)
    flag(p, "world_size", default=None, type=int, help="checked against torchrun's WORLD_SIZE")
    flag(p, "dist_url", default="env://")
    p.add_argument("--wandb_project", "--wandb-project", dest="wandb_project", default=None)
    p.add_argument("--wandb_group", "--wandb-group", dest="wandb_group", default=None)
    flag(
        p, "use_amp", action="store_true", help="fp16 autocast + loss scaling on CUDA, bf16 on CPU"
    )
    p.add_argument(
        "--grad_accum_steps",
        "--grad-accum-steps",
        "--accum_iter",
        "--accum-iter",
        dest="grad_accum_steps",
        default=1,
        type=int,
    )
    flag(
        p,
        "save_more_than_best",
        action="store_true",
        help="accepted for the reference commands: checkpoint.pth is always written",
    )
    flag(
        p,
        "stop_epoch",
        type=int,
        default=None,
        help="stop after this many epochs (the schedule still spans --epochs); resume later",
    )
    flag(p, "no_progress", action="store_true", help="no tqdm bars")


def add_reduction(p: argparse.ArgumentParser) -> None:
    flag(
        p,
        "reduction_loc",
        type=int,
        nargs="+",
        default=[],
        help="blocks (0-indexed) that reduce, e.g. 3 6 9",
    )
    p.add_argument(
        "--keep_rate",
        "--keep-rate",
        "--reduction_ratio",
        "--reduction-ratio",
        dest="keep_rate",
        type=float,
        nargs="+",
        default=[],
        help="keep rate per location (one value) or kept tokens per location",
    )
    p.add_argument(
        "--linkage",
        default=None,
        choices=["single", "complete", "average"],
        help="ATC linkage (default average)",
    )
    flag(p, "proportional_attn", action="store_true", help="ATC: size-weighted attention")
    p.add_argument(
        "--merge_fn",
        "--merge-fn",
        dest="merge_fn",
        default=None,
        choices=METHODS,
        help="method applied with --r-count (MAE recipe)",
    )
    p.add_argument(
        "--r-count",
        "--r_count",
        dest="r_count",
        type=int,
        default=0,
        help="tokens removed per block (MAE recipe)",
    )
    p.add_argument(
        "--r-sched",
        "--r_sched",
        dest="r_sched",
        default="constant",
        choices=["constant", "decrease"],
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def finish_args(args: argparse.Namespace) -> None:
    """Checks that need several flags; sets ``args.progress``."""
    args.progress = not args.no_progress
    if args.world_size is not None and args.world_size != world_size():
        raise SystemExit(
            f"--world_size {args.world_size} but {world_size()} processes were started; launch "
            f"with torchrun --nproc_per_node {args.world_size}"
        )
    if args.grad_accum_steps < 1:
        raise SystemExit("--grad_accum_steps must be >= 1")
    if not args.data:
        raise SystemExit("--data is required (the dataset root)")


def patch_options(
    args: argparse.Namespace, method: str | None, num_patches: int, num_blocks: int = 12
):
    """``(method, apply_patch options)`` from the model name's method or ``--merge_fn``.

    ``--r-count`` means what the reference's MAE recipe and off-the-shelf patches do with it
    (:func:`~atc_patch.train.models.reference_r`: ATC removes one token less per block than
    ToMe); proportional attention is ``args.r_count_prop_attn`` (default ``True``, the
    reference's timm patch; its MAE patch, ``train_mae.py``, runs without).
    """
    if args.r_count:
        if method is not None:
            raise SystemExit(
                "--r-count goes with a plain model and --merge_fn, not with "
                f"{args.model} (use --reduction_loc/--keep_rate)"
            )
        merge = args.merge_fn or "tome"
        r = reference_r(merge, args.r_count, args.r_sched, num_blocks)
        opts: dict[str, Any] = {"r": r, "prop_attn": getattr(args, "r_count_prop_attn", True)}
        if not isinstance(r, list):
            opts["r_schedule"] = args.r_sched
        if merge == "atc":
            opts["linkage"] = args.linkage or "average"
        elif args.linkage is not None:
            raise SystemExit("--linkage applies to --merge_fn atc")
        return merge, opts
    if args.merge_fn is not None:
        if method is not None and method != args.merge_fn:
            raise SystemExit(f"--merge_fn {args.merge_fn} contradicts --model {args.model}")
        if not args.keep_rate:
            raise SystemExit("--merge_fn needs --r-count or --keep_rate/--reduction_loc")
        method = args.merge_fn
    prop = True if method == "tome" else args.proportional_attn
    if method != "atc" and args.proportional_attn and method is not None:
        raise SystemExit("--proportional_attn applies to atc_* models (ToMe always uses it)")
    try:
        opts = reduction_options(
            method, args.keep_rate, args.reduction_loc, args.linkage, prop, num_patches
        )
    except ValueError as e:
        raise SystemExit(str(e)) from e
    return method, opts


def model_builder(
    args: argparse.Namespace,
    distilled: bool = False,
    kwargs: dict[str, Any] | None = None,
    spec_name: str | None = None,
) -> Callable[[int], nn.Module]:
    """``num_classes -> model``: create, load ``--finetune``, reduce.

    ``atc_*`` / ``tome_*`` names go through the timm registry
    (:mod:`atc_patch.pretrained.timm_models`), which patches the model it builds:
    ``timm.create_model(name, linkage=..., keep_rate=..., reduction_loc=...,
    proportional_attn=...)``. Other models are created by timm (or are the
    shipped digits ViT) and patched with ``atc_patch.apply_patch`` when ``--merge_fn`` /
    ``--r-count`` ask for it.
    """
    import atc_patch
    from atc_patch.pretrained import select_state_dict

    from .checkpoint import load_checkpoint, load_finetune_weights

    try:
        spec = resolve_model(spec_name or args.model, distilled=distilled)
    except ValueError as e:
        raise SystemExit(str(e)) from e

    def build(num_classes: int) -> nn.Module:
        pretrained = args.pretrained and not args.finetune
        create = dict(pretrained=pretrained, num_classes=num_classes, img_size=args.input_size)
        if spec.registered:  # the registry's DeiTs: 16 x 16 patches
            method, opts = patch_options(args, spec.method, (args.input_size // 16) ** 2)
            opts = dict(opts or {})
            opts["proportional_attn"] = opts.pop("prop_attn")
            model = create_model(
                spec, **create, reduction=opts, distilled=distilled, **(kwargs or {})
            )
        else:
            model = create_model(spec, **create, **(kwargs or {}))
        if args.finetune:
            state, _ = select_state_dict(load_checkpoint(args.finetune, any_url=True), ema=False)
            missing, unexpected = load_finetune_weights(model, state)
            print(f"finetune from {args.finetune}: missing {missing}, unexpected {unexpected}")
        if not spec.registered:
            method, opts = patch_options(
                args, spec.method, model.patch_embed.num_patches, len(model.blocks)
            )
            if method is not None:
                atc_patch.apply_patch(model, method=method, **opts)
        return model

    return build
