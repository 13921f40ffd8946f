"""Fine-tune an MAE-pretrained ViT with token reduction: the ATC paper's ``train_mae.py``.

The flags are the reference script's (MAE's ``main_finetune.py`` plus ``--merge_fn``,
``--r-count``, ``--r-sched``, ``--linkage``), so the paper's command runs with only the paths
changed::

    torchrun --nproc_per_node 8 examples/train_mae.py --data /data/imagenet --batch_size 256 \\
        --accum_iter 2 --model vit_base_patch16 \\
        --finetune ./pretrained_models/mae_pretrain_vit_base.pth --epochs 100 --blr 5e-4 \\
        --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 \\
        --cutmix 1.0 --dist_eval --output_dir out/mae_atc --merge_fn atc --r-count 16 \\
        --r-sched constant --linkage average

``--data`` (or ``--data_path``) is an ImageFolder root with ``train/`` and ``val/`` (any of the
``--dataset`` layouts of ``train_deit.py`` works too). Models: ``vit_base_patch16``,
``vit_large_patch16``, ``vit_huge_patch14`` (timm ViTs with MAE's global average pooling and
``fc_norm``; ``--cls_token`` for the class token), ``digits``, or a timm name. The learning
rate is ``--blr * total batch / 256`` unless ``--lr`` is given; AdamW with layer-wise decay
``--layer_decay`` (``timm.optim.create_optimizer_v2``), warm-up then cosine per step. With
``--finetune`` the head is re-initialised (std 2e-5, as MAE) and ``pos_embed`` resampled.
"""

from __future__ import annotations

import argparse

import torch

from atc_patch.train import cli
from atc_patch.train.recipe import run


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MAE fine-tuning with token reduction")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", default=64, type=int)
    p.add_argument("--epochs", default=50, type=int)
    p.add_argument(
        "--model",
        default="vit_large_patch16",
        help="vit_{base,large}_patch16, vit_huge_patch14, digits or a timm name",
    )
    p.add_argument("--input_size", "--input-size", dest="input_size", default=224, type=int)
    p.add_argument("--drop_path", "--drop-path", dest="drop_path", type=float, default=0.1)
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start from timm's weights instead of --finetune",
    )
    cli.add_optimizer(p, lr=None, min_lr=1e-6, warmup_lr=0.0, warmup_epochs=5)
    p.add_argument(
        "--blr",
        type=float,
        default=1e-3,
        help="base lr: lr = blr * total batch / 256 (when --lr is not given)",
    )
    p.add_argument("--layer_decay", "--layer-decay", dest="layer_decay", type=float, default=0.75)
    cli.add_augmentation(p, mixup=0.0, cutmix=0.0, color_jitter=None)
    p.add_argument("--finetune", default="", help="the MAE pretrained checkpoint")
    p.add_argument("--global_pool", action="store_true")
    p.set_defaults(global_pool=True)
    p.add_argument("--cls_token", action="store_false", dest="global_pool")
    p.add_argument("--data_path", "--data", "--data-path", dest="data", default="")
    p.add_argument("--dataset", default="imagenet", choices=cli.DATASET_CHOICES)
    p.add_argument(
        "--nb_classes",
        type=int,
        default=None,
        help="checked against the dataset's number of classes",
    )
    cli.add_run(p, output_dir="./output_dir")
    cli.add_ema(p, default=False)
    p.add_argument("--local_rank", default=-1, type=int, help="set by torch.distributed.launch")
    cli.add_reduction(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    cli.finish_args(args)
    args.sched_in_steps = True  # MAE adjusts the learning rate every step
    args.r_count_prop_attn = False  # the reference's MAE patch runs without it
    args.distillation_type, args.distillation_alpha, args.distillation_tau = "none", 0.5, 1.0
    total = args.batch_size * args.grad_accum_steps * cli.world_size()
    args.total_batch_size = total
    if args.lr is None:
        args.lr = args.blr * total / 256
    build = cli.model_builder(
        args,
        kwargs={
            "drop_path_rate": args.drop_path,
            "global_pool": "avg" if args.global_pool else "token",
        },
    )

    def build_mae(num_classes: int) -> torch.nn.Module:
        if args.nb_classes is not None and args.nb_classes != num_classes:
            raise SystemExit(f"--nb_classes {args.nb_classes} but the dataset has {num_classes}")
        model = build(num_classes)
        if args.finetune:
            from timm.layers import trunc_normal_

            trunc_normal_(model.head.weight, std=2e-5)
            torch.nn.init.zeros_(model.head.bias)
        return model

    return run(args, build_mae)


if __name__ == "__main__":
    main()
