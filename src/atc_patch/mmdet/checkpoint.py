"""The ATC paper's ViT-Adapter Mask R-CNN checkpoints, loaded into :class:`ViTAdapter` detectors.

Importing :mod:`atc_patch.mmdet` registers the checkpoint scheme ``atc://`` with mmengine: it
takes what :func:`atc_patch.pretrained.load_checkpoint` takes (a local path, a hub file URL,
``<owner>/<repo>/<file>``), reads the file weights-only and renames the reference
``ToMeATCViTAdapter`` keys to ours (:data:`RENAMES`, :data:`REFERENCE_ONLY`; the table is in
docs/pretrained.md)::

    load_from = "atc://joakimbh/atc_tiny-coco17-average/atc_tiny-coco17-07-average.pth"
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from mmengine.runner import CheckpointLoader

from ..pretrained import (
    REDUCTION_LOC,
    check_detection_release,
    load_checkpoint,
    release_filename,
    release_repo,
    select_state_dict,
)

SCHEME = "atc://"

REFERENCE_ONLY = ("cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias")
"""Reference backbone keys without a counterpart in :class:`ViTAdapter` (unused there too)."""

RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(interactions\.\d+\.(?:extractor|extra_extractors\.\d+)\.ffn\.dwconv)\.dwconv\."),
     r"\1."),
)  # fmt: skip
"""``(pattern, replacement)`` applied to backbone keys (without the ``backbone.`` prefix)."""


def convert_backbone_key(key: str) -> str | None:
    """Our name for a reference backbone key, ``None`` for a key without a counterpart."""
    if key in REFERENCE_ONLY:
        return None
    for pattern, repl in RENAMES:
        key = pattern.sub(repl, key)
    return key


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone."
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename reference ViT-Adapter keys under ``prefix`` to ours; other keys pass unchanged.

    Args:
        state_dict: a detector state dict (``prefix="backbone."``) or a backbone one
            (``prefix=""``).

    Returns:
        ``(converted, dropped)``: the renamed state dict and the keys left out
        (:data:`REFERENCE_ONLY` under ``prefix``).
    """
    out: dict[str, torch.Tensor] = OrderedDict()
    dropped: list[str] = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        new = convert_backbone_key(key[len(prefix) :])
        if new is None:
            dropped.append(key)
        else:
            out[prefix + new] = value
    return out, dropped


def _prefix_of(state_dict: Mapping[str, Any]) -> str:
    return "backbone." if any(k.startswith("backbone.") for k in state_dict) else ""


def load_reference_checkpoint(source: str | os.PathLike, map_location: Any = None) -> dict:
    """A reference ViT-Adapter checkpoint (file, hub file or URL) with our key names.

    Returns:
        ``{"state_dict": converted, "meta": the file's meta (or {})}``, what mmengine's loaders
        expect; tensors on ``map_location`` (CPU by default).

    Raises:
        FileNotFoundError, UnsafeCheckpointError: see :func:`atc_patch.pretrained.load_checkpoint`.
        ValueError: the file holds no state dict.
    """
    checkpoint = load_checkpoint(source)
    weights, _ = select_state_dict(checkpoint)
    converted, _ = convert_reference_state_dict(weights, _prefix_of(weights))
    if map_location is not None:
        converted = OrderedDict((k, v.to(map_location)) for k, v in converted.items())
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, Mapping) else {}
    return {"state_dict": converted, "meta": meta}


def load_from_atc(filename: str, map_location: Any = None) -> dict:
    """mmengine checkpoint loader of the ``atc://`` scheme (see the module docstring)."""
    return load_reference_checkpoint(filename[len(SCHEME) :], map_location)


def checkpoint_uri(method: str, size: str, keep_rate: float, linkage: str | None = None) -> str:
    """``atc://`` address of a released ViT-Adapter detector, e.g.
    ``checkpoint_uri("atc", "tiny", 0.7, "average")``."""
    check_detection_release(method, size, keep_rate, linkage)
    repo = release_repo(method, size, "coco17", linkage)
    return f"{SCHEME}{repo}/{release_filename(method, size, 'coco17', keep_rate, linkage)}"


def release_cfg_options(
    method: str, size: str, keep_rate: float, linkage: str | None = None
) -> dict[str, Any]:
    """``cfg.merge_from_dict`` / ``--cfg-options`` settings that evaluate a released detector
    with the packaged ``tomeatc-adapter-{t,s}-*-ftune`` config: the backbone's reduction and
    ``load_from``."""
    check_detection_release(method, size, keep_rate, linkage)
    return {
        "model.backbone.method": method,
        "model.backbone.linkage": linkage,
        "model.backbone.reduction_loc": list(REDUCTION_LOC),
        "model.backbone.reduction_ratio": float(keep_rate),
        "model.backbone.proportional_attn": True,
        "model.backbone.keep_rate_mode": "reference",
        "load_from": checkpoint_uri(method, size, keep_rate, linkage),
    }


CheckpointLoader.register_scheme(prefixes=SCHEME, loader=load_from_atc, force=True)

__all__ = [
    "REFERENCE_ONLY",
    "RENAMES",
    "SCHEME",
    "checkpoint_uri",
    "convert_backbone_key",
    "convert_reference_state_dict",
    "load_from_atc",
    "load_reference_checkpoint",
    "release_cfg_options",
]
