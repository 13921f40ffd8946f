"""mmdet family: token reduction for an ``atc_patch.mmdet.ViTAdapter`` built without it.

The backbone already holds the reduction machinery (it is driven by its config keys ``method``,
``linkage``, ``reduction_loc``, ``reduction_ratio``, ``proportional_attn``); patching sets those
keys on a built model, and removing restores the ones it was built with. A detector whose
``backbone`` is a ViTAdapter is patched through its backbone.

    atc_patch.apply_patch(backbone, method="atc", linkage="single", reduction_ratio=0.25)
    atc_patch.apply_patch(detector, method="tome", reduction_ratio=0.7, reduction_loc=[3, 6, 9])
"""

from __future__ import annotations

import sys
from typing import Any

from .._validate import CROSS_FAMILY_HINTS, check_options
from ._common import PatchInfo, clear_patch_info, get_patch_info, set_patch_info

FAMILY = "mmdet"
_ORIG_ATTR = "_atc_mmdet_orig"

# The ViT patches' options, brought to a ViTAdapter: what to pass instead.
HINTS = {
    **CROSS_FAMILY_HINTS["vit"],
    "keep_rate": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept at each "
    "reduction_loc), not keep_rate",
    "r": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept at each "
    "reduction_loc), not r",
    "r_schedule": "a ViTAdapter reduces at reduction_loc by reduction_ratio",
    "prop_attn": "a ViTAdapter's option is proportional_attn",
    "trace_source": "a ViTAdapter has no trace_source; its features are unmerged to the grid",
}


def _backbone(model: Any) -> Any | None:
    """The ViTAdapter ``model`` is or holds as ``model.backbone``, else ``None``."""
    module = sys.modules.get("atc_patch.mmdet.vit_adapter")
    if module is None:  # the backbone class was never imported, so no instance exists
        return None
    for candidate in (model, getattr(model, "backbone", None)):
        if isinstance(candidate, module.ViTAdapter):
            return candidate
    return None


def matches(model: Any) -> bool:
    return _backbone(model) is not None


def apply(model: Any, method: str = "atc", **options: Any) -> PatchInfo:
    """Set the backbone's token reduction.

    Options: ``reduction_ratio`` (required, fraction of current tokens kept at each location),
    ``reduction_loc`` (default ``[3, 6, 9]``, a single int is one location), ``linkage`` (ATC
    only, default ``"average"``), ``proportional_attn`` (default ``True``), ``keep_rate_mode``
    (``"target"``, default, or ``"reference"``). ``patch_settings`` reports the values in use.

    Raises:
        ValueError: for unknown options (listing the valid ones, with the ViT options'
            equivalents) and bad values (naming the valid choices).
    """
    from atc_patch.mmdet.reduction import REDUCTION_KEYS

    check_options("a ViTAdapter", options, REDUCTION_KEYS, hints=HINTS)
    if method is None:
        raise ValueError(
            "apply_patch needs a method for a ViTAdapter, one of ('atc', 'tome'); "
            "atc_patch.remove_patch(model) turns the reduction off"
        )
    backbone = _backbone(model)
    original = backbone.reduction_settings()
    settings = dict(reduction_loc=[3, 6, 9], proportional_attn=True) | options
    backbone.configure_reduction(method=method, **settings)  # validates (ValueError)
    object.__setattr__(model, _ORIG_ATTR, original)
    info = PatchInfo(FAMILY, method, backbone.reduction.settings())
    set_patch_info(model, info)
    return info


def remove(model: Any) -> None:
    """Restore the reduction settings the backbone had before :func:`apply`."""
    if get_patch_info(model) is None:
        return
    original = vars(model).get(_ORIG_ATTR)
    if original is not None:
        _backbone(model).configure_reduction(**original)
        object.__delattr__(model, _ORIG_ATTR)
    clear_patch_info(model)
