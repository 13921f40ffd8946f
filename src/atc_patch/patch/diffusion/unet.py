"""The ``unet`` family: diffusers ``UNet2DConditionModel`` (SD 1.x / 2.x / XL), ToMe-SD style.

The ``BasicTransformerBlock``s at the chosen latent resolutions are patched: self-attention
(``attn1``; with ``merge_crossattn`` the queries of ``attn2``, with ``merge_mlp`` the ``ff``)
runs on the block's merged tokens. A block at latent stride ``d`` (``2 **`` the downsamplers
before it) is patched when ``d <= max_downsample``; ``None`` means the highest-resolution level
that has attention (1 on SD 1.x/2.x, as tomesd; 2 on SDXL, whose first level has none)::

    apply_patch(pipe, "tome_sd", ratio=0.5)      # pipe or pipe.unet
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

from torch import nn

from ..config import DiffusionConfig
from . import BlockSpec, Call, Span, enter_call, patch, unpatch
from .core import check_grid_options

NAME = "unet"
CONFIG = DiffusionConfig
WHAT = "a diffusers UNet2DConditionModel"
UNUSED = {"blocks": "a UNet chooses its blocks by resolution with max_downsample"}


def root_of(model: Any) -> nn.Module | None:
    """``model`` if it is a ``UNet2DConditionModel``, or a pipeline's ``.unet``."""
    if "diffusers" not in sys.modules:
        return None
    from diffusers import UNet2DConditionModel

    unet = getattr(model, "unet", model)
    return unet if isinstance(unet, UNet2DConditionModel) else None


def transformer_blocks(unet: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(downsample, block)`` for every ``BasicTransformerBlock`` in the down, mid and up
    blocks, in execution order; ``downsample`` is the block's latent stride."""
    from diffusers.models.attention import BasicTransformerBlock

    def blocks_in(m: nn.Module | None) -> list[nn.Module]:
        return [] if m is None else [b for b in m.modules() if isinstance(b, BasicTransformerBlock)]

    out: list[tuple[int, nn.Module]] = []
    d = 1
    for down in unet.down_blocks:
        out += [(d, b) for b in blocks_in(down)]
        d *= 2 if getattr(down, "downsamplers", None) is not None else 1
    out += [(d, b) for b in blocks_in(unet.mid_block)]
    for up in unet.up_blocks:
        out += [(d, b) for b in blocks_in(up)]
        d = max(d // 2, 1) if getattr(up, "upsamplers", None) is not None else d
    return out


def apply(unet: nn.Module, config: DiffusionConfig) -> dict[str, Any]:
    """Patch the blocks at latent strides ``<= max_downsample``; report their number and the
    stride limit in use."""
    check_grid_options(config, False, "a UNet")
    blocks = transformer_blocks(unet)
    levels = sorted({d for d, _ in blocks})
    if not levels:
        raise ValueError("this UNet has no BasicTransformerBlock: there is nothing to reduce")
    limit = config.max_downsample if config.max_downsample is not None else levels[0]
    if limit < levels[0]:
        raise ValueError(
            f"max_downsample={limit} selects no transformer block: this UNet has attention at "
            f"downsample {levels} only (SDXL has none at 1). Use max_downsample>={levels[0]} "
            "or None (the highest-resolution level with attention)."
        )
    spans = tuple(
        (name, span)
        for name, span, on in (
            ("attn1", Span(mask="keys"), config.merge_attn),
            ("attn2", Span(cross=True), config.merge_crossattn),
            ("ff", Span(), config.merge_mlp),
        )
        if on
    )
    table = [
        (b, BlockSpec(config, i, tuple((n, s) for n, s in spans if getattr(b, n, None)), d))
        for i, (d, b) in enumerate(blocks)
        if d <= limit
    ]
    patch(unet, table, _enter)
    return {"num_blocks": len(table), "max_downsample": limit}


def remove(unet: nn.Module) -> None:
    unpatch(unet)


def _enter(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """The UNet's forward pre-hook: a call on latents ``sample`` ``(B, C, H, W)``."""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    latent = (int(sample.shape[-2]), int(sample.shape[-1]))
    enter_call(unet, Call(functools.partial(_grid, latent), timestep))


def _grid(latent: tuple[int, int], n: int, downsample: int) -> tuple[int, int]:
    """The ``(ceil(H / d), ceil(W / d))`` grid of a block at stride ``d`` with ``n`` tokens
    (tomesd's ``ceil(sqrt(H * W / n))`` stride as a fallback)."""
    lat_h, lat_w = latent
    for d in (downsample, max(1, math.ceil(math.sqrt(lat_h * lat_w // n)))):
        h, w = -(-lat_h // d), -(-lat_w // d)
        if h * w == n:
            return h, w
    raise ValueError(
        f"method='tome_sd': cannot infer the token grid of {n} tokens from {lat_h}x{lat_w} latents"
    )
