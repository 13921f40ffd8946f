"""Token reduction for timm ``VisionTransformer`` models (ViT, DeiT, distilled DeiT, DeiT-III,
MAE-style, register-token ViTs), patched in place.

Three classes are swapped (reversibly, see :func:`~atc_patch.patch._common.swap_class`):

* ``VisionTransformer.forward_features`` runs the blocks itself and threads the per-forward
  token state (sizes, source map, merged attention mask) through them; the schedule is
  evaluated per forward from the number of tokens that enter the first block.
* ``Block.forward`` reduces tokens between attention and MLP when it is given ``r``; called
  the usual way (``blk(x)``) it behaves exactly like timm's block.
* ``Attention.forward`` can also return the keys averaged over heads (the metric) and add
  proportional attention ``log(size)`` to the mask. It keeps timm's choice of
  ``F.scaled_dot_product_attention`` (``fused_attn``) or explicit softmax attention.

The class/distillation/register tokens (``model.num_prefix_tokens``) are protected.
``forward_intermediates`` is not patched and runs without reduction.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import _vit
from ._common import PatchInfo, clear_patch_info, restore_class, set_patch_info, swap_class

FAMILY = "timm"


def matches(model: Any) -> bool:
    """True for a timm ``VisionTransformer`` (or subclass), without importing timm."""
    vit = sys.modules.get("timm.models.vision_transformer")
    return vit is not None and isinstance(model, vit.VisionTransformer)


def apply(model: nn.Module, method: str = "atc", **options: Any) -> None:
    """Patch ``model`` in place; see :func:`atc_patch.apply_patch` for the options."""
    _check_blocks(model)
    config = _vit.make_reduction(method, int(model.num_prefix_tokens), options)
    # Surface schedule errors (e.g. reduction_loc past the last block) now, not at forward.
    config.block_r(len(model.blocks), model.patch_embed.num_patches + config.protected)
    swap_class(model, _ReducingVisionTransformer)
    _vit.set_config(model, config)
    for blk in model.blocks:
        swap_class(blk, _ReducingBlock)
        swap_class(blk.attn, _KeyedAttention)
        _vit.set_config(blk, config)
    if config.trace_source:
        _vit.enable_trace(model)
    set_patch_info(model, PatchInfo(FAMILY, method, _vit.settings_of(config, options)))


def remove(model: nn.Module) -> None:
    """Restore the original classes and drop every attribute :func:`apply` added."""
    for blk in model.blocks:
        restore_class(blk.attn)
        restore_class(blk)
        _vit.clear_config(blk)
    restore_class(model)
    _vit.clear_config(model)
    clear_patch_info(model)


def _check_blocks(model: nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(
                f"block {i} of this {type(model).__name__} is a {type(blk).__name__} with "
                f"{type(getattr(blk, 'attn', None)).__name__}; atc_patch supports timm "
                "VisionTransformer models built from timm.models.vision_transformer.Block "
                "with timm.layers.Attention"
            )


class _ReducingVisionTransformer:
    """Mixin for ``timm.models.vision_transformer.VisionTransformer``."""

    def forward_features(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B, N', C)`` normed tokens, ``N'`` after reduction."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self._atc_run_blocks(x, attn_mask, is_causal)
        return self.norm(x)

    def _atc_run_blocks(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        config = _vit.get_config(self)
        num_tokens = x.shape[1]
        rs = config.block_r(len(self.blocks), num_tokens)
        if is_causal and any(rs):
            raise ValueError("is_causal attention cannot be combined with token reduction")
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        tokens = _vit.Tokens(x, attn_mask=attn_mask)
        for blk, r in zip(self.blocks, rs):
            args = (tokens.x, tokens.attn_mask, is_causal)
            kwargs = {"r": r, "size": tokens.size, "source": tokens.source}
            if use_ckpt:
                tokens = checkpoint(blk, *args, use_reentrant=False, **kwargs)
            else:
                tokens = blk(*args, **kwargs)
        if config.trace_source:
            _vit.store_source(self, tokens, num_tokens)
        return tokens.x


class _ReducingBlock:
    """Mixin for ``timm.models.vision_transformer.Block``: merge between attention and MLP."""

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        r: int | None = None,
        size: Tensor | None = None,
        source: Tensor | None = None,
    ) -> Tensor | _vit.Tokens:
        """Without ``r``: timm's block, ``(B, N, C) -> (B, N, C)``.

        With ``r`` (called by the patched model): ``(B, N, C)`` tokens with ``size``
        ``(B, N, 1)`` and ``source`` ``(B, N, N0)`` -> :class:`~atc_patch.patch._vit.Tokens`
        with ``N - r`` tokens.
        """
        if r is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        config = _vit.get_config(self)
        bias = _vit.size_bias(size, config.prop_attn)
        out = self.attn(
            self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, bias=bias, keys=r > 0
        )
        out, metric = out if r > 0 else (out, None)
        x = x + self.drop_path1(self.ls1(out))
        tokens = _vit.merge_step(config, metric, r, _vit.Tokens(x, size, source, attn_mask))
        x = tokens.x
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return tokens._replace(x=x)


class _KeyedAttention:
    """Mixin for ``timm.layers.Attention``: optionally return keys and add a size bias."""

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        bias: Tensor | None = None,
        keys: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``(B, N, C) -> (B, N, C)``, plus the ``(B, N, head_dim)`` head-averaged keys if
        ``keys``. ``bias`` ``(B, 1, 1, N)`` is added to the attention logits (with ``attn_mask``).
        """
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = _vit.combine_masks(attn_mask, bias, q.dtype)

        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn_bias = _additive_mask(n, attn, mask, is_causal)
            if attn_bias is not None:
                attn = attn + attn_bias
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            out = attn @ v

        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj(out)
        out = self.proj_drop(out)
        return (out, k.mean(1)) if keys else out


def _additive_mask(n: int, attn: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """timm's ``resolve_self_attn_mask``: an SDPA-style mask as an additive bias (or ``None``)."""
    if is_causal:
        return attn.new_full((n, n), float("-inf")).triu_(1)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=attn.dtype).masked_fill_(~mask, float("-inf"))
