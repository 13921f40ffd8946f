"""The torchvision family: ``VisionTransformer`` (ViT-B/L/H, incl. the SWAG weights).

Instance overrides (every module keeps its class and its ``forward`` signature):

* ``Encoder.forward`` runs the encoder layers with the per-forward token state
  (:mod:`atc_patch.patch.vit`); the model's ``__prepare_scriptable__`` refuses
  ``torch.jit.script``;
* every ``EncoderBlock.forward`` merges between attention and MLP when the encoder gives it
  ``r``. The metric is the attention keys averaged over heads, from the key rows of the
  ``nn.MultiheadAttention`` in-projection (the attention module is untouched); proportional
  attention is its float ``attn_mask``.

The class token (slot 0, read by ``VisionTransformer.forward``) is protected::

    apply_patch(torchvision.models.vit_b_16(), "tome", r=8)
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._override import original, override, restore_tree
from ..config import PatchInfo, ViTConfig
from . import (
    Tokens,
    TraceSlot,
    ViTPatch,
    check_traceable,
    merge_step,
    refuse_script,
    size_bias,
    store_source,
)

NAME = "torchvision"
CONFIG = ViTConfig
WHAT = "a torchvision VisionTransformer"
UNUSED = {"unmerge": "unmerge is a transformers option; torchvision's ViT outputs the class token"}
PROTECTED = 1  # the class token


def root_of(model: Any) -> nn.Module | None:
    """``model`` if it is a torchvision ``VisionTransformer``, else ``None``."""
    vit = sys.modules.get("torchvision.models.vision_transformer")
    return model if vit is not None and isinstance(model, vit.VisionTransformer) else None


def apply(root: nn.Module, config: ViTConfig) -> PatchInfo:
    """Patch the ``VisionTransformer`` ``root`` in place (checks first, then overrides)."""
    from torchvision.models.vision_transformer import Encoder, EncoderBlock

    encoder = root.encoder
    layers = list(encoder.layers)
    if type(encoder) is not Encoder or any(type(blk) is not EncoderBlock for blk in layers):
        raise TypeError(
            "atc_patch supports torchvision VisionTransformer models whose encoder is a "
            "torchvision Encoder of EncoderBlock layers"
        )
    slot = TraceSlot() if config.trace_source else None
    patch = ViTPatch(config, PROTECTED, "torchvision VisionTransformer", slot)
    patch.check(len(layers), encoder.pos_embedding.shape[1])
    override(root, "__prepare_scriptable__", refuse_script, patch)
    override(encoder, "forward", _encoder_forward, patch)
    for blk in layers:
        override(blk, "forward", _block_forward, patch)
    return PatchInfo(NAME, config, {"protected": PROTECTED}, state=slot, unused=tuple(UNUSED))


def remove(root: nn.Module) -> None:
    """Undo :func:`apply` (also a partial one)."""
    restore_tree(root)


def _encoder_forward(encoder: nn.Module, patch: ViTPatch, input: Tensor) -> Tensor:
    """``(B, 1 + N, C)`` class token and patches -> ``(B, 1 + N', C)`` normed tokens."""
    if patch.is_passthrough:
        return original(encoder, "forward")(input)
    check_traceable(patch, input)
    torch._assert(
        input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}"
    )
    x = encoder.dropout(input + encoder.pos_embedding)
    num_tokens = x.shape[1]
    steps = patch.block_steps(len(encoder.layers), num_tokens)
    tokens = Tokens(x)
    for blk, step in zip(encoder.layers, steps):
        tokens = blk(tokens.x, r=patch.r_for(step, tokens.x.shape[1]), tokens=tokens)
    store_source(patch, tokens, num_tokens)
    return encoder.ln(tokens.x)


def _block_forward(
    blk: nn.Module,
    patch: ViTPatch,
    input: Tensor,
    *,
    r: int | None = None,
    tokens: Tokens | None = None,
) -> Tensor | Tokens:
    """Without ``r``: torchvision's block, ``(B, N, C) -> (B, N, C)``.

    With ``r``: ``(B, N, C)`` tokens with the rest of their state in ``tokens`` ->
    :class:`~atc_patch.patch.vit.Tokens` with ``N - r`` tokens.
    """
    if r is None or tokens is None:
        return original(blk, "forward")(input)
    x = blk.ln_1(input)
    mask = _mha_mask(size_bias(tokens.size, patch.config.prop_attn), blk.num_heads, x.dtype)
    attn, _ = blk.self_attention(x, x, x, need_weights=False, attn_mask=mask)
    metric = _mean_keys(blk.self_attention, x) if r > 0 else None
    x = blk.dropout(attn) + input
    merged = merge_step(patch, metric, r, tokens._replace(x=x))
    return merged._replace(x=merged.x + blk.mlp(blk.ln_2(merged.x)))


def _mha_mask(bias: Tensor | None, num_heads: int, dtype: torch.dtype) -> Tensor | None:
    """``(B, 1, 1, N)`` key bias -> ``(B * heads, N, N)`` float mask for ``MultiheadAttention``.

    ``None`` for an empty batch, whose ``(0, N, N)`` mask ``MultiheadAttention`` cannot take.
    """
    if bias is None or bias.shape[0] == 0:
        return None
    b, n = bias.shape[0], bias.shape[-1]
    return bias.to(dtype).expand(b, num_heads, n, n).reshape(b * num_heads, n, n)


def _mean_keys(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """Keys of ``x`` ``(B, N, E)`` (batch first) averaged over heads: ``(B, N, E // heads)``."""
    e = attn.embed_dim
    if attn._qkv_same_embed_dim:
        weight = attn.in_proj_weight[e : 2 * e]
    else:
        weight = attn.k_proj_weight
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[e : 2 * e]
    k = F.linear(x, weight, bias)
    b, n, _ = k.shape
    return k.view(b, n, attn.num_heads, attn.head_dim).mean(2)
