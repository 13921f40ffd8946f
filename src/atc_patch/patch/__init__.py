"""``apply_patch`` / ``remove_patch``: one entry point, dispatched by model family.

Each family lives in its own module (``timm``, ``torchvision``, ``diffusers``, ``mmdet``) and
exposes three functions:

* ``matches(model) -> bool``: is this a model the family patches? Must not import the
  third-party library unless it is already imported (a model of that library can only exist
  if it is).
* ``apply(model, method, **options) -> PatchInfo``: patch in place.
* ``remove(model) -> None``: restore the original classes/forwards exactly.
* optionally ``find_patch_info(model) -> PatchInfo | None``: the record of the part of
  ``model`` the family patched (a pipeline's UNet), when it is not on ``model`` itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ._common import PatchInfo, get_patch_info

FAMILIES = ("timm", "torchvision", "diffusers", "dit", "mmdet", "transformers")

SUPPORTED = (
    "timm VisionTransformer (and subclasses: DeiT, distilled DeiT, MAE-style, registers), "
    "torchvision VisionTransformer, diffusers UNet2DConditionModel or a pipeline holding one "
    "(SD 1.x/2.x/XL), diffusers FluxTransformer2DModel, SD3Transformer2DModel, "
    "PixArtTransformer2DModel, DiTTransformer2DModel or a pipeline holding one, "
    "atc_patch.mmdet ViTAdapter, "
    "transformers ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel, "
    "SiglipVisionModel and their task models (...ForImageClassification, "
    "DeiTForImageClassificationWithTeacher, CLIPModel, CLIPVisionModelWithProjection, SiglipModel)"
)


def _family(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def _find_family(model: Any) -> ModuleType:
    for name in FAMILIES:
        try:
            fam = _family(name)
        except ImportError:  # the family's library is not installed: its models cannot exist
            continue
        if fam.matches(model):
            return fam
    raise TypeError(
        f"atc_patch cannot patch a {type(model).__module__}.{type(model).__qualname__}; "
        f"supported: {SUPPORTED}"
    )


def apply_patch(model: Any, method: str = "atc", **options: Any) -> Any:
    """Patch ``model`` in place for token reduction and return it (the same object).

    A model that is already patched is un-patched first, so calling this again changes the
    settings. Parameters, buffers and ``state_dict`` are untouched.

    Args:
        model: a supported model (see ``SUPPORTED``): a timm or torchvision ViT, a transformers
            vision encoder or its task model, a diffusers UNet or diffusion transformer or a
            pipeline holding one, an ``atc_patch.mmdet`` ViTAdapter or a detector holding one.
        method: a kernel method: ``"atc"``, ``"tome"``, ``"tome_sd"`` (diffusion models),
            ``"kmedoids"`` or ``"dpcknn"``.
        **options: the family's settings: ``r``, ``r_schedule``, ``keep_rate``,
            ``reduction_loc``, ``linkage``, ``prop_attn``, ``trace_source`` ... for ViT-like
            encoders; ``ratio``, ``linkage``, ``sx``, ``sy``, ``seed`` ... for diffusion models
            (see each family's guide).

    Returns:
        ``model`` itself, patched.

    Raises:
        TypeError: ``model`` is not a supported model (the message lists what is).
        ValueError: an unknown option (the message lists the valid ones and the family's
            equivalent of another family's option), a bad value, or settings that reduce
            nothing where that cannot be meant.
    """
    fam = _find_family(model)
    if _patch_info(model) is not None:
        remove_patch(model)
    fam.apply(model, method=method, **options)
    return model


def _patch_info(model: Any) -> PatchInfo | None:
    """``model``'s patch record, or that of the part of it its family patched (``pipe.unet``)."""
    info = get_patch_info(model)
    if info is None:
        try:
            fam = _find_family(model)
        except TypeError:
            return None
        find = getattr(fam, "find_patch_info", None)
        info = None if find is None else find(model)
    return info


def remove_patch(model: Any) -> Any:
    """Undo :func:`apply_patch` exactly; a model that is not patched is returned unchanged.

    Args:
        model: a model patched by :func:`apply_patch`, or the pipeline/detector/task model
            holding the part that was patched (either one may be given).

    Returns:
        ``model`` itself, with its original classes and forwards (bit-identical outputs).
    """
    info = _patch_info(model)
    if info is None:
        return model
    _family(info.family).remove(model)
    return model


def patch_settings(model: Any) -> dict[str, Any] | None:
    """The settings ``model`` was patched with, or ``None`` if it is not patched.

    Args:
        model: a patched model, or the pipeline/detector/task model holding the patched part.

    Returns:
        A new dict: every option with the value actually used (defaults filled in), plus
        ``"method"`` and ``"family"``; or ``None``.
    """
    info = _patch_info(model)
    return None if info is None else dict(info.settings, method=info.method, family=info.family)


__all__ = ["apply_patch", "remove_patch", "patch_settings", "PatchInfo"]
