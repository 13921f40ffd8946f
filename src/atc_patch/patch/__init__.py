"""``apply_patch`` / ``remove_patch`` / ``patch_settings``: one entry point for every family.

The family contract. Each family is a module with:

* ``NAME`` (e.g. ``"timm"``) and ``CONFIG``, its config class (:mod:`.config`);
* ``UNUSED``: ``{option: hint}`` for the config's options this family has no use for;
* ``root_of(model) -> nn.Module | None``: the module the family patches, found from ``model``
  itself or what holds it (a pipeline's ``.unet``, a task model's encoder, a detector's
  backbone); ``None`` if ``model`` is not one of the family's. It must not import the family's
  library unless it is already imported (a model of that library cannot exist otherwise);
* ``apply(root, config) -> dict``: validate everything that depends on the model, then patch
  ``root`` in place (through :mod:`._override`, so every module keeps its class); returns
  the details reported beside the config (e.g. ``{"num_blocks": 4}``), or a
  :class:`~.config.PatchInfo` when it keeps per-patch state;
* ``remove(root)``: undo ``apply`` exactly, including a partial ``apply`` that raised.

Written once, here: dispatch, config resolution, the record (a :class:`~.config.PatchInfo`
on the root only, so a model and what holds it always agree), a pipeline holding several roots
(every one is patched and unpatched alike) and the rule that a failed ``apply_patch`` leaves
the model exactly as it was::

    apply_patch(pipe, "atc", ratio=0.5)      # records on pipe.unet
    patch_settings(pipe.unet)                # the same record, through either object
    remove_patch(pipe)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import nn

from .config import AdapterConfig, DiffusionConfig, PatchConfig, PatchInfo, ViTConfig

# name -> module (relative to this package); matched in this order.
FAMILIES: dict[str, str] = {
    "timm": ".vit.timm",
    "torchvision": ".vit.torchvision",
    "transformers": ".vit.transformers",
    "unet": ".diffusion.unet",
    "dit": ".diffusion.dit",
    "vit_adapter": ".vit_adapter",
}

SUPPORTED = (
    "timm VisionTransformer (and subclasses: DeiT, distilled DeiT, MAE-style, registers), "
    "timm Eva (EVA-02, DINOv3, PE, RoPE-ViT), timm NaFlexVit, "
    "torchvision VisionTransformer, diffusers UNet2DConditionModel or a pipeline holding one "
    "(SD 1.x/2.x/XL), diffusers FluxTransformer2DModel, Flux2Transformer2DModel, "
    "ChromaTransformer2DModel, SD3Transformer2DModel, QwenImageTransformer2DModel, "
    "CogView4Transformer2DModel, HiDreamImageTransformer2DModel, ZImageTransformer2DModel, "
    "PixArtTransformer2DModel, DiTTransformer2DModel, SanaTransformer2DModel, "
    "WanTransformer3DModel, CogVideoXTransformer3DModel, LTXVideoTransformer3DModel, "
    "HunyuanVideoTransformer3DModel or a pipeline holding one, "
    "atc_patch.mmdet ViTAdapter or a detector holding one, "
    "transformers ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel, "
    "SiglipVisionModel, DINOv3ViTModel, Siglip2VisionModel, Aimv2VisionModel and their task "
    "models (...ForImageClassification, DeiTForImageClassificationWithTeacher, CLIPModel, "
    "CLIPVisionModelWithProjection, SiglipModel, Siglip2Model, Aimv2Model)"
)

RECORD_ATTR = "_atc_patch"


def _family(name: str) -> ModuleType:
    return importlib.import_module(FAMILIES[name], __name__)


def find_family(model: Any) -> tuple[ModuleType, nn.Module]:
    """The family that patches ``model`` and the root module it patches.

    Raises:
        TypeError: ``model`` is not a supported model (the message lists what is).
    """
    for name in FAMILIES:
        try:
            fam = _family(name)
        except ImportError:  # the family's library is not installed: its models cannot exist
            continue
        root = fam.root_of(model)
        if root is not None:
            return fam, root
    raise TypeError(
        f"atc_patch cannot patch a {type(model).__module__}.{type(model).__qualname__}; "
        f"supported: {SUPPORTED}"
    )


def find_roots(model: Any) -> tuple[ModuleType, list[nn.Module]]:
    """The family that patches ``model`` and every root it patches there: the one
    :func:`find_family` finds and, when ``model`` holds it in a diffusers pipeline, every other
    component that is a root of the same family (Wan 2.2 A14B's ``transformer_2``, used for the
    low-noise steps), in component order."""
    fam, root = find_family(model)
    roots = [root]
    components = getattr(model, "components", None) if root is not model else None
    for part in (components or {}).values() if isinstance(components, dict) else ():
        if isinstance(part, nn.Module) and all(part is not r for r in roots):
            if fam.root_of(part) is part:
                roots.append(part)
    return fam, roots


def find_patch_info(model: Any) -> PatchInfo | None:
    """The patch record of ``model``, or of the part of it that was patched; ``None`` if none."""
    try:
        _, root = find_family(model)
    except TypeError:
        return None
    return vars(root).get(RECORD_ATTR)


def _config(fam: ModuleType, method: str | None, config: Any, options: dict) -> PatchConfig:
    unused = getattr(fam, "UNUSED", {})
    where = getattr(fam, "WHAT", fam.CONFIG.WHAT)
    if config is None:
        return fam.CONFIG.from_options("atc" if method is None else method, options, where, unused)
    if not isinstance(config, fam.CONFIG):
        raise ValueError(f"{where} takes a {fam.CONFIG.__name__}, got a {type(config).__name__}")
    if options:
        raise ValueError(
            f"give either config= or keyword options, not both (got config and {sorted(options)}); "
            "config.replace(...) makes a changed copy"
        )
    if method is not None and method != config.method:
        raise ValueError(f"method={method!r} disagrees with config.method={config.method!r}")
    config.check_unused(unused, where)
    return config


def _apply(fam: ModuleType, root: nn.Module, config: PatchConfig) -> PatchInfo:
    out = fam.apply(root, config)
    if isinstance(out, PatchInfo):
        return out
    return PatchInfo(fam.NAME, config, dict(out or {}), unused=tuple(getattr(fam, "UNUSED", {})))


def apply_patch(
    model: Any, method: str | None = None, *, config: PatchConfig | None = None, **options: Any
) -> Any:
    """Patch ``model`` in place for token reduction and return it (the same object).

    A model that is already patched is un-patched first, so calling this again changes the
    settings. Classes, parameters, buffers and ``state_dict`` are untouched. If anything
    fails, the model is left exactly as it was (patched with its old settings, if it was).

    Args:
        model: a supported model (see :data:`SUPPORTED`): a timm or torchvision ViT, a
            transformers vision encoder or its task model, a diffusers UNet or diffusion
            transformer or a pipeline holding one, an ``atc_patch.mmdet`` ViTAdapter or a
            detector holding one.
        method: a kernel method: ``"atc"`` (the default), ``"tome"``, ``"tome_sd"``
            (diffusion models), ``"kmedoids"`` or ``"dpcknn"``.
        config: instead of ``method`` and ``options``: a :class:`ViTConfig`,
            :class:`DiffusionConfig` or :class:`AdapterConfig`, whichever the model takes.
        **options: the fields of the model's config class (see its docstring and the
            family's guide); ``None`` means the default.

    Returns:
        ``model`` itself, patched.

    Raises:
        TypeError: ``model`` is not a supported model (the message lists what is).
        ValueError: an unknown option (the message lists the valid ones and the equivalent
            of another kind's option), a bad value, or settings that reduce nothing where that
            cannot be meant.
    """
    fam, roots = find_roots(model)
    cfg = _config(fam, method, config, options)
    done: list[tuple[nn.Module, PatchInfo | None]] = []  # (root, its record before)
    try:
        for root in roots:
            previous = vars(root).get(RECORD_ATTR)
            if previous is not None:
                _unpatch(fam, root)
            done.append((root, previous))
            info = _apply(fam, root, cfg)
            object.__setattr__(root, RECORD_ATTR, info)  # not registered as a submodule
    except BaseException:
        for root, previous in reversed(done):
            _unpatch(fam, root)
            if previous is not None:  # back to the settings it had
                object.__setattr__(root, RECORD_ATTR, _apply(fam, root, previous.config))
        raise
    return model


def _unpatch(fam: ModuleType, root: nn.Module) -> None:
    fam.remove(root)
    vars(root).pop(RECORD_ATTR, None)


def remove_patch(model: Any) -> Any:
    """Undo :func:`apply_patch` exactly; a model that is not patched is returned unchanged.

    Args:
        model: a model patched by :func:`apply_patch`, or what holds the part that was
            patched (a pipeline, detector or task model); either one may be given.

    Returns:
        ``model`` itself, with its original forwards (bit-identical outputs).
    """
    try:
        fam, roots = find_roots(model)
    except TypeError:
        return model
    for root in roots:
        if RECORD_ATTR in vars(root):
            _unpatch(fam, root)
    return model


def patch_settings(model: Any) -> dict[str, Any] | None:
    """The settings ``model`` was patched with, or ``None`` if it is not patched.

    Args:
        model: a patched model, or what holds the patched part.

    Returns:
        A new dict: the config's values in use (defaults filled in) and the family's details,
        plus ``"method"`` and ``"family"``; or ``None``.
    """
    info = find_patch_info(model)
    return None if info is None else dict(info.settings, method=info.method, family=info.family)


def patch_config(model: Any) -> PatchConfig | None:
    """The config ``model`` was patched with (for ``apply_patch(config=...)``), or ``None``."""
    info = find_patch_info(model)
    return None if info is None else info.config


__all__ = [
    "AdapterConfig",
    "DiffusionConfig",
    "PatchConfig",
    "PatchInfo",
    "ViTConfig",
    "apply_patch",
    "find_family",
    "find_patch_info",
    "find_roots",
    "patch_config",
    "patch_settings",
    "remove_patch",
]
