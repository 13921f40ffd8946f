"""Video diffusion transformers: Wan 2.x.

Their tokens are a ``frames x height x width`` grid in raster order (``(t, h, w)``: ``tome_sd``
windows of ``st x sy x sx``, tiles of ``(tt, th, tw)``). Wan's text enters through
cross-attention only: its self-attention ``attn1`` (with ``merge_crossattn`` the ``attn2``
queries, with ``merge_mlp`` the ``ffn``) runs on the block's merged tokens, and its 3-axis
rotary ``(cos, sin)`` tables ``(1, N, 1, D)`` follow the plan (cluster means of their rows).

Conditioning frames never merge: a per-token timestep ``(B, N)`` (Wan 2.2 TI2V's
``expand_timesteps``, 0 on the clean first latent frame) marks the first frame as conditioning
(``Call.skip``); the other tokens must share one timestep (checked on the device). The token
grid is then the remaining ``(t - 1, h, w)``::

    apply_patch(pipe, "tome_sd", ratio=0.5, st=2)       # 2 x 2 x 2 windows
    apply_patch(pipe, "atc", ratio=0.5, tile=(2, 8, 8))  # ATC inside 2 x 8 x 8 tiles
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ...config import DiffusionConfig
from ..core import Call
from ..merge import Rotary, Span
from ._table import Args, Blocks, Model, fixed_grid

WAN_ROTARY = Rotary(arg=(3, "rotary_emb"), parts=(0, 1), batched=True, after_text=False)


def _wan(c: DiffusionConfig) -> dict[str, Span]:  # WanTransformerBlock
    # attn1(x, None, None, rotary_emb): all positional, no mask; attn2(x, text, None, None).
    out = {"attn1": Span(rotary=WAN_ROTARY)} if c.merge_attn else {}
    out.update({"attn2": Span()} if c.merge_crossattn else {})  # queries; the text keys stay
    return {**out, **({"ffn": Span()} if c.merge_mlp else {})}


def video_call(grid: tuple[int, int, int], timestep: Any, text: int | None = None) -> Call:
    """A call on a ``(t, h, w)`` token grid. A per-token ``timestep`` ``(B, N)`` protects the
    first frame's ``h * w`` tokens (the conditioning image of image-to-video), whose timestep
    differs; every later token must have the last token's timestep (checked on the device:
    conditioning elsewhere cannot be protected and is refused)."""
    skip = 0
    if isinstance(timestep, Tensor) and timestep.dim() == 2:
        n = math.prod(grid)
        if timestep.shape[1] != n:
            raise ValueError(
                f"token merging: a per-token timestep of shape {tuple(timestep.shape)} does not "
                f"cover the {n} tokens of the {'x'.join(map(str, grid))} token grid"
            )
        skip = grid[1] * grid[2]
        _check_conditioning(timestep, skip)
        grid = (grid[0] - 1, grid[1], grid[2])
        timestep = timestep[:, -1]
    return Call(
        functools.partial(fixed_grid, grid), timestep, text=text, skip=skip, count=math.prod(grid)
    )


def _check_conditioning(timestep: Tensor, skip: int) -> None:
    if timestep.is_meta:
        return
    later = timestep[:, skip:]
    torch._assert_async(
        (later == later[:, -1:]).all(),
        "token merging protects the first latent frame when the timestep is per token "
        "(image-to-video conditioning); here tokens after the first frame have different "
        "timesteps (conditioning frames elsewhere), which would merge: remove the patch",
    )


def wan_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A Wan call on latents ``(B, C, F, H, W)``: the ``(F / pt, H / p, W / p)`` token grid."""
    x = where.get(args, kwargs, "hidden_states")
    f, h, w = (int(v) for v in x.shape[-3:])
    grid = (f // where.patch_t, h // where.patch, w // where.patch)
    return video_call(grid, where.get(args, kwargs, "timestep"))


MODELS = {
    "WanTransformer3DModel": Model(
        (Blocks("blocks", _wan),), wan_call, cross_attention=True, video=True
    ),
}
