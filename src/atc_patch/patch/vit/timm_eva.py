"""timm ``Eva``: EVA-02, DINOv3, Perception Encoder, RoPE-ViT and the other rotary ViTs of
``timm.models.eva`` (:data:`~.timm.MODELS` entry), and the ``EvaBlock`` / ``EvaBlockPostNorm``
blocks (also in ``NaFlexVit``).

The model's ``forward``, ``forward_features`` and ``forward_intermediates`` run the blocks
with the rotary table as a position term of the token state (:attr:`Tokens.pos`): every merge
gives each cluster the size-weighted mean of its members' sin/cos rows
(:func:`~atc_patch.patch.vit.merge_positions`), so the rotary positions follow the plan.
``rope_type="mixed"`` tables (one per block) all follow it; each block takes its own.

A block runs its attention module unchanged: proportional attention is its additive
``attn_mask`` (``log(size)`` on the keys), the prefix tokens are left unrotated by timm's own
``num_prefix_tokens``, and the clustering metric is the keys *before* rotation (after
``k_norm``), averaged over heads (the content of a token; rotated keys would also cluster by
position)::

    model = timm.create_model("vit_large_patch16_dinov3", dynamic_img_size=True)
    apply_patch(model, "atc", keep_rate=0.7, reduction_loc=(6, 12, 18))
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .._override import original, override
from . import (
    Tokens,
    ViTPatch,
    attention_dtype,
    check_traceable,
    combine_masks,
    key_padding,
    merge_step,
    refuse_script,
    size_bias,
)
from .timm import (
    BlockTable,
    check_blocks,
    forward_head,
    patch_blocks,
    reduced_intermediates,
    run_blocks,
)


def eva_blocks() -> BlockTable:
    """The block table of the Eva blocks: ``EvaBlock`` and ``EvaBlockPostNorm`` with
    ``EvaAttention`` or ``AttentionRope``."""
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    attentions = (EvaAttention, AttentionRope)
    return {
        "timm.models.eva.EvaBlock": (patch_eva_block, attentions),
        "timm.models.eva.EvaBlockPostNorm": (patch_eva_block, attentions),
    }


def patch_model(vit: nn.Module, patch: ViTPatch) -> None:
    """The ``Eva`` entry: checks, then the model's and its blocks' overrides."""
    table = eva_blocks()
    check_blocks(vit, table)
    patch.check(len(vit.blocks), vit.patch_embed.num_patches + patch.protected)
    override(vit, "forward", _forward, patch)
    override(vit, "forward_features", _forward_features, patch)
    override(vit, "forward_intermediates", _forward_intermediates, patch)
    override(vit, "__prepare_scriptable__", refuse_script, patch)
    patch_blocks(vit, patch, table, bool(vit.rope is not None and vit.rope_mixed))


# --- the model ---------------------------------------------------------------------------------


def _forward(
    vit: nn.Module, patch: ViTPatch, x: Tensor, attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:  # fmt: skip
    """timm's forward; the pooling weighs each token by its size (``avg``: size-weighted mean;
    ``map``: ``log(size)`` on the attention pool's keys)."""
    if patch.is_passthrough:
        return original(vit, "forward")(x, attn_mask=attn_mask, is_causal=is_causal)
    check_traceable(patch, x)
    tokens, _ = run_blocks(vit, patch, _tokens(vit, x, attn_mask), is_causal)
    return forward_head(vit, patch, vit.norm(tokens.x), tokens, map_prefix=True)


def _forward_features(
    vit: nn.Module, patch: ViTPatch, x: Tensor, attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:  # fmt: skip
    """``(B, 3, H, W)`` images -> ``(B, N', C)`` normed tokens, ``N'`` after reduction."""
    if patch.is_passthrough:
        return original(vit, "forward_features")(x, attn_mask=attn_mask, is_causal=is_causal)
    check_traceable(patch, x)
    tokens, _ = run_blocks(vit, patch, _tokens(vit, x, attn_mask), is_causal)
    return vit.norm(tokens.x)


def _forward_intermediates(
    vit: nn.Module, patch: ViTPatch, x: Tensor, indices: int | list[int] | None = None,
    return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
    output_fmt: str = "NCHW", intermediates_only: bool = False, attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Any:  # fmt: skip
    """timm's ``Eva.forward_intermediates`` with token reduction (same arguments and outputs):
    every intermediate unmerged back to the full token grid (the unpatched shape), the final
    features the reduced ``(B, N', C)`` tokens."""
    if patch.is_passthrough:
        return original(vit, "forward_intermediates")(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only,
            attn_mask=attn_mask, is_causal=is_causal,
        )  # fmt: skip
    return reduced_intermediates(
        vit, patch, x, lambda: _tokens(vit, x, attn_mask), is_causal, indices, stop_early,
        output_fmt, norm, return_prefix_tokens, intermediates_only,
    )  # fmt: skip


def _tokens(vit: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tokens:
    """The embedded tokens with their rotary table(s) (a tuple of one per block for
    ``rope_type="mixed"``)."""
    x, rope = vit._pos_embed(vit.patch_embed(x))
    x = vit.norm_pre(x)
    if rope is not None and vit.rope_mixed:
        rope = tuple(rope.unbind(0))
    return Tokens(x, attn_mask=attn_mask, valid=key_padding(attn_mask, x.shape[0]), pos=rope)


# --- blocks ------------------------------------------------------------------------------------


def patch_eva_block(blk: nn.Module, patch: ViTPatch, mixed: bool = False) -> None:
    """``mixed``: the token state holds one rotary table per remaining block."""
    post_norm = type(blk).__name__ == "EvaBlockPostNorm"  # norms after the sublayers
    override(blk, "forward", _eva_block_forward, patch, mixed, post_norm)


def _eva_block_forward(
    blk: nn.Module,
    patch: ViTPatch,
    mixed: bool,
    post_norm: bool,
    x: Tensor,
    rope: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    *,
    r: int | None = None,
    tokens: Tokens | None = None,
) -> Tensor | Tokens:
    """Without ``r``: timm's block, ``(B, N, C) -> (B, N, C)``.

    With ``r`` (called by the patched model): ``(B, N, C)`` tokens ``x`` with the rest of their
    state in ``tokens`` -> :class:`~atc_patch.patch.vit.Tokens` with ``N - r`` tokens.
    """
    if r is None or tokens is None:
        return original(blk, "forward")(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    rope, rest = (tokens.pos[0], tokens.pos[1:]) if mixed else (tokens.pos, tokens.pos)
    h = x if post_norm else blk.norm1(x)
    bias = size_bias(tokens.size, patch.config.prop_attn)
    mask = combine_masks(tokens.attn_mask, bias, attention_dtype(h))
    out = blk.attn(h, rope=rope, attn_mask=mask, is_causal=is_causal)
    if post_norm:
        out = blk.norm1(out)
    elif blk.gamma_1 is not None:
        out = blk.gamma_1 * out
    x = x + blk.drop_path1(out)
    metric = mean_keys(blk.attn, h) if r > 0 else None
    merged = merge_step(patch, metric, r, tokens._replace(x=x, pos=rest))
    x = merged.x
    if post_norm:
        return merged._replace(x=x + blk.drop_path2(blk.norm2(blk.mlp(x))))
    out = blk.mlp(blk.norm2(x))
    if blk.gamma_2 is not None:
        out = blk.gamma_2 * out
    return merged._replace(x=x + blk.drop_path2(out))


def mean_keys(attn: nn.Module, h: Tensor) -> Tensor:
    """Keys of ``h`` ``(B, N, C)`` before rotation, after ``k_norm``, averaged over the (key)
    heads: ``(B, N, head_dim)``. ``EvaAttention`` and ``AttentionRope``, fused ``qkv`` or
    separate projections; without ``k_norm`` as one projection by the head-averaged weights."""
    d = attn.head_dim
    if attn.qkv is not None:
        rows = slice(attn.num_heads * d, 2 * attn.num_heads * d)
        weight = attn.qkv.weight[rows]
        bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else getattr(attn, "k_bias", None)
    else:
        weight, bias = attn.k_proj.weight, attn.k_proj.bias
    heads = weight.shape[0] // d
    if isinstance(attn.k_norm, nn.Identity):
        mean_bias = None if bias is None else bias.view(heads, d).mean(0)
        return F.linear(h, weight.view(heads, d, -1).mean(0), mean_bias)
    keys = F.linear(h, weight, bias).unflatten(-1, (heads, d))
    return attn.k_norm(keys).mean(-2)
