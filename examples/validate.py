"""Evaluate a fine-tuned checkpoint: the ATC paper's ``validate_deit.py``.

The model is rebuilt from the ``args`` stored in the checkpoint (reference layout, loaded with
``weights_only=True``); the EMA weights are used when the checkpoint says ``ema_best``::

    python examples/validate.py --dataset imagenet --data /data/imagenet \\
        --checkpoint out/atc_s_0.9/best_checkpoint.pth --output_dir results \\
        --val_output_name atc_s_0.9.json

With ``--ots`` the model is built from the command line instead (``--model``,
``--reduction_loc``, ``--keep_rate``/``--reduction_ratio``, ``--linkage``,
``--proportional_attn``) and the checkpoint's weights are loaded into it, e.g. to evaluate a
model fine-tuned with one keep rate at another. Writes one JSON file with the summary
(``Model``, ``Ratio``, ``Linkage``, ``Location``, ``Top1-Acc``, ``Top5-Acc``, ``Params``) and
each image's prediction, target and loss (as the reference); multi-label sets report mAP as
``Top1-Acc``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from atc_patch.train import cli
from atc_patch.train.checkpoint import load_checkpoint, model_state
from atc_patch.train.datasets import build_dataset, is_multi_label
from atc_patch.train.engine import autocast, evaluate, init_distributed
from atc_patch.train.recipe import transform_kind
from atc_patch.train.transforms import build_transform


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Validate a fine-tuned token-reduction checkpoint")
    p.add_argument("--data", "--data_path", dest="data", required=True)
    p.add_argument("--dataset", "-d", default="imagenet", choices=cli.DATASET_CHOICES)
    p.add_argument("--split", default="validation", help="validation/val or train")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("-j", "--num_workers", "--num-workers", dest="num_workers", default=4, type=int)
    p.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", default=64, type=int)
    p.add_argument(
        "--input-size",
        "--input_size",
        dest="input_size",
        default=None,
        type=int,
        help="default: the checkpoint's",
    )
    p.add_argument("--output_dir", default="")
    p.add_argument("--val_output_name", default="validation.json")
    p.add_argument("--pin-mem", "--pin_mem", dest="pin_mem", action="store_true")
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--ots",
        action="store_true",
        help="build the model from these flags, not the checkpoint's args",
    )
    p.add_argument("--model", default="atc_small_patch16_224", help=cli.MODEL_HELP)
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--drop-path", "--drop_path", dest="drop_path", type=float, default=0.1)
    p.add_argument("--no_progress", action="store_true")
    cli.add_reduction(p)
    return p


def model_args(args: argparse.Namespace, stored: argparse.Namespace) -> argparse.Namespace:
    """The flags the model is built from: the checkpoint's, or (``--ots``) these."""
    src = args if args.ots else stored
    keys = (
        "model",
        "reduction_loc",
        "keep_rate",
        "linkage",
        "proportional_attn",
        "merge_fn",
        "r_count",
        "r_sched",
        "input_size",
        "distillation_type",
        "global_pool",
    )
    out = {k: getattr(src, k, None) for k in keys}
    if getattr(stored, "reduction_ratio", None) and not out["keep_rate"]:  # reference ckpts
        out["keep_rate"] = stored.reduction_ratio
    out["keep_rate"] = out["keep_rate"] or []
    out["reduction_loc"] = out["reduction_loc"] or []
    out["r_count"] = out["r_count"] or 0
    out["r_sched"] = out["r_sched"] or "constant"
    out["proportional_attn"] = bool(out["proportional_attn"])
    out["input_size"] = args.input_size or out["input_size"] or 224
    return argparse.Namespace(**out, pretrained=False, finetune="")


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    env = init_distributed(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    stored = ckpt.get("args") or argparse.Namespace()
    margs = model_args(args, stored)
    kind = transform_kind(argparse.Namespace(model=margs.model, dataset=args.dataset))
    transform = build_transform(
        False, kind, margs.input_size, crop_pct=getattr(stored, "crop_pct", None)
    )
    dataset, num_classes = build_dataset(args.dataset, args.data, args.split, transform)
    kwargs = {"drop_rate": args.drop, "drop_path_rate": args.drop_path}
    if margs.global_pool is not None and not margs.model.startswith(("atc", "tome", "deit")):
        kwargs["global_pool"] = "avg" if margs.global_pool else "token"
    build = cli.model_builder(
        margs, distilled=(margs.distillation_type or "none") != "none", kwargs=kwargs
    )
    model = build(num_classes)
    model.load_state_dict(model_state(ckpt))
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
    params = sum(p.numel() for p in model.parameters())
    result = {
        "Model": margs.model,
        "Ratio": margs.keep_rate,
        "Linkage": margs.linkage,
        "Location": margs.reduction_loc,
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
    print(f"{margs.model}: {metric} {result['Top1-Acc']:.2f} on {stats['num_images']} images")
    return result


if __name__ == "__main__":
    main()
