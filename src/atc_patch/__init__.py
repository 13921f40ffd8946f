"""atc_patch: token reduction by Agglomerative Token Clustering, as one-line model patches.

import atc_patch
atc_patch.apply_patch(model, method="atc", linkage="average", r=16)
atc_patch.remove_patch(model)

plan = atc_patch.cluster_tokens(metric, r=8, method="atc", linkage="average", protected=1)
x, size = plan.merge_wavg(x, size)
"""

from .kernel import LINKAGES, METHODS, cluster_tokens
from .kernel.plan import MergePlan
from .kernel.scratch import release_workspace, set_workspace_limits
from .kernel.threads import set_kernel_threads
from .patch import (
    AdapterConfig,
    DiffusionConfig,
    ViTConfig,
    apply_patch,
    patch_config,
    patch_settings,
    remove_patch,
)
from .patch.vit import last_source
from .pretrained import load_pretrained, save_pretrained
from .schedule import Schedule, make_schedule

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "DiffusionConfig",
    "LINKAGES",
    "METHODS",
    "MergePlan",
    "Schedule",
    "apply_patch",
    "cluster_tokens",
    "last_source",
    "load_pretrained",
    "make_schedule",
    "patch_config",
    "patch_settings",
    "release_workspace",
    "remove_patch",
    "save_pretrained",
    "set_kernel_threads",
    "set_workspace_limits",
    "ViTConfig",
]
