"""The one checkpoint reader of atc_patch: weights-only, with an explicit allow-list.

Every way a checkpoint enters (``load_pretrained``, the timm registry's ``pretrained=True``,
the training scripts' ``--finetune`` / ``--resume`` / ``--teacher-path``, mmengine's
``atc://``) goes through :func:`load_checkpoint`. A ``.safetensors`` file is read by
safetensors (tensors only); any other file by ``torch.load(weights_only=True)`` allowing only
:data:`SAFE_GLOBALS`, so a pickled function or class is refused before anything of it runs::

    checkpoint = load_checkpoint("joakimbh/atc_small-im1k-complete/atc_small-im1k-07-complete.pth")
    weights, is_ema = select_state_dict(checkpoint)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from .._validate import as_bool
from .hub import resolve

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""The only non-tensor classes a checkpoint may hold (the reference saves its ``args``)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a pickled object outside :data:`SAFE_GLOBALS` (it was not loaded)."""


def allow_safe_globals() -> contextlib.AbstractContextManager:
    """Context in which ``torch.load(weights_only=True)`` also accepts :data:`SAFE_GLOBALS`.

    Raises:
        RuntimeError: torch older than 2.4 (no allow-list for weights-only loading).
    """
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        return torch.serialization.safe_globals(list(SAFE_GLOBALS))
    if hasattr(torch.serialization, "add_safe_globals"):  # torch 2.4: process-wide
        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
        return contextlib.nullcontext()
    raise RuntimeError(
        f"loading checkpoints that hold {[t.__qualname__ for t in SAFE_GLOBALS]} weights-only "
        f"needs torch >= 2.4 (this is {torch.__version__})"
    )


def load_checkpoint(
    source: str | os.PathLike,
    *,
    any_url: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Any:
    """Read a checkpoint on the CPU, weights-only.

    Args:
        source: a local file, or anything :func:`atc_patch.pretrained.resolve` finds (hub id,
            hub file URL; with ``any_url`` any web URL, cached by ``torch.hub``).
        any_url: also accept any web URL (see :func:`atc_patch.pretrained.resolve`).
        revision: ``huggingface_hub`` download option: the hub revision.
        cache_dir: ``huggingface_hub`` download option: the cache folder.
        token: ``huggingface_hub`` download option: the access token.

    Returns:
        What was saved: a dict of tensors, plain values and :data:`SAFE_GLOBALS` objects.

    Raises:
        UnsafeCheckpointError: the file pickles another class or function (nothing of it is
            executed). The message names it; if you trust the file, allow-list that class with
            ``torch.serialization.add_safe_globals([...])`` and call again.
        FileNotFoundError, ValueError: see :func:`atc_patch.pretrained.resolve`.
    """
    path = resolve(
        source, any_url=any_url, revision=revision, cache_dir=cache_dir, token=token
    ).path
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    with allow_safe_globals():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = found[1] if found else "an object torch's weights-only loader refuses"
            allowed = [f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS]
            raise UnsafeCheckpointError(
                f"refused to load {os.fspath(source)}: it pickles {what}, which is not allowed. "
                f"atc_patch reads checkpoints with torch.load(weights_only=True) allowing only "
                f"tensors, plain containers and {allowed}. If you trust this file, allow the "
                f"class with torch.serialization.add_safe_globals([{what.rsplit('.', 1)[-1]}]) "
                "and load it again"
            ) from None


def select_state_dict(checkpoint: Any, ema: bool | None = None) -> tuple[dict, bool]:
    """The model weights of a checkpoint and whether they are the EMA weights.

    Args:
        checkpoint: the reference layout (``model``, ``model_ema``, ``ema_best``), a dict with
            ``state_dict`` or ``module``, or a bare state dict.
        ema: ``None`` follows ``ema_best``; ``True``/``False`` forces the EMA/standard weights.

    Raises:
        ValueError: EMA weights asked for but absent, or no state dict found.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    if ema is not None:
        ema = as_bool("ema", ema)
    if "model" in checkpoint:
        use_ema = bool(checkpoint.get("ema_best", False)) if ema is None else ema
        if use_ema:
            weights = checkpoint.get("model_ema")
            if not isinstance(weights, Mapping) or not weights:
                raise ValueError("ema=True but the checkpoint holds no EMA weights ('model_ema')")
            return dict(weights), True
        return dict(checkpoint["model"]), False
    if ema:
        raise ValueError("ema=True but the checkpoint holds no EMA weights ('model_ema')")
    wrapped = (checkpoint.get(k) for k in ("state_dict", "module"))
    weights = next((w for w in wrapped if isinstance(w, Mapping)), checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(
            "no state dict found: expected 'model' / 'model_ema' (the ATC reference layout), "
            f"'state_dict', 'module', or tensors; keys: {sorted(checkpoint)[:10]}"
        )
    return dict(weights), False
