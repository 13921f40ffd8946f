"""The fine-tuning loop shared by ``examples/train_deit.py`` and ``examples/train_mae.py``.

:func:`run` takes the parsed flags (DeiT spellings, see ``examples/train_deit.py``) and a
``build_model(num_classes) -> nn.Module`` callback, and does the rest with timm's pieces:
``timm.data`` transforms and ``Mixup``, ``timm.loss``, ``timm.optim.create_optimizer_v2``
(``layer_decay`` for MAE), ``timm.scheduler.create_scheduler_v2`` (cosine with warm-up, per
epoch or per optimizer step), ``timm.utils.ModelEmaV3`` and ``NativeScaler``; DDP under
``torchrun``. Every epoch it evaluates, writes ``checkpoint.pth`` (and ``best_checkpoint.pth``
when the best score improves) in the reference layout, and appends a row to ``log.txt``
(JSON lines) and ``log.csv``. Data order, augmentation and drop-path are seeded per epoch
from ``(seed, rank, epoch)``, so a run resumed from ``checkpoint.pth`` continues exactly.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable
from inspect import signature
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from atc_patch.pretrained import select_state_dict

from .checkpoint import load_checkpoint, save_checkpoint
from .datasets import build_dataset, is_multi_label
from .engine import (
    DistEnv,
    DistillationLoss,
    autocast,
    evaluate,
    init_distributed,
    seed_everything,
    train_one_epoch,
)
from .transforms import build_transform


class RunLog:
    """``log.txt`` (one JSON object per line, as the reference), ``log.csv`` and wandb."""

    def __init__(self, output_dir: Path | None, args: argparse.Namespace, env: DistEnv) -> None:
        self.dir = output_dir if env.is_main else None
        self.rows: list[dict[str, Any]] = []
        self.wandb = None
        if env.is_main and getattr(args, "wandb_project", None):
            try:
                import wandb
            except ImportError as e:
                raise SystemExit(
                    "--wandb_project needs wandb: pip install wandb (set WANDB_MODE=offline to "
                    "log without an account)"
                ) from e
            self.wandb = wandb.init(
                project=args.wandb_project, group=args.wandb_group, config=vars(args)
            )

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.wandb is not None:
            self.wandb.log(row)
        if self.dir is None:
            return
        with open(self.dir / "log.txt", "a") as f:
            f.write(json.dumps(row) + "\n")
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.dir / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def transform_kind(args: argparse.Namespace) -> str:
    if getattr(args, "model", "").endswith("digits"):
        return "digits"
    return "multilabel" if is_multi_label(args.dataset) else "imagenet"


def build_loaders(args: argparse.Namespace, env: DistEnv) -> tuple[Any, Any, int]:
    """Train and val ``DataLoader`` s and the number of classes."""
    kind = transform_kind(args)
    common = dict(
        aa=args.aa,
        color_jitter=args.color_jitter,
        interpolation=args.train_interpolation,
        reprob=args.reprob,
        remode=args.remode,
        recount=args.recount,
        crop_pct=getattr(args, "crop_pct", None),
    )
    train_tf = build_transform(True, kind, args.input_size, **common)
    val_tf = build_transform(False, kind, args.input_size, **common)
    train_set, num_classes = build_dataset(args.dataset, args.data, "train", train_tf)
    val_set, _ = build_dataset(args.dataset, args.data, "val", val_tf)
    # One sampler type for one or many processes: its order depends only on (seed, epoch).
    train_sampler = DistributedSampler(
        train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed
    )
    if args.dist_eval and env.distributed:
        val_sampler: Any = DistributedSampler(
            val_set, num_replicas=env.world_size, rank=env.rank, shuffle=False
        )
    else:
        val_sampler = SequentialSampler(val_set)
    pin = args.pin_mem and env.device.type == "cuda"
    train = DataLoader(
        train_set,
        sampler=train_sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=pin,
        drop_last=len(train_set) >= args.batch_size * env.world_size,
    )
    val = DataLoader(
        val_set,
        sampler=val_sampler,
        batch_size=int(1.5 * args.batch_size),
        num_workers=args.num_workers,
        pin_memory=pin,
    )
    return train, val, num_classes


def build_criterion(args: argparse.Namespace, mixup_active: bool) -> nn.Module:
    from timm.loss import (
        AsymmetricLossMultiLabel,
        LabelSmoothingCrossEntropy,
        SoftTargetCrossEntropy,
    )

    if getattr(args, "bce_loss", False):
        return nn.BCEWithLogitsLoss()
    if is_multi_label(args.dataset):
        # The ATC/ASL settings; "sum" is the original ASL reduction the paper trained with
        # (timm >= 1.0.2x defaults to "batchmean").
        kw = (
            {"reduction": "sum"}
            if "reduction" in signature(AsymmetricLossMultiLabel).parameters
            else {}
        )
        return AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=0, clip=0.05, **kw)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def build_teacher(args: argparse.Namespace, num_classes: int, env: DistEnv) -> nn.Module | None:
    if args.distillation_type == "none":
        return None
    import timm

    if not args.teacher_path:
        raise SystemExit("--distillation-type needs --teacher-path (the teacher's checkpoint)")
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes)
    ckpt = load_checkpoint(args.teacher_path, any_url=True)
    teacher.load_state_dict(select_state_dict(ckpt, ema=False)[0])
    return teacher.to(env.device).eval()


def _save(path: Path, model, ema, optimizer, scheduler, scaler, epoch, args, ema_best) -> None:
    save_checkpoint(
        path,
        model=model,  # the module: its patch settings go into args for load_pretrained
        model_ema=ema,
        ema_best=bool(ema_best),
        optimizer=optimizer.state_dict(),
        lr_scheduler=scheduler.state_dict(),
        epoch=epoch,
        scaler=scaler.state_dict() if scaler is not None else None,
        args=args,
    )


def run(args: argparse.Namespace, build_model: Callable[[int], nn.Module]) -> dict[str, Any]:
    """Fine-tune (or, with ``args.eval``, only evaluate); returns the logged rows and models.

    Returns ``{"rows": [...], "model": model, "model_ema": ema module or None,
    "optimizer": optimizer, "env": DistEnv, "args": args}``.
    """
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    env = init_distributed(args.device, getattr(args, "dist_url", "env://"))
    seed_everything(args.seed + env.rank)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    train_loader, val_loader, num_classes = build_loaders(args, env)
    args.num_classes = num_classes
    multi_label = is_multi_label(args.dataset)
    for name in ("mixup", "cutmix"):  # the recipe's default, off for multi-label targets
        if getattr(args, name) is None:
            setattr(args, name, 0.0 if multi_label else getattr(args, f"default_{name}", 0.0))
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup_active and multi_label:
        raise SystemExit(f"--mixup/--cutmix need single-label data, not {args.dataset}")
    mixup_fn = None
    if mixup_active:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )

    model = build_model(num_classes).to(env.device)
    if args.distillation_type != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(
            model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None
        )
    model_without_ddp = model
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    opt_kw: dict[str, Any] = {"eps": args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas:
        opt_kw["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(
        model_without_ddp,
        opt=args.opt,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        layer_decay=getattr(args, "layer_decay", None),
        **opt_kw,
    )
    amp = autocast(env.device, args.use_amp)
    loss_scaler = (
        NativeScaler(device="cuda") if args.use_amp and env.device.type == "cuda" else None
    )
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    lr_scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs,
        decay_rate=args.decay_rate,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_in_steps,
        updates_per_epoch=updates_per_epoch,
    )
    teacher = build_teacher(args, num_classes, env)
    criterion = DistillationLoss(
        build_criterion(args, mixup_active),
        teacher,
        args.distillation_type,
        args.distillation_alpha,
        args.distillation_tau,
    )

    start_epoch = args.start_epoch
    if args.resume:
        ckpt = load_checkpoint(args.resume, any_url=True)
        model_without_ddp.load_state_dict(ckpt["model"])
        if not args.eval and all(ckpt.get(k) is not None for k in ("optimizer", "lr_scheduler")):
            optimizer.load_state_dict(ckpt["optimizer"])
            lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            start_epoch = int(ckpt["epoch"]) + 1
            if model_ema is not None and ckpt.get("model_ema") is not None:
                model_ema.module.load_state_dict(ckpt["model_ema"])
            if loss_scaler is not None and ckpt.get("scaler") is not None:
                loss_scaler.load_state_dict(ckpt["scaler"])
        if env.is_main:
            print(f"resumed from {args.resume} (epoch {start_epoch})")
    lr_scheduler.step(start_epoch)

    log = RunLog(output_dir, args, env)
    eval_kw = dict(
        env=env, multi_label=multi_label, amp=amp, gather=args.dist_eval, progress=args.progress
    )
    metric = "mAP" if multi_label else "acc1"
    result: dict[str, Any] = {
        "model": model_without_ddp,
        "model_ema": None,
        "env": env,
        "args": args,
        "optimizer": optimizer,
    }
    if model_ema is not None:
        result["model_ema"] = model_ema.module
    if args.eval or start_epoch == 0:
        stats = evaluate(model, val_loader, **eval_kw)
        row = {"epoch": start_epoch - 1, **{f"val_{k}": v for k, v in stats.items()}}
        log.log(row)
        if env.is_main:
            print(f"before training: {metric} {stats[metric]:.2f} on {stats['num_images']} images")
        if args.eval:
            log.finish()
            return {**result, "rows": log.rows}

    best = -math.inf
    num_updates = start_epoch * updates_per_epoch
    end_epoch = args.epochs + args.cooldown_epochs
    if getattr(args, "stop_epoch", None):
        end_epoch = min(end_epoch, args.stop_epoch)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, end_epoch):
        train_loader.sampler.set_epoch(epoch)
        seed_everything(args.seed + env.rank + 1000 * (epoch + 1))
        train_stats, num_updates = train_one_epoch(
            model,
            criterion,
            train_loader,
            optimizer,
            env=env,
            epoch=epoch,
            num_updates=num_updates,
            loss_scaler=loss_scaler,
            lr_scheduler=lr_scheduler,
            clip_grad=args.clip_grad,
            model_ema=model_ema,
            mixup_fn=mixup_fn,
            amp=amp,
            grad_accum_steps=args.grad_accum_steps,
            distill_inputs=True,
            progress=args.progress,
        )
        lr_scheduler.step(epoch + 1)
        stats = evaluate(model, val_loader, **eval_kw)
        row = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"val_{k}": v for k, v in stats.items()},
        }
        score, ema_best = stats[metric], False
        if model_ema is not None and not args.model_ema_force_cpu:
            ema_stats = evaluate(model_ema.module, val_loader, **eval_kw)
            row.update({f"ema_val_{k}": v for k, v in ema_stats.items()})
            if ema_stats[metric] > score:
                score, ema_best = ema_stats[metric], True
        improved = score > best
        best = max(best, score)
        row["max_accuracy"] = best
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if output_dir is not None and env.is_main:
            parts = (
                model_without_ddp,
                model_ema,
                optimizer,
                lr_scheduler,
                loss_scaler,
                epoch,
                args,
            )
            _save(output_dir / "checkpoint.pth", *parts, ema_best)
            if improved:
                _save(output_dir / "best_checkpoint.pth", *parts, ema_best)
        log.log(row)
        if env.is_main:
            msg = f"epoch {epoch}: train loss {train_stats['loss']:.4f}"
            msg += f"  val {metric} {stats[metric]:.2f}"
            if "ema_val_acc1" in row:
                msg += f"  ema {row[f'ema_val_{metric}']:.2f}"
            print(msg, flush=True)
    log.finish()
    return {**result, "rows": log.rows}
