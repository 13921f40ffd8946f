"""One training epoch and one evaluation pass, on timm's pieces, single- or multi-process.

Multi-process runs are launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment) and use ``DistributedDataParallel`` with NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .metrics import mean_average_precision


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size`` on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, dist_url: str = "env://") -> DistEnv:
    """Join the process group ``torchrun`` describes in the environment (or run alone).

    ``device`` defaults to ``cuda`` when available (one GPU per local rank), else ``cpu``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, dev)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DistillationLoss(nn.Module):
    """DeiT's hard/soft distillation through the distillation token.

    ``outputs`` is the student's ``(class_logits, dist_logits)`` in training (timm's distilled
    DeiT with ``set_distilled_training(True)``) or plain logits. With ``kind='none'`` this is
    ``base(outputs, targets)``. Otherwise ``(1 - alpha) * base(class_logits, targets) +
    alpha * D`` with ``D`` the KL divergence at temperature ``tau`` (soft) or the cross-entropy
    against the teacher's argmax (hard) on ``dist_logits``.
    """

    KINDS = ("none", "soft", "hard")

    def __init__(
        self,
        base: nn.Module,
        teacher: nn.Module | None,
        kind: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"distillation type must be one of {self.KINDS}, got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError("distillation needs a teacher model")
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, inputs: Tensor, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor):
        dist_out = None
        if isinstance(outputs, (tuple, list)):
            outputs, dist_out = outputs
        loss = self.base(outputs, targets)
        if self.kind == "none":
            return loss
        if dist_out is None:
            raise ValueError("distillation needs a model with a distillation token (head_dist)")
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
        if self.kind == "soft":
            t = self.tau
            d = (
                F.kl_div(
                    F.log_softmax(dist_out / t, dim=1),
                    F.log_softmax(teacher_out / t, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (t * t)
                / dist_out.numel()
            )
        else:
            d = F.cross_entropy(dist_out, teacher_out.argmax(dim=1))
        return loss * (1 - self.alpha) + d * self.alpha


def autocast(
    device: torch.device, use_amp: bool
) -> Callable[[], contextlib.AbstractContextManager]:
    """AMP context: fp16 on CUDA, bf16 on CPU; a no-op without ``use_amp``."""
    if not use_amp:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    env: DistEnv,
    epoch: int,
    num_updates: int,
    loss_scaler: Any = None,
    lr_scheduler: Any = None,
    clip_grad: float | None = None,
    model_ema: Any = None,
    mixup_fn: Callable | None = None,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    grad_accum_steps: int = 1,
    distill_inputs: bool = False,
    progress: bool = True,
) -> tuple[dict[str, float], int]:
    """Train one epoch; returns ``({"loss": mean loss, "lr": last lr}, num_updates)``.

    The optimizer steps every ``grad_accum_steps`` batches (and after the last batch), each
    batch's loss divided by ``grad_accum_steps``, so accumulating ``k`` batches of ``b``
    equals one batch of ``k * b``. DDP syncs gradients only on stepping batches.
    ``criterion(outputs, targets)`` (or ``criterion(inputs, outputs, targets)`` when
    ``distill_inputs``). ``lr_scheduler.step_update`` runs after each optimizer step.
    """
    model.train()
    n = len(loader)
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (progress and env.is_main), leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar):
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        step = (i + 1) % grad_accum_steps == 0 or i + 1 == n
        sync = (
            contextlib.nullcontext() if step or not hasattr(model, "no_sync") else model.no_sync()
        )
        with sync:
            with amp():
                outputs = model(images)
                if isinstance(outputs, (tuple, list)):
                    outputs = type(outputs)(o.float() for o in outputs)
                else:
                    outputs = outputs.float()
                loss = (
                    criterion(images, outputs, targets)
                    if distill_inputs
                    else criterion(outputs, targets)
                )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch}, batch {i}; stopping")
            loss = loss / grad_accum_steps
            if loss_scaler is not None:
                loss_scaler(
                    loss,
                    optimizer,
                    clip_grad=clip_grad,
                    parameters=model.parameters(),
                    need_update=step,
                )
            else:
                loss.backward()
                if step:
                    if clip_grad:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                    optimizer.step()
        if step:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if model_ema is not None:
                model_ema.update(_unwrap(model), step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
        total, count = total + value, count + 1
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    stats = torch.tensor([total, count], dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(stats)
    mean = float(stats[0] / stats[1]) if stats[1] else float("nan")
    return {"loss": mean, "lr": max(g["lr"] for g in optimizer.param_groups)}, num_updates


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _gather(t: Tensor, env: DistEnv) -> Tensor:
    """Concatenate ``t`` over ranks (rows may differ in number)."""
    if not env.distributed:
        return t
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(env.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    env: DistEnv,
    multi_label: bool = False,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    gather: bool = False,
    progress: bool = True,
    keep_outputs: bool = False,
) -> dict[str, Any]:
    """Evaluate; returns ``loss`` and ``acc1``/``acc5`` (percent) or ``mAP`` (percent).

    Multi-label: BCE loss and macro mAP over classes with positives (``acc1`` = ``acc5`` =
    ``mAP``, as in the ATC scripts). ``gather`` (``--dist_eval``) combines the ranks' shards;
    a ``DistributedSampler`` pads the last shard with repeated images, which are counted.
    ``keep_outputs`` adds the ``outputs``/``targets`` tensors.
    """
    from timm.utils import accuracy

    model.eval()
    outs, tgts = [], []
    bar = tqdm(loader, desc="eval", disable=not (progress and env.is_main), leave=False)
    for images, targets in bar:
        images = images.to(env.device, non_blocking=True)
        with amp():
            out = model(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        outs.append(out.float().cpu())
        tgts.append(targets.cpu())
    output, target = torch.cat(outs), torch.cat(tgts)
    if gather:
        output = _gather(output.to(env.device), env).cpu()
        target = _gather(target.to(env.device), env).cpu()
    if multi_label:
        target = target.float()
        loss = F.binary_cross_entropy_with_logits(output, target)
        score = 100.0 * mean_average_precision(output, target)
        stats: dict[str, Any] = {"loss": float(loss), "mAP": score, "acc1": score, "acc5": score}
    else:
        loss = F.cross_entropy(output, target)
        k = min(5, output.shape[1])
        acc1, acc5 = accuracy(output, target, topk=(1, k))
        stats = {"loss": float(loss), "acc1": float(acc1), "acc5": float(acc5)}
    stats["num_images"] = int(target.shape[0])
    if keep_outputs:
        stats["outputs"], stats["targets"] = output, target
    return stats
