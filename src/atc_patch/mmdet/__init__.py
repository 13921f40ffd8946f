"""ViT-Adapter backbones with ATC / ToMe token reduction for mmdet 3 (mmengine, mmcv 2.x).

Importing this package registers :class:`ViTAdapter` in mmdet's ``MODELS`` registry, so a config
needs only::

    custom_imports = dict(imports=["atc_patch.mmdet"], allow_failed_imports=False)
    model = dict(backbone=dict(type="ViTAdapter", method="atc", linkage="average",
                               reduction_loc=[3, 6, 9], reduction_ratio=0.7, ...))

Released checkpoints load through mmengine's ``atc://`` scheme (:mod:`.checkpoint`), e.g.
``load_from = "atc://joakimbh/atc_tiny-coco17-average/atc_tiny-coco17-07-average.pth"``.

Packaged Mask R-CNN configs: :func:`config_path` (``"vit-adapter-t-3x"``,
``"tomeatc-adapter-t-0.5x-ftune"``, ... see :data:`CONFIGS`).
"""

from __future__ import annotations

from pathlib import Path

from mmdet.registry import MODELS

from . import checkpoint  # registers the atc:// checkpoint scheme with mmengine
from .reduction import METHODS, Reduction, TokenGrid, expected_token_counts, make_reduction
from .vit_adapter import ViTAdapter

MODELS.register_module(name="ViTAdapter", module=ViTAdapter, force=True)

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIGS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_")))


def config_path(name: str) -> str:
    """Path of a packaged config, e.g. ``config_path("tomeatc-adapter-t-0.5x-ftune")``."""
    path = CONFIG_DIR / f"{name.removesuffix('.py')}.py"
    if not path.is_file():
        raise ValueError(f"no packaged config {name!r}; choose one of {CONFIGS}")
    return str(path)


__all__ = [
    "CONFIGS",
    "checkpoint",
    "CONFIG_DIR",
    "METHODS",
    "Reduction",
    "TokenGrid",
    "ViTAdapter",
    "config_path",
    "expected_token_counts",
    "make_reduction",
]
