"""Fine-tuning and evaluation pieces for the ATC paper's recipes.

Install with ``pip install 'atc-patch[train]'``.

* :mod:`~atc_patch.train.datasets`: ImageNet (ImageFolder), NABirds, COCO 2014 and NUS-WIDE in
  their official layouts (:func:`build_dataset`).
* :mod:`~atc_patch.train.metrics`: multi-label mean average precision.
* :mod:`~atc_patch.train.checkpoint`: checkpoints in the reference layout, written by
  :func:`atc_patch.save_pretrained` and read weights-only by
  :func:`atc_patch.pretrained.load_checkpoint` (so :func:`atc_patch.load_pretrained` loads
  them); ``--finetune`` loading (head drop, ``pos_embed`` resampling).
* :mod:`~atc_patch.train.models`: the scripts' model names (``atc_small_patch16_224`` ... are
  the timm registry entries of :mod:`atc_patch.timm_models`).
* :mod:`~atc_patch.train.engine` / :mod:`~atc_patch.train.recipe`: the training loop on timm's
  optimizers, schedulers, losses, EMA and AMP, single process or DDP under ``torchrun``.
"""

from .checkpoint import CHECKPOINT_KEYS, load_checkpoint, load_finetune_weights, save_checkpoint
from .datasets import DATASETS, CocoMultiLabel, LayoutError, NABirds, NUSWide, build_dataset
from .metrics import average_precision, mean_average_precision
from .models import REFERENCE_NAMES, ModelSpec, resolve_model

__all__ = [
    "CHECKPOINT_KEYS",
    "DATASETS",
    "REFERENCE_NAMES",
    "CocoMultiLabel",
    "LayoutError",
    "ModelSpec",
    "NABirds",
    "NUSWide",
    "average_precision",
    "build_dataset",
    "load_checkpoint",
    "load_finetune_weights",
    "mean_average_precision",
    "resolve_model",
    "save_checkpoint",
]
