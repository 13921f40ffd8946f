"""One cache of the tiny diffusion models the diffusion tests patch (building one is the slow
part): :func:`model_of` hands out a fresh deep copy each time."""

from __future__ import annotations

import copy

import torch

from atc_patch.testing import UNET_KINDS, build_transformer, build_unet

_CACHE: dict[str, torch.nn.Module] = {}


def model_of(kind: str) -> torch.nn.Module:
    """A fresh copy of the cached tiny UNet (:data:`UNET_KINDS`) or transformer ``kind``."""
    if kind not in _CACHE:
        _CACHE[kind] = build_unet(kind) if kind in UNET_KINDS else build_transformer(kind)
    return copy.deepcopy(_CACHE[kind])
