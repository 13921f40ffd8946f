"""Token reduction for torchvision's ``VisionTransformer`` (ViT-B/L/H, incl. the SWAG weights).

Two classes are swapped (reversibly):

* ``Encoder.forward`` runs the encoder layers itself, threading the per-forward token state
  through them; the schedule is evaluated per forward, each layer's ``r`` from the tokens
  actually left.
* ``EncoderBlock.forward`` reduces tokens between attention and MLP when it is given ``r``.
  The metric is the attention keys averaged over heads, computed with the key part of the
  ``nn.MultiheadAttention`` in-projection (the module is kept as is, so unreduced blocks run
  torchvision's own attention path). Proportional attention is passed as a float
  ``attn_mask``.

The class token (slot 0, read by ``VisionTransformer.forward``) is protected.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _vit
from ._common import PatchInfo, clear_patch_info, restore_class, set_patch_info, swap_class

FAMILY = "torchvision"
PROTECTED = 1  # the class token


def matches(model: Any) -> bool:
    """True for a torchvision ``VisionTransformer``, without importing torchvision."""
    vit = sys.modules.get("torchvision.models.vision_transformer")
    return vit is not None and isinstance(model, vit.VisionTransformer)


def apply(model: nn.Module, method: str = "atc", **options: Any) -> None:
    """Patch ``model`` in place; see :func:`atc_patch.apply_patch` for the options."""
    from torchvision.models.vision_transformer import Encoder, EncoderBlock

    encoder = model.encoder
    layers = list(encoder.layers)
    if type(encoder) is not Encoder or any(type(blk) is not EncoderBlock for blk in layers):
        raise TypeError(
            "atc_patch supports torchvision VisionTransformer models whose encoder is a "
            "torchvision Encoder of EncoderBlock layers"
        )
    config = _vit.make_reduction(
        method, PROTECTED, options, family="a torchvision VisionTransformer"
    )
    num_tokens = model.encoder.pos_embedding.shape[1]
    config.block_r(len(layers), num_tokens)  # schedule errors now
    config.schedule.check_reachable(len(layers), num_tokens, method, PROTECTED)
    swap_class(encoder, _ReducingEncoder)
    _vit.set_config(encoder, config)
    for blk in layers:
        swap_class(blk, _ReducingEncoderBlock)
        _vit.set_config(blk, config)
    if config.trace_source:
        _vit.enable_trace(model, encoder)  # one slot: the encoder writes, the model is read
    set_patch_info(model, PatchInfo(FAMILY, method, _vit.settings_of(config)))


def remove(model: nn.Module) -> None:
    """Restore the original classes and drop every attribute :func:`apply` added."""
    encoder = model.encoder
    for blk in encoder.layers:
        restore_class(blk)
        _vit.clear_config(blk)
    restore_class(encoder)
    _vit.clear_config(encoder)
    _vit.clear_config(model)
    clear_patch_info(model)


class _ReducingEncoder:
    """Mixin for ``torchvision.models.vision_transformer.Encoder``."""

    def forward(self, input: Tensor) -> Tensor:
        """``(B, 1 + N, C)`` class token and patches -> ``(B, 1 + N', C)`` normed tokens."""
        torch._assert(
            input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}"
        )
        x = self.dropout(input + self.pos_embedding)
        config = _vit.get_config(self)
        _vit.check_traceable(config, not config.schedule.is_identity())
        num_tokens = x.shape[1]
        steps = config.block_steps(len(self.layers), num_tokens)
        tokens = _vit.Tokens(x)
        for blk, step in zip(self.layers, steps):
            r = config.r_for(step, tokens.x.shape[1])
            tokens = blk(tokens.x, r=r, size=tokens.size, source=tokens.source)
        if config.trace_source:
            _vit.store_source(self, tokens, num_tokens)
        return self.ln(tokens.x)

    def __prepare_scriptable__(self) -> Any:
        _vit.refuse_script(self)


class _ReducingEncoderBlock:
    """Mixin for ``torchvision.models.vision_transformer.EncoderBlock``."""

    def forward(
        self,
        input: Tensor,
        *,
        r: int | None = None,
        size: Tensor | None = None,
        source: Tensor | None = None,
    ) -> Tensor | _vit.Tokens:
        """Without ``r``: torchvision's block, ``(B, N, C) -> (B, N, C)``.

        With ``r``: ``(B, N, C)`` tokens with ``size`` ``(B, N, 1)`` and ``source``
        ``(B, N, N0)`` -> :class:`~atc_patch.patch._vit.Tokens` with ``N - r`` tokens.
        """
        if r is None:
            return super().forward(input)
        config = _vit.get_config(self)
        x = self.ln_1(input)
        mask = _mha_mask(_vit.size_bias(size, config.prop_attn), self.num_heads, x.dtype)
        attn, _ = self.self_attention(x, x, x, need_weights=False, attn_mask=mask)
        metric = _mean_keys(self.self_attention, x) if r > 0 else None
        attn = self.dropout(attn)
        x = attn + input
        tokens = _vit.merge_step(config, metric, r, _vit.Tokens(x, size, source))
        x = tokens.x
        y = self.ln_2(x)
        y = self.mlp(y)
        return tokens._replace(x=x + y)


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
