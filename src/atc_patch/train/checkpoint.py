"""Checkpoints in the ATC reference layout, loaded without unpickling code.

A training checkpoint is a ``torch.save`` dict with the keys of :data:`CHECKPOINT_KEYS`:
``model`` (the model's ``state_dict``), ``model_ema`` (the EMA model's ``state_dict`` or
``None``), ``ema_best`` (whether the EMA weights scored best), ``optimizer``,
``lr_scheduler``, ``epoch`` (the last finished epoch, 0-based), ``scaler`` (AMP loss-scaler
state or ``None``) and ``args`` (the run's ``argparse.Namespace``). The ATC release and these
scripts write the same layout, so either loads the same way.

Loading uses ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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


def _plain(value: Any) -> Any:
    """Values safe for ``weights_only`` loading (paths and other objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def plain_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` holding only bools, numbers, strings, lists and dicts."""
    return argparse.Namespace(**{k: _plain(v) for k, v in vars(args).items()})


def save_checkpoint(path: str | Path, **entries: Any) -> None:
    """Write a checkpoint with exactly the keys of :data:`CHECKPOINT_KEYS`.

    Raises ``ValueError`` naming missing or unknown keys.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in entries]
    unknown = [k for k in entries if k not in CHECKPOINT_KEYS]
    if missing or unknown:
        raise ValueError(
            f"checkpoint keys must be {list(CHECKPOINT_KEYS)}; missing {missing}, unknown {unknown}"
        )
    if isinstance(entries["args"], argparse.Namespace):
        entries["args"] = plain_args(entries["args"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({k: entries[k] for k in CHECKPOINT_KEYS}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with ``argparse.Namespace`` allowed.

    Raises ``FileNotFoundError`` for a missing file and ``pickle.UnpicklingError`` (with the
    offending type named by torch) for a file that holds anything but tensors, containers,
    plain values and ``argparse.Namespace``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(
                f"{path} holds objects weights_only loading refuses (only tensors, plain values "
                f"and argparse.Namespace are allowed): {e}"
            ) from e


def model_state(checkpoint: dict[str, Any], prefer_ema: bool | None = None) -> dict[str, Tensor]:
    """The model weights of a loaded checkpoint.

    A reference checkpoint (``model`` key) gives ``model`` or, when ``prefer_ema`` is true or
    ``None`` and the checkpoint says ``ema_best``, ``model_ema``. Plain state dicts and the
    ``state_dict`` / ``module`` wrappers of other tools are accepted as they are.
    """
    for key in ("model", "state_dict", "module"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            use_ema = checkpoint.get("ema_best", False) if prefer_ema is None else prefer_ema
            if key == "model" and use_ema and checkpoint.get("model_ema"):
                return checkpoint["model_ema"]
            return checkpoint[key]
    return checkpoint


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
