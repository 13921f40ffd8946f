"""Token reduction for timm ``VisionTransformer`` models (ViT, DeiT, distilled DeiT, DeiT-III,
MAE-style, register-token ViTs), patched in place.

Three classes are swapped (reversibly, see :func:`~atc_patch.patch._common.swap_class`):

* ``VisionTransformer.forward_features`` runs the blocks itself and threads the per-forward
  token state (sizes, source map, merged attention mask) through them; the schedule is
  evaluated per forward from the number of tokens that enter the first block, and each block's
  ``r`` from the tokens actually left. ``forward_intermediates`` (and so
  ``get_intermediate_layers`` and ``features_only=True`` models) runs the same reduced blocks
  and returns each intermediate unmerged back to the full token grid.
* ``Block.forward`` reduces tokens between attention and MLP when it is given ``r``; called
  the usual way (``blk(x)``) it behaves exactly like timm's block.
* ``Attention.forward`` can also hand out the keys averaged over heads (the metric, through
  the ``keys_out`` list, so it still returns a tensor as timm's does) and add proportional
  attention ``log(size)`` to the mask. It keeps timm's choice of
  ``F.scaled_dot_product_attention`` (``fused_attn``) or explicit softmax attention.

The class/distillation/register tokens (``model.num_prefix_tokens``) are protected.
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


def _vit_of(model: Any) -> Any | None:
    """The ``VisionTransformer`` ``model`` is, or wraps (``features_only=True``), else ``None``."""
    vit = sys.modules.get("timm.models.vision_transformer")
    if vit is None:
        return None
    if isinstance(model, vit.VisionTransformer):
        return model
    features = sys.modules.get("timm.models._features")
    if features is not None and isinstance(model, features.FeatureGetterNet):
        inner = getattr(model, "model", None)
        if isinstance(inner, vit.VisionTransformer):
            return inner
    return None


def matches(model: Any) -> bool:
    """True for a timm ``VisionTransformer`` (or subclass), or a ``features_only=True`` model
    (``FeatureGetterNet``) around one, without importing timm."""
    return _vit_of(model) is not None


def apply(model: nn.Module, method: str = "atc", **options: Any) -> None:
    """Patch ``model`` in place; see :func:`atc_patch.apply_patch` for the options.

    A ``features_only=True`` model is patched through the ``VisionTransformer`` it wraps.
    """
    vit = _vit_of(model)
    _check_blocks(vit)
    protected = int(vit.num_prefix_tokens)
    config = _vit.make_reduction(method, protected, options, family="a timm VisionTransformer")
    # Surface schedule errors (e.g. reduction_loc past the last block) now, not at forward, and
    # warn now about keep_rate targets the method cannot reach at the model's input size.
    num_tokens = vit.patch_embed.num_patches + protected
    config.block_r(len(vit.blocks), num_tokens)
    config.schedule.check_reachable(len(vit.blocks), num_tokens, method, protected)
    swap_class(vit, _ReducingVisionTransformer)
    _vit.set_config(vit, config)
    for blk in vit.blocks:
        swap_class(blk, _ReducingBlock)
        swap_class(blk.attn, _KeyedAttention)
        _vit.set_config(blk, config)
    if config.trace_source:  # one slot: the inner model writes, a wrapper reads it too
        _vit.enable_trace(vit, *([model] if model is not vit else []))
    info = PatchInfo(FAMILY, method, _vit.settings_of(config))
    set_patch_info(vit, info)
    set_patch_info(model, info)


def remove(model: nn.Module) -> None:
    """Restore the original classes and drop every attribute :func:`apply` added."""
    vit = _vit_of(model)
    for blk in vit.blocks:
        restore_class(blk.attn)
        restore_class(blk)
        _vit.clear_config(blk)
    restore_class(vit)
    _vit.clear_config(vit)
    clear_patch_info(vit)
    if model is not vit:
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

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """timm's forward; ``global_pool="avg"`` weighs each token by its size (the input
        patches merged into it), as the ToMe and ATC MAE patches pool: the mean over the input
        patches. (``forward_head`` called on ``forward_features`` cannot see the sizes.)"""
        x = self._atc_embed(x)
        tokens, _ = self._atc_run_blocks(x, attn_mask, is_causal)
        x = self.norm(tokens.x)
        if tokens.size is None or self.global_pool != "avg" or self.attn_pool is not None:
            return self.forward_head(x)
        prefix = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        size = tokens.size[:, prefix:].to(x.dtype)
        x = (x[:, prefix:] * size).sum(dim=1) / size.sum(dim=1)
        return self.head(self.head_drop(self.fc_norm(x)))

    def forward_features(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B, N', C)`` normed tokens, ``N'`` after reduction."""
        x = self._atc_embed(x)
        tokens, _ = self._atc_run_blocks(x, attn_mask, is_causal)
        return self.norm(tokens.x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` with token reduction (same arguments and outputs).

        Every intermediate is the reduced block output unmerged back to the full token grid
        (each patch gets the token it was merged into), so it has the unpatched shape:
        ``(B, C, H, W)`` for ``output_fmt="NCHW"``, ``(B, N0 - prefix, C)`` for ``"NLC"``. The
        final features (when returned) are the reduced ``(B, N', C)`` tokens, as
        :meth:`forward_features` gives them.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        b, _, height, width = x.shape
        x = self._atc_embed(x)
        last = max_index if stop_early else len(self.blocks) - 1
        tokens, taken = self._atc_run_blocks(
            x, attn_mask, is_causal, take=set(take_indices), last=last
        )
        intermediates = [self.norm(y) if norm else y for y in taken]
        prefix = self.num_prefix_tokens
        prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [
                y.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(tokens.x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(tokens.x), intermediates

    def __prepare_scriptable__(self) -> Any:
        _vit.refuse_script(self)

    def _atc_embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _atc_run_blocks(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        take: set[int] | None = None,
        last: int | None = None,
    ) -> tuple[_vit.Tokens, list[Tensor]]:
        """Run blocks ``0 .. last`` (all by default) on ``(B, N0, C)`` tokens ``x``.

        Returns the final :class:`~atc_patch.patch._vit.Tokens` and, for each block index in
        ``take``, its output unmerged to the ``(B, N0, C)`` grid.
        """
        config = _vit.get_config(self)
        reduces = not config.schedule.is_identity()
        _vit.check_traceable(config, reduces)
        num_tokens = x.shape[1]
        steps = config.block_steps(len(self.blocks), num_tokens)
        if is_causal and reduces:
            raise ValueError("is_causal attention cannot be combined with token reduction")
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        grid = _vit.start_grid(x) if take else None
        tokens = _vit.Tokens(x, attn_mask=attn_mask, grid=grid)
        taken = []
        last = len(self.blocks) - 1 if last is None else last
        for i, (blk, step) in enumerate(zip(self.blocks, steps)):
            if i > last:
                break
            args = (tokens.x, tokens.attn_mask, is_causal)
            kwargs = {
                "r": config.r_for(step, tokens.x.shape[1]),
                "size": tokens.size,
                "source": tokens.source,
                "grid": tokens.grid,
            }
            if use_ckpt:
                tokens = checkpoint(blk, *args, use_reentrant=False, **kwargs)
            else:
                tokens = blk(*args, **kwargs)
            if take and i in take:
                taken.append(_vit.to_grid(tokens.x, tokens.grid))
        if config.trace_source:
            _vit.store_source(self, tokens, num_tokens)
        return tokens, taken


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
        grid: Tensor | None = None,
    ) -> Tensor | _vit.Tokens:
        """Without ``r``: timm's block, ``(B, N, C) -> (B, N, C)``.

        With ``r`` (called by the patched model): ``(B, N, C)`` tokens with ``size``
        ``(B, N, 1)``, ``source`` ``(B, N, N0)`` and ``grid`` ``(B, N0)`` ->
        :class:`~atc_patch.patch._vit.Tokens` with ``N - r`` tokens.
        """
        if r is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        config = _vit.get_config(self)
        bias = _vit.size_bias(size, config.prop_attn)
        keys: list[Tensor] | None = [] if r > 0 else None
        out = self.attn(
            self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, bias=bias, keys_out=keys
        )
        metric = keys[0] if keys else None
        x = x + self.drop_path1(self.ls1(out))
        state = _vit.Tokens(x, size, source, attn_mask, grid)
        tokens = _vit.merge_step(config, metric, r, state)
        x = tokens.x
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return tokens._replace(x=x)


class _KeyedAttention:
    """Mixin for ``timm.layers.Attention``: optionally hand out keys and add a size bias."""

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        bias: Tensor | None = None,
        keys_out: list[Tensor] | None = None,
    ) -> Tensor:
        """``(B, N, C) -> (B, N, C)``, as timm's attention (so forward hooks see a tensor).

        ``bias`` ``(B, 1, 1, N)`` is added to the attention logits (with ``attn_mask``). When a
        list is given as ``keys_out``, the ``(B, N, head_dim)`` keys averaged over heads (the
        clustering metric) are appended to it.
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
        if keys_out is not None:
            keys_out.append(k.mean(1))
        return out


def _additive_mask(n: int, attn: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """timm's ``resolve_self_attn_mask``: an SDPA-style mask as an additive bias (or ``None``)."""
    if is_causal:
        return attn.new_full((n, n), float("-inf")).triu_(1)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=attn.dtype).masked_fill_(~mask, float("-inf"))
