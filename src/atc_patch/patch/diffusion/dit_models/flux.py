"""Flux-style transformers: FLUX.1, FLUX.2 and Chroma (double-stream, then single-stream blocks).

Double-stream blocks merge the image stream of their joint attention (the text stream enters
whole) and, with ``merge_mlp``, ``ff``; single-stream blocks see ``[text, image]`` and merge the
image part. The ``(cos, sin)`` rotary tables cover ``[text, image stream]`` and follow the
merge. The generated image is the rows of ``img_ids`` whose first id is 0 (FLUX.1 Kontext's and
FLUX.2's reference images have 1, or 10, 20, ...): reference tokens never merge. ``tome_sd``'s
grid is the generated image's ``img_ids`` raster. FLUX.2's single-stream ``attn`` is attention
and MLP in one module (``to_qkv_mlp_proj``): it runs on merged tokens when ``merge_attn`` or
``merge_mlp`` is set. Chroma's joint attention mask (always passed by its pipeline) follows the
merge.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor

from ...config import DiffusionConfig
from ..core import Call
from ..merge import JointMask, Rotary, Span
from ._table import Args, Blocks, Model, ids_grid, read_once, text_length

FLUX_ROTARY = Rotary()  # image_rotary_emb = (cos, sin), (T + N, D) each, text rows first
ENCODER = (1, "encoder_hidden_states")  # where a double-stream block's text is


def _double(mask: str | JointMask, outputs: tuple[int, ...], c: DiffusionConfig) -> dict[str, Span]:
    # attn returns (image, text) or, FLUX.1 / Chroma with an IP-Adapter, (image, text, ip image).
    attn = Span(outputs=outputs, mask=mask, rotary=FLUX_ROTARY)
    return {**({"attn": attn} if c.merge_attn else {}), **({"ff": Span()} if c.merge_mlp else {})}


def _single(mask: str | JointMask, c: DiffusionConfig) -> dict[str, Span]:
    # attn and proj_mlp read the same tokens; proj_out(cat(attn, mlp)) is per token, so with
    # both merged the unmerge moves after proj_out (the same result, proj_out on fewer tokens).
    attn = Span(after_text=True, mask=mask, rotary=FLUX_ROTARY)
    if c.merge_attn and c.merge_mlp:
        return {
            "attn": dataclasses.replace(attn, unmerge_out=False),
            "proj_mlp": Span(unmerge_out=False, after_text=True),
            "proj_out": Span(merge_in=False, after_text=True),
        }
    if c.merge_attn:
        return {"attn": attn}
    return {"proj_mlp": Span(after_text=True)} if c.merge_mlp else {}


def _flux2_single(c: DiffusionConfig) -> dict[str, Span]:
    # Flux2ParallelSelfAttention: attention and the MLP share to_qkv_mlp_proj and to_out.
    return {"attn": Span(after_text=True, mask="reject", rotary=FLUX_ROTARY)}


# --------------------------------------------------------------------------------------------
# the call: img_ids say where the generated image is, and its grid
# --------------------------------------------------------------------------------------------
def ids_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A Flux / FLUX.2 / Chroma call: text length, the generated image's rows of ``img_ids``
    (``skip``, ``count``; read once per ``img_ids`` tensor) and their grid."""
    ids = where.get(args, kwargs, "img_ids")
    x = where.get(args, kwargs, "hidden_states")
    _check_kv_cache(where, args, kwargs, x)
    skip, count = generated_rows(ids, int(x.shape[1]))
    return Call(
        functools.partial(ids_grid, ids, skip),
        where.get(args, kwargs, "timestep"),
        text=text_length(where, args, kwargs, "encoder_hidden_states"),
        skip=skip,
        count=count,
    )


def _check_kv_cache(where: Args, args: tuple, kwargs: dict, x: Tensor) -> None:
    mode = where.get(args, kwargs, "kv_cache_mode")
    if mode is not None and x.shape[0] > 1:
        raise ValueError(
            f"token merging with FLUX.2's KV cache (kv_cache_mode={mode!r}) needs a batch of 1 "
            f"(got {x.shape[0]}): the cache holds one reference K/V for the whole batch, while "
            "the merged attention runs once per sample"
        )


def generated_rows(ids: Tensor | None, n: int) -> tuple[int, int | None]:
    """``(skip, count)`` of the generated image in ``img_ids`` ``(N, k)`` / ``(B, N, k)``: the
    one contiguous run of rows whose first id is 0 (``count=None``: all ``n`` rows). Read once
    per tensor; under ``torch.compile`` (values cannot be read) every row must be the image's
    (checked on the device), on ``meta`` they are taken to be."""
    if ids is None or ids.shape[-2] != n:
        return 0, None
    flat = ids[0] if ids.dim() == 3 else ids
    if ids.is_meta:
        return 0, None
    if torch.compiler.is_compiling():
        torch._assert_async(
            (flat[:, 0] == 0).all(),
            "token merging under torch.compile needs img_ids without reference images (their "
            "tokens must not merge; the ids cannot be read in a graph): run eagerly",
        )
        return 0, None
    return read_once(ids, "_atc_rows", n, lambda: _run_of_zeros(flat))


def _run_of_zeros(ids: Tensor) -> tuple[int, int | None]:
    generated = (ids[:, 0].round() == 0).nonzero().flatten()
    if generated.numel() == 0:
        raise ValueError("token merging: no img_ids row has first id 0 (the generated image)")
    skip, count = int(generated[0]), int(generated.numel())
    if int(generated[-1]) != skip + count - 1:
        raise ValueError(
            "token merging: the generated image's img_ids rows (first id 0) are not contiguous"
        )
    return (0, None) if count == ids.shape[0] else (skip, count)


def _model(mask: str | JointMask, outputs: tuple[int, ...], single: Any, text: Any) -> Model:
    """Double-stream blocks, then single-stream ones whose text length is ``text``: a block
    argument (FLUX.1: the text enters the block separately) or ``"call"`` (in the input)."""
    double = functools.partial(_double, mask, outputs)
    return Model(
        (
            Blocks("transformer_blocks", double, text=ENCODER),
            Blocks("single_transformer_blocks", single, text=text, joint_input=text == "call"),
        ),
        ids_call,
    )


CHROMA_MASK = JointMask(after_text=True)  # (B, 1, T + N, T + N), built in the block
MODELS = {
    "FluxTransformer2DModel": _model(
        "reject", (0, 2), functools.partial(_single, "reject"), ENCODER
    ),
    "Flux2Transformer2DModel": _model("reject", (0,), _flux2_single, "call"),
    "ChromaTransformer2DModel": _model(
        CHROMA_MASK, (0, 2), functools.partial(_single, CHROMA_MASK), "call"
    ),
}
