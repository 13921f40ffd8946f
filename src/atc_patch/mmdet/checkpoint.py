"""The ATC paper's ViT-Adapter Mask R-CNN checkpoints, loaded into :class:`ViTAdapter` detectors.

The reference trains ``ToMeATCViTAdapter`` (mmdet 2.x) and releases the detectors on the
Hugging Face hub (``joakimbh/atc_{tiny,small}-coco17-{average,complete,single}`` and
``joakimbh/tome_{tiny,small}-coco17``). Importing :mod:`atc_patch.mmdet` registers the
checkpoint scheme ``atc://`` with mmengine, so the usual mmdet mechanisms read them::

    load_from = "atc://joakimbh/atc_tiny-coco17-average/atc_tiny-coco17-07-average.pth"
    model = dict(backbone=dict(init_cfg=dict(type="Pretrained", prefix="backbone.",
                                             checkpoint="atc:///path/to/local.pth")))

``atc://`` takes what :func:`atc_patch.pretrained.resolve` takes (a local path, a hub file URL,
``<owner>/<repo>/<file>``), downloads through ``huggingface_hub``, reads the file with
``torch.load(weights_only=True)`` and renames the reference keys to ours.

Key mapping (backbone keys; a detector file has them under ``backbone.``; neck, RPN and RoI heads
keep their names between mmdet 2 and 3):

* ``interactions.<i>.extractor.ffn.dwconv.dwconv.{weight,bias}`` (and the same under
  ``interactions.<i>.extra_extractors.<j>.``) -> ``...ffn.dwconv.{weight,bias}``: the reference
  wraps its depth-wise conv in a module of its own;
* ``cls_token``, ``norm.weight``, ``norm.bias``, ``head.weight``, ``head.bias``: no counterpart,
  dropped;
* every other key is the same: ``patch_embed.proj``, ``pos_embed`` (with its class slot),
  ``blocks.<n>.*``, ``level_embed``, ``spm.*``, the injectors' and extractors' norms, ``gamma``,
  ``ffn.fc1/fc2``, ``ffn_norm`` and deformable attention (``sampling_offsets``,
  ``attention_weights``, ``value_proj``, ``output_proj``: mmcv's ``MultiScaleDeformableAttention``
  has the reference ``MSDeformAttn``'s names and layouts), ``up``, ``norm1`` .. ``norm4``.

The dropped keys are the class token, final LayerNorm and 80-class linear head the reference
backbone inherits from timm's ``VisionTransformer``; its forward never uses them.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from mmengine.runner import CheckpointLoader

from .. import pretrained as _pt

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
        FileNotFoundError, UnsafeCheckpointError: see :func:`atc_patch.pretrained.resolve` and
            :func:`atc_patch.pretrained.load_checkpoint`.
        ValueError: the file holds no state dict.
    """
    found = _pt.resolve(source)
    checkpoint = _pt.load_checkpoint(found.path)
    weights, _ = _pt.select_state_dict(checkpoint)
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
    _check_release(method, size, keep_rate, linkage)
    repo = _pt.release_repo(method, size, "coco17", linkage)
    return f"{SCHEME}{repo}/{_pt.release_filename(method, size, 'coco17', keep_rate, linkage)}"


def release_cfg_options(
    method: str, size: str, keep_rate: float, linkage: str | None = None
) -> dict[str, Any]:
    """``cfg.merge_from_dict`` / ``--cfg-options`` settings that evaluate a released detector
    with the packaged ``tomeatc-adapter-{t,s}-*-ftune`` config: the backbone's reduction and
    ``load_from``."""
    _check_release(method, size, keep_rate, linkage)
    return {
        "model.backbone.method": method,
        "model.backbone.linkage": linkage,
        "model.backbone.reduction_loc": list(_pt.REDUCTION_LOC),
        "model.backbone.reduction_ratio": float(keep_rate),
        "model.backbone.proportional_attn": True,
        "model.backbone.keep_rate_mode": "reference",
        "load_from": checkpoint_uri(method, size, keep_rate, linkage),
    }


def _check_release(method: str, size: str, keep_rate: float, linkage: str | None) -> None:
    linkages = _pt.RELEASE_LINKAGES if method == "atc" else (None,)
    if method not in ("atc", "tome"):
        raise ValueError(f"method must be 'atc' or 'tome', got {method!r}")
    if size not in _pt.DETECTION_SIZES:
        raise ValueError(f"size must be one of {list(_pt.DETECTION_SIZES)}, got {size!r}")
    if linkage not in linkages:
        raise ValueError(f"linkage must be one of {list(linkages)} for {method!r}, got {linkage!r}")
    if keep_rate not in _pt.KEEP_RATES:
        raise ValueError(f"keep_rate must be one of {list(_pt.KEEP_RATES)}, got {keep_rate!r}")


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
