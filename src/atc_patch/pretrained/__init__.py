"""The ATC paper's released checkpoints (and our own), loaded and saved in one call.

One module per concern, each usable alone:

* :mod:`~atc_patch.pretrained.releases`: the table of released files (repositories, file names,
  rate codes);
* :mod:`~atc_patch.pretrained.hub`: finding a file (local, Hugging Face hub, web URL);
* :mod:`~atc_patch.pretrained.safe_load`: the one weights-only checkpoint reader and its
  allow-list;
* :mod:`~atc_patch.pretrained.settings`: the reduction a checkpoint was trained with, and the
  option aliases;
* :mod:`~atc_patch.pretrained.deit`: the timm DeiT a state dict belongs to;
* :func:`load_pretrained` / :func:`save_pretrained` on top; the timm registry entries
  (``atc_*`` / ``tome_*``) in :mod:`atc_patch.pretrained.timm_models`, imported on demand.

Example::

    model = atc_patch.load_pretrained("joakimbh/atc_small-im1k-complete", keep_rate=0.7)
    atc_patch.save_pretrained(model, "out/best_checkpoint.pth")
"""

from .deit import Architecture, check_state_dict, eval_pretrained_cfg, infer_architecture
from .hub import ResolvedFile, resolve
from .load import load_pretrained
from .releases import (
    DATASETS,
    DETECTION_SIZES,
    KEEP_RATES,
    REDUCTION_LOC,
    RELEASE_LINKAGES,
    SIZES,
    Release,
    check_detection_release,
    parse_filename,
    rate_code,
    release_filename,
    release_repo,
    released_checkpoints,
)
from .safe_load import (
    SAFE_GLOBALS,
    UnsafeCheckpointError,
    allow_safe_globals,
    load_checkpoint,
    select_state_dict,
)
from .save import save_pretrained, write_checkpoint
from .settings import PATCH_OPTIONS, checkpoint_settings, kept_tokens_to_r, resolve_aliases

__all__ = [
    "DATASETS",
    "DETECTION_SIZES",
    "KEEP_RATES",
    "PATCH_OPTIONS",
    "REDUCTION_LOC",
    "RELEASE_LINKAGES",
    "SAFE_GLOBALS",
    "SIZES",
    "Architecture",
    "Release",
    "ResolvedFile",
    "UnsafeCheckpointError",
    "allow_safe_globals",
    "check_detection_release",
    "check_state_dict",
    "checkpoint_settings",
    "eval_pretrained_cfg",
    "infer_architecture",
    "kept_tokens_to_r",
    "load_checkpoint",
    "load_pretrained",
    "parse_filename",
    "rate_code",
    "release_filename",
    "release_repo",
    "released_checkpoints",
    "resolve",
    "resolve_aliases",
    "save_pretrained",
    "select_state_dict",
    "write_checkpoint",
]
