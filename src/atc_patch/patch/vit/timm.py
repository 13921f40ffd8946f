"""The timm family: ``VisionTransformer`` models (ViT, DeiT, distilled DeiT, DeiT-III,
MAE-style, register-token ViTs), and ``features_only=True`` models around one.

Instance overrides (every module keeps its class and its ``forward`` signature):

* the model's ``forward_features`` and ``forward_intermediates`` run the blocks with the
  per-forward token state (:mod:`atc_patch.patch.vit`); each intermediate is unmerged back
  to the full token grid; ``__prepare_scriptable__`` refuses ``torch.jit.script``;
* every ``Block.forward`` merges between attention and MLP when the model gives it ``r``
  (called as ``blk(x)`` it is timm's block);
* every ``Attention.forward`` can also hand out its keys averaged over heads and add the
  proportional-attention bias (timm's ``fused_attn`` choice is kept).

The prefix tokens (``model.num_prefix_tokens``) are protected. With nothing to remove and
nothing to trace, the patched forwards run timm's own (so ``torch.fx`` feature extraction
works at ``r=0``)::

    model = timm.create_model("deit_small_patch16_224")
    apply_patch(model, "atc", keep_rate=0.7, reduction_loc=(3, 6, 9))
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._override import original, override, restore_tree
from ..config import PatchInfo, ViTConfig
from . import (
    Tokens,
    TraceSlot,
    ViTPatch,
    check_traceable,
    combine_masks,
    key_padding,
    merge_step,
    refuse_script,
    size_bias,
    start_grid,
    store_source,
    to_grid,
)

NAME = "timm"
CONFIG = ViTConfig
WHAT = "a timm VisionTransformer"
UNUSED = {
    "unmerge": "unmerge is a transformers option; a timm model's forward_intermediates and "
    "features_only outputs are unmerged to the token grid already"
}


def root_of(model: Any) -> nn.Module | None:
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


def apply(root: nn.Module, config: ViTConfig) -> PatchInfo:
    """Patch the ``VisionTransformer`` ``root`` in place (checks first, then overrides)."""
    _check_blocks(root)
    protected = int(root.num_prefix_tokens)
    slot = TraceSlot() if config.trace_source else None
    patch = ViTPatch(config, protected, "timm VisionTransformer", slot)
    patch.check(len(root.blocks), root.patch_embed.num_patches + protected)
    override(root, "forward", _forward, patch, True)
    override(root, "forward_features", _forward, patch, False)
    override(root, "forward_intermediates", _forward_intermediates, patch)
    override(root, "__prepare_scriptable__", refuse_script, patch)
    for blk in root.blocks:
        override(blk, "forward", _block_forward, patch)
        override(blk.attn, "forward", _attention_forward)
    return PatchInfo(NAME, config, {"protected": protected}, state=slot, unused=tuple(UNUSED))


def remove(root: nn.Module) -> None:
    """Undo :func:`apply` (also a partial one)."""
    restore_tree(root)


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


# --- the model ---------------------------------------------------------------------------------


def _forward(
    vit: nn.Module,
    patch: ViTPatch,
    head: bool,
    x: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """timm's ``forward`` (``head=True``: logits) or ``forward_features`` (``(B, N', C)``
    normed tokens, ``N'`` after reduction) of ``(B, 3, H, W)`` images.

    With ``global_pool="avg"`` the head weighs each token by its size (the input patches merged
    into it), as the ToMe and ATC MAE patches pool: the mean over the input patches
    (``forward_head`` called on ``forward_features`` cannot see the sizes)."""
    weighted = vit.global_pool == "avg" and getattr(vit, "attn_pool", None) is None
    if patch.is_passthrough or (head and not weighted):
        name = "forward" if head else "forward_features"
        return original(vit, name)(x, attn_mask=attn_mask, is_causal=is_causal)
    check_traceable(patch, x)
    tokens, _ = _run_blocks(vit, patch, _embed(vit, x), attn_mask, is_causal)
    x = vit.norm(tokens.x)
    if not head:
        return x
    if tokens.size is None:
        return vit.forward_head(x)
    prefix = 0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens
    size = tokens.size[:, prefix:].to(x.dtype)
    x = (x[:, prefix:] * size).sum(dim=1) / size.sum(dim=1)
    return vit.head(vit.head_drop(vit.fc_norm(x)))


def _forward_intermediates(
    vit: nn.Module,
    patch: ViTPatch,
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
    final features (when returned) are the reduced ``(B, N', C)`` tokens.
    """
    if patch.is_passthrough:
        return original(vit, "forward_intermediates")(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only,
            output_dict, attn_mask=attn_mask, is_causal=is_causal,
        )  # fmt: skip
    from timm.models._features import feature_take_indices

    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    check_traceable(patch, x)
    take_indices, max_index = feature_take_indices(len(vit.blocks), indices)
    b, _, height, width = x.shape
    last = max_index if stop_early else len(vit.blocks) - 1
    tokens, taken = _run_blocks(
        vit, patch, _embed(vit, x), attn_mask, is_causal, take=set(take_indices), last=last
    )
    intermediates = [vit.norm(y) if norm else y for y in taken]
    prefix = vit.num_prefix_tokens
    prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
    intermediates = [y[:, prefix:] for y in intermediates]
    if output_fmt == "NCHW":
        h, w = vit.patch_embed.dynamic_feat_size((height, width))
        intermediates = [
            y.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
        ]
    if output_dict:
        result: dict[str, Any] = {"image_intermediates": intermediates}
        if prefix_tokens is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix_tokens
        if not intermediates_only:
            result["image_features"] = vit.norm(tokens.x)
        return result
    if return_prefix_tokens and prefix_tokens is not None:
        intermediates = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return intermediates
    return vit.norm(tokens.x), intermediates


def _embed(vit: nn.Module, x: Tensor) -> Tensor:
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _run_blocks(
    vit: nn.Module,
    patch: ViTPatch,
    x: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool = False,
    take: set[int] | None = None,
    last: int | None = None,
) -> tuple[Tokens, list[Tensor]]:
    """Run blocks ``0 .. last`` (all by default) on ``(B, N0, C)`` tokens ``x``.

    Returns the final :class:`~atc_patch.patch.vit.Tokens` and, for each block index in
    ``take``, its output unmerged to the ``(B, N0, C)`` grid.
    """
    if is_causal and patch.reduces:
        raise ValueError("is_causal attention cannot be combined with token reduction")
    num_tokens = x.shape[1]
    steps = patch.block_steps(len(vit.blocks), num_tokens)
    use_ckpt = vit.grad_checkpointing and vit.training and torch.is_grad_enabled()
    grid = start_grid(x) if take else None
    tokens = Tokens(x, attn_mask=attn_mask, grid=grid, valid=key_padding(attn_mask, x.shape[0]))
    taken = []
    last = len(vit.blocks) - 1 if last is None else last
    for i, (blk, step) in enumerate(zip(vit.blocks, steps)):
        if i > last:
            break
        r = patch.r_for(step, tokens.x.shape[1])
        if use_ckpt:
            tokens = checkpoint(
                blk, tokens.x, None, is_causal, r=r, tokens=tokens, use_reentrant=False
            )
        else:
            tokens = blk(tokens.x, None, is_causal, r=r, tokens=tokens)
        if take and i in take:
            taken.append(to_grid(tokens.x, tokens.grid))
    store_source(patch, tokens, num_tokens)
    return tokens, taken


# --- blocks and attention -----------------------------------------------------------------------


def _block_forward(
    blk: nn.Module,
    patch: ViTPatch,
    x: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    *,
    r: int | None = None,
    tokens: Tokens | None = None,
) -> Tensor | Tokens:
    """Without ``r``: timm's block, ``(B, N, C) -> (B, N, C)``.

    With ``r`` (called by the patched model): ``(B, N, C)`` tokens ``x`` with the rest of
    their state in ``tokens`` -> :class:`~atc_patch.patch.vit.Tokens` with ``N - r`` tokens.
    """
    if r is None or tokens is None:
        return original(blk, "forward")(x, attn_mask=attn_mask, is_causal=is_causal)
    bias = size_bias(tokens.size, patch.config.prop_attn)
    keys: list[Tensor] | None = [] if r > 0 else None
    out = blk.attn(
        blk.norm1(x), attn_mask=tokens.attn_mask, is_causal=is_causal, bias=bias, keys_out=keys
    )
    x = x + blk.drop_path1(blk.ls1(out))
    merged = merge_step(patch, keys[0] if keys else None, r, tokens._replace(x=x))
    x = merged.x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(merged.x))))
    return merged._replace(x=x)


def _attention_forward(
    attn: nn.Module,
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
    clustering metric) are appended to it. Without either it is timm's forward.
    """
    if bias is None and keys_out is None:
        return original(attn, "forward")(x, attn_mask=attn_mask, is_causal=is_causal)
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = combine_masks(attn_mask, bias, q.dtype)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        weights = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=weights.dtype).masked_fill_(~mask, -torch.inf)
            weights = weights + mask
        out = attn.attn_drop(weights.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    if keys_out is not None:
        keys_out.append(k.mean(1))
    return out
