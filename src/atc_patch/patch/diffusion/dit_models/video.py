"""Video diffusion transformers: Wan 2.x, CogVideoX, LTX-Video and HunyuanVideo.

Their tokens are a ``frames x height x width`` grid in raster order (``(t, h, w)``: ``tome_sd``
windows of ``st x sy x sx``, tiles of ``(tt, th, tw)``); 3-axis rotary tables follow the plan
(cluster means of their rows).

* Wan: text enters through cross-attention only. The self-attention ``attn1`` (with
  ``merge_crossattn`` the ``attn2`` queries, with ``merge_mlp`` the ``ffn``) runs on the
  block's merged tokens; its ``(cos, sin)`` tables ``(1, N, 1, D)`` follow the merge.
* CogVideoX: ``attn1`` is a joint attention over ``[text, image]`` (the text whole, the image
  stream merged; returns ``(image, text)``), its image-only ``(cos, sin)`` tables ``(N, D)``
  are passed by the pipeline as the model's ``image_rotary_emb``; ``ff`` runs once on
  ``[text, image]`` (the text prefix passes whole).
* LTX-Video: like Wan (``attn1``, ``attn2`` queries, ``ff``) on packed latents ``(B, N, C)``
  whose grid is the call's ``num_frames x height x width``; its ``(cos, sin)`` tables
  ``(B, N, D)`` follow the merge. ``LTXConditionPipeline``'s ``video_coords`` (conditioning
  tokens anywhere, appended ones) are refused.
* HunyuanVideo: double-stream blocks merge the image stream of their joint attention
  ``[image, text]`` (returns ``(image, text)``) and ``ff``; single-stream blocks take image and
  text as separate arguments, run ``proj_mlp`` / ``proj_out`` on ``[image, text]`` (the text
  suffix passes whole) and the attention on the image part. The ``(B, 1, 1, N + T)`` mask the
  model builds follows the merge (its image columns by ``amax``), the image-only ``(cos,
  sin)`` tables ``(N, D)`` too. The text refiner blocks are never patched.

Conditioning frames never merge: a per-token timestep ``(B, N)`` (Wan 2.2 TI2V's
``expand_timesteps``, LTX-Video image-to-video: 0 on the clean first latent frame) or
HunyuanVideo-I2V's ``image_condition_type="token_replace"`` marks the first frame as
conditioning (``Call.skip``); the other tokens must share one timestep (checked on the device).
The token grid is then the remaining ``(t - 1, h, w)``::

    apply_patch(pipe, "tome_sd", ratio=0.5, st=2)       # 2 x 2 x 2 windows
    apply_patch(pipe, "atc", ratio=0.5, tile=(2, 8, 8))  # ATC inside 2 x 8 x 8 tiles
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from torch import Tensor

from ...config import DiffusionConfig
from ..core import Call
from ..merge import JointMask, Rotary, Span
from ._table import Args, Blocks, Model, fixed_grid

WAN_ROTARY = Rotary(arg=(3, "rotary_emb"), parts=(0, 1), batched=True, after_text=False)


def _wan(c: DiffusionConfig) -> dict[str, Span]:  # WanTransformerBlock
    # attn1(x, None, None, rotary_emb): all positional, no mask; attn2(x, text, None, None).
    out = {"attn1": Span(rotary=WAN_ROTARY)} if c.merge_attn else {}
    out.update({"attn2": Span(cross=True)} if c.merge_crossattn else {})  # queries; text keys stay
    return {**out, **({"ffn": Span()} if c.merge_mlp else {})}


COGVIDEOX_ROTARY = Rotary(parts=(0, 1), after_text=False)  # (N, D) each, image rows only
ENCODER = (1, "encoder_hidden_states")  # where a block's text is


def _cogvideox(c: DiffusionConfig) -> dict[str, Span]:  # CogVideoXBlock
    attn = {"attn1": Span(rotary=COGVIDEOX_ROTARY)} if c.merge_attn else {}
    return {**attn, **({"ff": Span(after_text=True)} if c.merge_mlp else {})}


LTX_ROTARY = Rotary(parts=(0, 1), batched=True, after_text=False)  # (B, N, D) each


def _ltx(c: DiffusionConfig) -> dict[str, Span]:  # LTXVideoTransformerBlock
    # attn2(x, encoder_hidden_states=text, attention_mask=text bias): the text keys stay.
    out = {"attn1": Span(rotary=LTX_ROTARY)} if c.merge_attn else {}
    out.update({"attn2": Span(cross=True)} if c.merge_crossattn else {})
    return {**out, **({"ff": Span()} if c.merge_mlp else {})}


HUNYUAN_ROTARY = Rotary(parts=(0, 1), after_text=False)  # (N, D) each, image rows only
HUNYUAN_MASK = JointMask()  # (B, 1, 1, N + T) bool, [image, text] columns, built by the model


def _hunyuan_double(c: DiffusionConfig) -> dict[str, Span]:  # HunyuanVideo(TokenReplace)Block
    # returns (image, text); its processor puts the image keys before the text keys
    attn = Span(mask=HUNYUAN_MASK, rotary=HUNYUAN_ROTARY, image_keys="first")
    return {**({"attn": attn} if c.merge_attn else {}), **({"ff": Span()} if c.merge_mlp else {})}


def _hunyuan_single(c: DiffusionConfig) -> dict[str, Span]:  # ...SingleTransformerBlock
    # proj_mlp sees [image, text], attn the image part (and the text as a separate argument),
    # proj_out cat(attention, MLP) on [image, text]: per token, so with both merged the
    # unmerge moves after proj_out (as for Flux's single-stream blocks, the text at the end).
    attn = Span(mask=HUNYUAN_MASK, rotary=HUNYUAN_ROTARY, image_keys="first")
    if c.merge_attn and c.merge_mlp:
        return {
            "attn": dataclasses.replace(attn, unmerge_out=False),
            "proj_mlp": Span(unmerge_out=False),
            "proj_out": Span(merge_in=False),
        }
    if c.merge_attn:
        return {"attn": attn}
    return {"proj_mlp": Span()} if c.merge_mlp else {}


def video_call(grid: tuple[int, int, int], timestep: Any, first_frame: bool = False) -> Call:
    """A call on a ``(t, h, w)`` token grid. The first frame's ``h * w`` tokens never merge
    when they are an image-to-video conditioning frame: ``first_frame`` (the model says so),
    or a per-token ``timestep`` ``(B, N)``, where every later token must have the last token's
    timestep (checked on the device: conditioning elsewhere cannot be protected and is
    refused)."""
    skip = grid[1] * grid[2] if first_frame else 0
    if isinstance(timestep, Tensor) and timestep.dim() == 2:
        n = math.prod(grid)
        if timestep.shape[1] != n:
            raise ValueError(
                f"token merging: a per-token timestep of shape {tuple(timestep.shape)} does not "
                f"cover the {n} tokens of the {'x'.join(map(str, grid))} token grid"
            )
        skip = grid[1] * grid[2]
        _check_conditioning(timestep, skip)
        timestep = timestep[:, -1]
    if skip:
        grid = (grid[0] - 1, grid[1], grid[2])
    return Call(functools.partial(fixed_grid, grid), timestep, skip=skip, count=math.prod(grid))


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


def latent_grid(where: Args, x: Tensor, frames_dim: int = -3) -> tuple[int, int, int]:
    """The ``(F / pt, H / p, W / p)`` token grid of latents ``x`` with their frames on
    ``frames_dim`` and ``(H, W)`` last."""
    f, h, w = int(x.shape[frames_dim]), int(x.shape[-2]), int(x.shape[-1])
    return f // where.patch_t, h // where.patch, w // where.patch


def wan_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A Wan call on latents ``(B, C, F, H, W)``."""
    x = where.get(args, kwargs, "hidden_states")
    return video_call(latent_grid(where, x), where.get(args, kwargs, "timestep"))


def cogvideox_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A CogVideoX call on latents ``(B, F, C, H, W)`` (frames before channels; CogVideoX 1.5:
    ``pt = 2``)."""
    x = where.get(args, kwargs, "hidden_states")
    return video_call(latent_grid(where, x, 1), where.get(args, kwargs, "timestep"))


def ltx_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """An LTX-Video call on packed latents ``(B, N, C)``: the ``num_frames x height x width``
    token grid of the call's arguments (what its rotary tables are made for)."""
    if where.get(args, kwargs, "video_coords") is not None:
        raise ValueError(
            "token merging does not support LTX-Video's video_coords (LTXConditionPipeline: "
            "conditioning tokens anywhere in the sequence and appended ones, which must not "
            "merge); remove the patch for this pipeline"
        )
    grid = tuple(int(where.get(args, kwargs, k)) for k in ("num_frames", "height", "width"))
    return video_call(grid, where.get(args, kwargs, "timestep"))


def hunyuan_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A HunyuanVideo call on latents ``(B, C, F, H, W)``; with
    ``image_condition_type="token_replace"`` (HunyuanVideo-I2V) the first frame is the
    conditioning image."""
    x = where.get(args, kwargs, "hidden_states")
    replace = getattr(where.config, "image_condition_type", None) == "token_replace"
    return video_call(latent_grid(where, x), where.get(args, kwargs, "timestep"), replace)


MODELS = {
    "WanTransformer3DModel": Model(
        (Blocks("blocks", _wan),), wan_call, cross_attention=True, video=True
    ),
    "CogVideoXTransformer3DModel": Model(
        (Blocks("transformer_blocks", _cogvideox, text=ENCODER),), cogvideox_call, video=True
    ),
    "LTXVideoTransformer3DModel": Model(
        (Blocks("transformer_blocks", _ltx),), ltx_call, cross_attention=True, video=True
    ),
    "HunyuanVideoTransformer3DModel": Model(
        (
            Blocks("transformer_blocks", _hunyuan_double),
            Blocks("single_transformer_blocks", _hunyuan_single),
        ),
        hunyuan_call,
        video=True,
    ),
}
