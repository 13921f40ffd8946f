"""The ViT-Adapter family: token reduction in an ``atc_patch.mmdet.ViTAdapter`` built without it
(or with other settings), or in the detector holding one as ``.backbone``.

The backbone has the reduction machinery built in (its mmdet config keys ``method``,
``reduction_ratio``, ``reduction_loc``, ...; :mod:`atc_patch.mmdet.reduction`). Patching
overrides, on the backbone instance, the reduction its forward uses (``active_reduction``) and
the keys it reports (``reduction_settings``), from an :class:`~atc_patch.AdapterConfig`;
removing gives back the ones it was built with::

    apply_patch(detector, "atc", linkage="single", reduction_ratio=0.7, reduction_loc=(3, 6, 9))
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ._override import override, restore_tree
from .config import AdapterConfig

NAME = "vit_adapter"
CONFIG = AdapterConfig
WHAT = "a ViTAdapter"


def root_of(model: Any) -> nn.Module | None:
    """The ViTAdapter ``model`` is or holds as ``model.backbone``, else ``None``."""
    module = sys.modules.get("atc_patch.mmdet.vit_adapter")
    if module is None:  # the backbone class was never imported, so no instance exists
        return None
    for candidate in (model, getattr(model, "backbone", None)):
        if isinstance(candidate, module.ViTAdapter):
            return candidate
    return None


def apply(root: nn.Module, config: AdapterConfig) -> dict[str, Any]:
    """Make the backbone ``root`` reduce as ``config`` says (checked against its depth first)."""
    from ..mmdet.reduction import Reduction

    config.check_depth(root.depth)
    reduction = Reduction.from_config(config)
    override(root, "active_reduction", _active_reduction, reduction)
    override(root, "reduction_settings", _reduction_settings, reduction)
    return {}


def remove(root: nn.Module) -> None:
    """Undo :func:`apply` (also a partial one): the backbone's own reduction is back."""
    restore_tree(root)


def _active_reduction(backbone: nn.Module, reduction: Any) -> Any:
    return reduction


def _reduction_settings(backbone: nn.Module, reduction: Any) -> dict[str, Any]:
    return {"method": reduction.method, **reduction.settings()}
