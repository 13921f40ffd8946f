"""Writing checkpoints in the reference ``best_checkpoint.pth`` layout.

:func:`write_checkpoint` writes any model (the training recipes' ``checkpoint.pth``);
:func:`save_pretrained` writes only what :func:`atc_patch.load_pretrained` reads back, and
refuses anything else at save time with the reason::

    atc_patch.save_pretrained(model, "out/best_checkpoint.pth", model_ema=ema, ema_best=True)
    model = atc_patch.load_pretrained("out/best_checkpoint.pth")
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._validate import as_bool
from ..patch import patch_settings
from .deit import check_state_dict
from .releases import DATASETS, REFERENCE_DATASET_NAMES, SIZES
from .settings import saved_settings


def _unwrap(model: Any) -> Any:
    """The plain module behind DDP/DataParallel, timm EMA wrappers and ``torch.compile``."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _state_dict(obj: Any, what: str) -> dict[str, torch.Tensor] | None:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return {k: v.detach().cpu() for k, v in obj.items()}
    obj = _unwrap(obj)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{what} must be a module, a timm ModelEma*, or a state dict, got {obj!r}")
    return {k: v.detach().cpu() for k, v in obj.state_dict().items()}


def _plain(value: Any) -> Any:
    """``value`` with only plain types, so ``weights_only`` loading accepts it (paths and other
    objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def write_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    model_ema: Any = None,
    ema_best: bool = False,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    **extra: Any,
) -> Path:
    """Write ``model`` (any module or state dict) in the reference layout.

    The file is a dict ``{"model", "model_ema", "ema_best", **extra, "args"}``: state dicts on
    the CPU, and ``args`` an ``argparse.Namespace`` of plain values (paths and other objects
    become strings, so the file loads weights-only) with the reference fields (``model``,
    ``input_size``, ``num_classes``, ``dataset``, ``reduction_ratio``, ``reduction_loc``,
    ``linkage``, ``proportional_attn``) filled from the model's patch settings, plus
    ``atc_patch`` (those settings exactly, preferred when loading). It is written to a
    temporary file first and renamed, so an interrupted save never leaves half a checkpoint.

    Args: see :func:`save_pretrained`.

    Returns:
        The path written.

    Raises:
        ValueError: ``dataset`` not a release dataset, or ``ema_best=True`` without
            ``model_ema``.
    """
    ema_best = as_bool("ema_best", ema_best)
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    net = _unwrap(model)
    weights = _state_dict(net, "model")
    ema_weights = _state_dict(model_ema, "model_ema")
    if ema_best and ema_weights is None:
        raise ValueError("ema_best=True needs the EMA weights (model_ema=...)")

    fields = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    ns = argparse.Namespace(**{str(k): _plain(v) for k, v in fields.items()})
    if isinstance(net, nn.Module):
        _add_reference_fields(ns, net, dataset)
    checkpoint = {
        "model": weights,
        "model_ema": ema_weights,
        "ema_best": ema_best,
        **extra,
        "args": ns,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)
    return out


def save_pretrained(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    model_ema: Any = None,
    ema_best: bool = False,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    **extra: Any,
) -> Path:
    """Write a timm DeiT as the reference ``best_checkpoint.pth``, loadable by
    :func:`atc_patch.load_pretrained` (and by the reference ``validate_deit.py``).

    Args:
        model: a timm DeiT (``deit_*`` / ``atc_*`` / ``tome_*``, distilled or not, any image size
            and number of classes), patched or not (DDP / compiled wrappers are unwrapped); or
            its bare state dict (then ``args`` is written as given, without derived fields).
        path: the ``.pth`` file to write (parent folders are created).
        model_ema: the EMA model (a module, a timm ``ModelEmaV2``/``V3`` or a state dict).
        ema_best: the EMA weights scored best (:func:`atc_patch.load_pretrained` then loads
            them).
        args: the run's arguments (a ``Namespace`` or dict of plain values); the reference
            fields are added where missing.
        dataset: ``"im1k"``, ``"nab"``, ``"coco"`` or ``"nus"`` (sets ``args.dataset`` in the
            reference spelling when ``args`` has none).
        **extra: more entries of plain values and tensors (``epoch``, ``optimizer`` state, ...).

    Returns:
        The path written (see :func:`write_checkpoint` for the layout).

    Raises:
        ValueError: a model :func:`atc_patch.load_pretrained` could not rebuild (a transformers
            model, register tokens, ``global_pool='avg'``, DeiT-III's layer scale, another
            width or depth: the message says which), ``dataset`` not one of the above, or
            ``ema_best=True`` without ``model_ema``. Nothing is written then.
    """
    for what, obj in (("model", model), ("model_ema", model_ema)):
        weights = _state_dict(obj, what)
        if weights is not None:
            try:
                check_state_dict(weights)
            except ValueError as e:
                raise ValueError(
                    f"not saved: load_pretrained could not read this {what} "
                    f"({type(_unwrap(obj)).__name__}) back: {e}. write_checkpoint writes any "
                    "model in the same layout (for training checkpoints)"
                ) from None
    return write_checkpoint(
        model, path, model_ema=model_ema, ema_best=ema_best, args=args, dataset=dataset, **extra
    )


def _add_reference_fields(ns: argparse.Namespace, net: nn.Module, dataset: str | None) -> None:
    """Fill the reference ``args`` fields ``ns`` lacks from ``net`` and its patch settings."""
    ours = saved_settings(patch_settings(net))
    size = next((n for n, (d, _) in SIZES.items() if d == getattr(net, "embed_dim", None)), None)
    defaults = {
        "model": f"{ours['method'] or 'deit'}_{size or 'custom'}_patch16_224",
        "input_size": int(net.patch_embed.img_size[0]) if hasattr(net, "patch_embed") else 224,
        "num_classes": int(getattr(net, "num_classes", 0)),
        "reduction_loc": list(ours.get("reduction_loc") or []),
        "reduction_ratio": [ours["keep_rate"]] if ours.get("keep_rate") is not None else [],
        "linkage": ours.get("linkage") or "average",
        "proportional_attn": bool(ours.get("prop_attn", True)),
        "atc_patch": ours,
    }
    if dataset is not None:
        defaults["dataset"] = REFERENCE_DATASET_NAMES[dataset]
    for key, value in defaults.items():
        if not hasattr(ns, key):
            setattr(ns, key, value)
