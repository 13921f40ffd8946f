"""Fine-tune a DeiT with token reduction: the ATC paper's ``train_deit.py``, on timm's stack.

The flags are the reference script's (``python train_deit.py --help``), so the paper's
command runs with only the paths changed::

    torchrun --nproc_per_node 8 examples/train_deit.py --dataset imagenet --data /data/imagenet \\
        --batch-size 256 --lr 0.001 --epochs 30 --warmup-epochs 20 --lr_batch_normalizer 1024 \\
        --sched_in_steps --use_amp --grad_accum_steps 2 --output_dir out/atc_s_0.9 \\
        --model atc_small_patch16_224 --linkage complete --proportional_attn \\
        --reduction_loc 3 6 9 --keep_rate 0.9

Models: ``{atc,tome,deit}_{tiny,small,base}_patch16_224`` (DeiT weights from timm; ATC / ToMe
applied with ``atc_patch.apply_patch``), ``digits`` (the ViT shipped with atc_patch), or any
timm ViT. ``--keep_rate`` and ``--reduction_ratio`` are one option: one keep rate (after the
j-th of ``--reduction_loc`` ``int(N * k ** (j + 1))`` patch tokens remain) or one kept-token
count per location. Datasets: ``imagenet``, ``nabirds``, ``coco``, ``nuswide`` in their
official layouts (see ``atc_patch.train.datasets``); COCO and NUS-WIDE train with the ASL loss
and report mAP. The learning rate is ``--lr * total batch / --lr_batch_normalizer`` (total
batch = batch size x accumulation steps x processes) unless ``--unscale-lr``.

Outputs in ``--output_dir``: ``checkpoint.pth`` (every epoch, for ``--resume``),
``best_checkpoint.pth``, ``log.txt`` (JSON lines) and ``log.csv``. wandb is used only with
``--wandb_project``. Needs ``pip install 'atc-patch[train]'``.
"""

from __future__ import annotations

import argparse

from atc_patch.train import cli
from atc_patch.train.recipe import run


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeiT fine-tuning with token reduction", add_help=True)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", default=64, type=int)
    p.add_argument("--epochs", default=300, type=int)
    p.add_argument("--bce-loss", action="store_true")
    p.add_argument("--unscale-lr", action="store_true")
    p.add_argument("--model", default="deit_base_patch16_224", help=cli.MODEL_HELP)
    p.add_argument("--input-size", "--input_size", dest="input_size", default=224, type=int)
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--drop-path", "--drop_path", dest="drop_path", type=float, default=0.1)
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start from timm's weights (digits: the shipped ones)",
    )
    cli.add_ema(p)
    cli.add_optimizer(p, lr=5e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5)
    cli.add_augmentation(p, mixup=0.8, cutmix=1.0, color_jitter=0.3)
    p.add_argument("--teacher-model", default="regnety_160", type=str)
    p.add_argument("--teacher-path", type=str, default="")
    p.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"])
    p.add_argument("--distillation-alpha", default=0.5, type=float)
    p.add_argument("--distillation-tau", default=1.0, type=float)
    p.add_argument(
        "--finetune",
        default="",
        help="start from this checkpoint (head dropped if its size differs, pos_embed resampled)",
    )
    p.add_argument("--data", "--data-path", "--data_path", dest="data", default="")
    p.add_argument("--dataset", default="imagenet", choices=cli.DATASET_CHOICES)
    cli.add_run(p)
    p.add_argument("--lr_batch_normalizer", default=512, type=float)
    cli.add_reduction(p)
    return p


def build_model_fn(args: argparse.Namespace):
    """``num_classes -> model``: create, optionally fine-tune-load, then patch."""
    return cli.model_builder(
        args,
        distilled=args.distillation_type != "none",
        kwargs={"drop_rate": args.drop, "drop_path_rate": args.drop_path},
    )


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    cli.finish_args(args)
    if args.distillation_type != "none" and args.finetune and not args.eval:
        raise SystemExit("distillation together with --finetune is not supported (as in DeiT)")
    total = args.batch_size * args.grad_accum_steps * cli.world_size()
    args.total_batch_size = total
    if not args.unscale_lr:
        args.input_lr = args.lr
        args.lr = args.lr * total / args.lr_batch_normalizer
    return run(args, build_model_fn(args))


if __name__ == "__main__":
    main()
