"""Typed patch settings: one validated config class per kind of model, and the patch record.

``apply_patch(model, method, **options)`` builds the config of the model's kind from its
keyword options; a config can also be built, printed, compared and passed directly::

    from atc_patch import ViTConfig, DiffusionConfig, apply_patch
    cfg = ViTConfig(method="atc", linkage="average", keep_rate=0.7, reduction_loc=(3, 6, 9))
    apply_patch(vit, config=cfg)              # == apply_patch(vit, "atc", linkage=..., ...)
    apply_patch(pipe, config=DiffusionConfig(method="tome_sd", ratio=0.5))

* :class:`ViTConfig`: ViT-like encoders (timm, torchvision, transformers).
* :class:`DiffusionConfig`: diffusion models (diffusers UNets and diffusion transformers).
* :class:`AdapterConfig`: the mmdet ViT-Adapter backbone.

Every config validates on construction (a ``ValueError`` naming the valid choices); options of
another method or kind are rejected with a hint (:data:`HINTS`), alternative spellings are
resolved once (:data:`ALIASES`). Model-dependent checks (a block index past the last block, an
option the model class has no use for) are made by the family before it touches the model.
"""

from .adapter import AdapterConfig
from .base import ALIASES, HINTS, PatchConfig, PatchInfo
from .diffusion import MERGE_MODES, PLAN_SCOPES, DiffusionConfig
from .vit import SIZE_MODES, ViTConfig

CONFIGS: dict[str, type[PatchConfig]] = {
    c.KIND: c for c in (ViTConfig, DiffusionConfig, AdapterConfig)
}

__all__ = [
    "ALIASES",
    "CONFIGS",
    "HINTS",
    "MERGE_MODES",
    "PLAN_SCOPES",
    "SIZE_MODES",
    "AdapterConfig",
    "DiffusionConfig",
    "PatchConfig",
    "PatchInfo",
    "ViTConfig",
]
