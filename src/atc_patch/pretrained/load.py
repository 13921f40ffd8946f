"""A released (or :func:`atc_patch.save_pretrained`) DeiT checkpoint as a patched timm model::

    model = atc_patch.load_pretrained("joakimbh/atc_small-im1k-complete", keep_rate=0.7)

The file is found by :func:`~atc_patch.pretrained.resolve`, read by the weights-only
:func:`~atc_patch.pretrained.load_checkpoint`, the DeiT is rebuilt from its tensors
(:mod:`~atc_patch.pretrained.deit`) and reduced as :func:`checkpoint_settings` reads.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .._validate import check_options
from ..patch import apply_patch
from ..patch.config import HINTS
from .deit import build_deit, check_state_dict, eval_pretrained_cfg
from .hub import resolve
from .safe_load import load_checkpoint, select_state_dict
from .settings import (
    PATCH_OPTIONS,
    checkpoint_settings,
    dataset_of,
    is_reference,
    merge_settings,
)


def load_pretrained(
    source: str | os.PathLike,
    *,
    ema: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    **overrides: Any,
) -> nn.Module:
    """A released (or :func:`atc_patch.save_pretrained`) DeiT checkpoint as a patched timm
    model.

    Args:
        source: local file, hub file URL, ``"<owner>/<repo>/<file>"``, or a release repository
            with ``keep_rate`` choosing its file (see :func:`atc_patch.pretrained.resolve`).
        ema: ``None`` loads the EMA weights when the file's ``ema_best`` is set, else the
            standard ones; ``True``/``False`` forces one.
        revision: ``huggingface_hub`` download option: the hub revision (branch, tag, commit).
        cache_dir: ``huggingface_hub`` download option: the cache folder.
        token: ``huggingface_hub`` download option: the access token.
        **overrides: change the reduction the file was trained with: ``method`` (``"atc"``,
            ``"tome"``, ``"kmedoids"``, ``"dpcknn"`` or ``None`` for the unpatched DeiT),
            ``linkage``, ``keep_rate``, ``reduction_loc``, ``prop_attn`` (alias
            ``proportional_attn``), ``r``, ``r_schedule``, ``trace_source``. With a release
            repository as ``source``, ``keep_rate`` also picks the file.

    Returns:
        The timm ``VisionTransformer`` (DeiT of the file's size, head of the file's classes)
        in eval mode, patched in place. ``model.pretrained_cfg`` holds the source and the
        reference evaluation transform (see :func:`atc_patch.pretrained.eval_pretrained_cfg`).

    Raises:
        ValueError: unknown override names or values, settings the file does not encode,
            weights of another model than a timm DeiT (named).
        FileNotFoundError: see :func:`atc_patch.pretrained.resolve`.
        UnsafeCheckpointError: see :func:`atc_patch.pretrained.load_checkpoint`.
    """
    check_options("load_pretrained", overrides, PATCH_OPTIONS, HINTS["vit"])
    found = resolve(
        source,
        keep_rate=overrides.get("keep_rate"),
        revision=revision,
        cache_dir=cache_dir,
        token=token,
    )
    checkpoint = load_checkpoint(found.path)
    weights, used_ema = select_state_dict(checkpoint, ema)
    arch = check_state_dict(weights)
    try:
        file_settings = checkpoint_settings(checkpoint, found.filename)
    except ValueError:
        if "method" not in overrides:
            raise
        file_settings = {}
    reference = is_reference(checkpoint, file_settings)
    settings = merge_settings(file_settings, overrides, arch.num_patches, reference)

    model = build_deit(arch, weights)
    method = settings.pop("method", None)
    if method is not None:
        apply_patch(model, method=method, **settings)
    dataset = dataset_of(checkpoint, found.filename)
    cfg = dict(eval_pretrained_cfg(dataset, arch.num_classes, arch.img_size))
    cfg.update(architecture=arch.timm_name, file=found.path, ema=used_ema)
    if found.repo_id is not None:
        cfg.update(hf_hub_id=found.repo_id, hf_hub_filename=found.filename)
    model.pretrained_cfg = cfg
    return model
