"""Fine-tuning and evaluation pieces for the ATC paper's recipes.

Install with ``pip install 'atc-patch[train]'``. Each module is imported on first use, so
:mod:`atc_patch.train.fid` (numpy only) needs none of the extra's packages:

* :mod:`~atc_patch.train.datasets`: ImageNet (ImageFolder), NABirds, COCO 2014 and NUS-WIDE in
  their official layouts (:func:`build_dataset`).
* :mod:`~atc_patch.train.metrics`: multi-label mean average precision.
* :mod:`~atc_patch.train.fid`: the Fréchet distance of FID.
* :mod:`~atc_patch.train.checkpoint`: checkpoints in the reference layout, read weights-only;
  ``--finetune`` loading (head drop, ``pos_embed`` resampling).
* :mod:`~atc_patch.train.models`: the scripts' model names (``atc_small_patch16_224`` ... are
  the timm registry entries of :mod:`atc_patch.pretrained.timm_models`).
* :mod:`~atc_patch.train.engine` / :mod:`~atc_patch.train.recipe`: the training loop on timm's
  optimizers, schedulers, losses, EMA and AMP, single process or DDP under ``torchrun``.

Example::

    from atc_patch.train import build_dataset, resolve_model
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "checkpoint": (
        "CHECKPOINT_KEYS",
        "load_checkpoint",
        "load_finetune_weights",
        "save_checkpoint",
    ),
    "datasets": (
        "DATASETS",
        "CocoMultiLabel",
        "LayoutError",
        "NABirds",
        "NUSWide",
        "build_dataset",
    ),
    "metrics": ("average_precision", "mean_average_precision"),
    "models": ("REFERENCE_NAMES", "ModelSpec", "resolve_model"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
