"""Evaluate a released or fine-tuned checkpoint: the ATC paper's ``validate_deit.py``.

The model comes from :func:`atc_patch.load_pretrained` (docs/pretrained.md), so ``--checkpoint``
is one of our checkpoints (``train_deit.py``'s ``best_checkpoint.pth``), a released file, a hub
id (``joakimbh/atc_small-im1k-complete/atc_small-im1k-07-complete.pth``, or the repository
with ``--keep_rate`` choosing its file) or a hub file URL. It is read with
``weights_only=True``, built from its weights, reduced as it was trained, and its EMA weights
are used when it says ``ema_best``. The images get the reference evaluation transform, read
from the model (``timm.data.resolve_data_config`` + ``create_transform``)::

    python examples/validate.py --dataset imagenet --data /data/imagenet \\
        --checkpoint out/atc_s_0.9/best_checkpoint.pth --output_dir results \\
        --val_output_name atc_s_0.9.json

With ``--ots`` the reduction comes from the command line instead (``--model`` gives the
method: ``atc_*``, ``tome_*`` or ``deit_*`` for none; ``--reduction_loc``,
``--keep_rate``/``--reduction_ratio``, ``--linkage``, ``--proportional_attn``, or
``--merge_fn`` with ``--r-count``/``--r-sched``), e.g. to evaluate a model fine-tuned with one
keep rate at another. Writes one JSON file with the summary (``Model``, ``Ratio``,
``Linkage``, ``Location``, ``Top1-Acc``, ``Top5-Acc``, ``Params``) and each image's
prediction, target and loss (as the reference); multi-label sets report mAP as ``Top1-Acc``.
DeiT checkpoints only (what ``load_pretrained`` builds); evaluate other models with
``train_deit.py --eval --resume <checkpoint>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import atc_patch
from atc_patch.train import cli
from atc_patch.train.datasets import build_dataset, is_multi_label
from atc_patch.train.engine import autocast, evaluate, init_distributed
from atc_patch.train.models import resolve_model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Validate a fine-tuned token-reduction checkpoint")
    p.add_argument("--data", "--data_path", dest="data", required=True)
    p.add_argument("--dataset", "-d", default="imagenet", choices=cli.DATASET_CHOICES)
    p.add_argument("--split", default="validation", help="validation/val or train")
    p.add_argument("--checkpoint", required=True, help="a local .pth, a hub id or a hub file URL")
    p.add_argument("-j", "--num_workers", "--num-workers", dest="num_workers", default=4, type=int)
    p.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", default=64, type=int)
    p.add_argument(
        "--input-size",
        "--input_size",
        dest="input_size",
        default=None,
        type=int,
        help="checked against the checkpoint's (its position embeddings fix it)",
    )
    p.add_argument("--output_dir", default="")
    p.add_argument("--val_output_name", default="validation.json")
    p.add_argument("--pin-mem", "--pin_mem", dest="pin_mem", action="store_true")
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force the EMA (--ema) or standard (--no-ema) weights (default: as ema_best says)",
    )
    p.add_argument(
        "--ots",
        action="store_true",
        help="reduce as these flags say, not as the checkpoint was trained",
    )
    p.add_argument("--model", default="atc_small_patch16_224", help="with --ots: the method")
    p.add_argument("--no_progress", action="store_true")
    cli.add_reduction(p)
    return p


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """The checkpoint as a patched timm DeiT (``--ots``: reduced as the flags say)."""
    pick = {"ema": args.ema}
    if len(args.keep_rate) == 1:  # chooses the file of a release repository
        pick["keep_rate"] = args.keep_rate[0]
    if not args.ots:
        return atc_patch.load_pretrained(args.checkpoint, **pick)
    try:
        method = resolve_model(args.model).method
    except ValueError as e:
        raise SystemExit(str(e)) from e
    model = atc_patch.load_pretrained(args.checkpoint, **pick, method=None)
    method, opts = cli.patch_options(args, method, model.patch_embed.num_patches, len(model.blocks))
    if method is not None:
        atc_patch.apply_patch(model, method=method, **opts)
    return model


def main(argv: list[str] | None = None) -> dict:
    from timm.data import create_transform, resolve_data_config

    args = get_args_parser().parse_args(argv)
    env = init_distributed(args.device)
    model = load_model(args)
    config = resolve_data_config({}, model=model)
    if args.input_size not in (None, config["input_size"][-1]):
        raise SystemExit(
            f"--input-size {args.input_size}, but {args.checkpoint} is a "
            f"{config['input_size'][-1]}-pixel model"
        )
    dataset, num_classes = build_dataset(
        args.dataset, args.data, args.split, create_transform(**config)
    )
    if num_classes != model.num_classes:
        raise SystemExit(
            f"{args.dataset} has {num_classes} classes, the checkpoint {model.num_classes}"
        )
    model.to(env.device).eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=args.pin_mem
    )
    multi = is_multi_label(args.dataset)
    stats = evaluate(
        model,
        loader,
        env=env,
        multi_label=multi,
        amp=autocast(env.device, args.use_amp),
        progress=not args.no_progress,
        keep_outputs=True,
    )
    outputs, targets = stats.pop("outputs"), stats.pop("targets")
    settings = atc_patch.patch_settings(model) or {}
    size = model.pretrained_cfg["architecture"].split("_")[1]  # deit_<size>_..._patch16_224
    params = sum(p.numel() for p in model.parameters())
    result = {
        "Model": f"{settings.get('method') or 'deit'}_{size}_patch16_224",
        # as the reference: the --keep_rate / --reduction_ratio values (kept-token counts too)
        "Ratio": list(args.keep_rate) if args.ots else settings.get("keep_rate"),
        "Linkage": settings.get("linkage"),
        "Location": list(args.reduction_loc if args.ots else settings.get("reduction_loc") or []),
        "Top1-Acc": round(stats["acc1"], 4),
        "Top5-Acc": round(stats["acc5"], 4),
        "Params": round(params / 1e6, 2),
    }
    if args.output_dir:
        per_image = {}
        for i in range(len(outputs)):
            out, tgt = outputs[i : i + 1], targets[i : i + 1]
            if multi:
                loss = F.binary_cross_entropy_with_logits(out, tgt.float())
                pred = out.sigmoid()[0].tolist()
            else:
                loss = F.cross_entropy(out, tgt)
                pred = out[0].topk(min(5, out.shape[1])).indices.tolist()
            per_image[str(i)] = {
                "Predictions": pred,
                "Target": tgt[0].tolist(),
                "Loss": float(loss),
            }
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / args.val_output_name).write_text(json.dumps({**result, **per_image}, indent=1))
    metric = "mAP" if multi else "Acc@1"
    print(f"{result['Model']}: {metric} {result['Top1-Acc']:.2f} on {stats['num_images']} images")
    return result


if __name__ == "__main__":
    main()
