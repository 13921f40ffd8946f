"""Checkpoints in the ATC reference layout, written and read by :mod:`atc_patch.pretrained`.

A training checkpoint is a ``torch.save`` dict with the keys of :data:`CHECKPOINT_KEYS`:
``model`` (the model's ``state_dict``), ``model_ema`` (the EMA model's ``state_dict`` or
``None``), ``ema_best`` (whether the EMA weights scored best), ``optimizer``,
``lr_scheduler``, ``epoch`` (the last finished epoch, 0-based), ``scaler`` (AMP loss-scaler
state or ``None``) and ``args`` (the run's ``argparse.Namespace``), written by
:func:`atc_patch.pretrained.write_checkpoint` (so :func:`atc_patch.load_pretrained` loads a
DeiT's as it loads the released files) and read by the weights-only
:func:`atc_patch.pretrained.load_checkpoint`::

    save_checkpoint("out/checkpoint.pth", model=model, model_ema=None, ema_best=False,
                    optimizer=opt.state_dict(), lr_scheduler=sched.state_dict(), epoch=0,
                    scaler=None, args=args)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from atc_patch.pretrained import load_checkpoint, write_checkpoint

__all__ = ["CHECKPOINT_KEYS", "load_checkpoint", "load_finetune_weights", "save_checkpoint"]

CHECKPOINT_KEYS = (
    "model",
    "model_ema",
    "ema_best",
    "optimizer",
    "lr_scheduler",
    "epoch",
    "scaler",
    "args",
)
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


def save_checkpoint(path: str | Path, **entries: Any) -> Path:
    """Write a checkpoint with exactly the keys of :data:`CHECKPOINT_KEYS`, in that order.

    ``model`` and ``model_ema`` may be modules (DDP / EMA wrappers are unwrapped; a patched
    model's settings go into ``args`` so :func:`atc_patch.load_pretrained` rebuilds it) or
    state dicts. Delegates to :func:`atc_patch.pretrained.write_checkpoint` (any model, not
    only what :func:`atc_patch.save_pretrained` accepts); returns the path written.

    Raises:
        ValueError: missing or unknown keys (named), or ``ema_best`` without ``model_ema``.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in entries]
    unknown = [k for k in entries if k not in CHECKPOINT_KEYS]
    if missing or unknown:
        raise ValueError(
            f"checkpoint keys must be {list(CHECKPOINT_KEYS)}; missing {missing}, unknown {unknown}"
        )
    extra = {k: entries[k] for k in CHECKPOINT_KEYS[3:-1]}
    return write_checkpoint(
        entries["model"],
        path,
        model_ema=entries["model_ema"],
        ema_best=bool(entries["ema_best"]),
        args=entries["args"],
        **extra,
    )


def load_finetune_weights(
    model: nn.Module, state: dict[str, Tensor], verbose: bool = True
) -> tuple[list[str], list[str]]:
    """Load pretrained ``state`` into ``model`` for fine-tuning (``--finetune``).

    Head weights whose shape differs (another number of classes) are dropped, and ``pos_embed``
    is resampled to the model's grid with timm's ``resample_abs_pos_embed`` (bicubic; prefix
    tokens kept). Returns ``(missing_keys, unexpected_keys)`` of the non-strict load.
    """
    from timm.layers import resample_abs_pos_embed

    state = dict(state)
    own = model.state_dict()
    for key in HEAD_KEYS:
        if key in state and key in own and state[key].shape != own[key].shape:
            if verbose:
                print(
                    f"finetune: dropping {key} {tuple(state[key].shape)} (model has "
                    f"{tuple(own[key].shape)})"
                )
            del state[key]
    if (
        "pos_embed" in state
        and "pos_embed" in own
        and state["pos_embed"].shape != own["pos_embed"].shape
    ):
        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        grid = model.patch_embed.grid_size
        old = state["pos_embed"]
        state["pos_embed"] = resample_abs_pos_embed(
            old, new_size=list(grid), num_prefix_tokens=prefix, verbose=False
        )
        if verbose:
            print(
                f"finetune: resampled pos_embed {tuple(old.shape)} -> "
                f"{tuple(state['pos_embed'].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
