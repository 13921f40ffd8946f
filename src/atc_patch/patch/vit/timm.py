"""The timm family: ``VisionTransformer`` (ViT, DeiT, distilled DeiT, DeiT-III, MAE-style,
register-token ViTs), ``Eva`` (EVA-02, DINOv3, PE, RoPE-ViTs: :mod:`.timm_eva`) and
``NaFlexVit`` (:mod:`.timm_naflex`), and ``features_only=True`` models around one.

Each model class is an entry of :data:`MODELS` (its module patches the model-level methods)
and each block class an entry of its model's block table (what runs on merged tokens).
Instance overrides (every module keeps its class and its ``forward`` signature):

* the model's ``forward``, ``forward_features`` and ``forward_intermediates`` run the blocks
  with the per-forward token state (:mod:`atc_patch.patch.vit`, :func:`run_blocks`); each
  intermediate is unmerged back to the full token grid; ``__prepare_scriptable__`` refuses
  ``torch.jit.script``;
* every block's ``forward`` merges between attention and MLP when the model gives it ``r``
  (called as ``blk(x)`` it is timm's block); here ``Block`` with ``Attention``, whose
  ``forward`` can also hand out its keys averaged over heads and add the proportional-attention
  bias (timm's ``fused_attn`` choice is kept).

The prefix tokens (``model.num_prefix_tokens``) are protected. With nothing to remove and
nothing to trace, the patched forwards run timm's own (so ``torch.fx`` feature extraction
works at ``r=0``)::

    model = timm.create_model("deit_small_patch16_224")
    apply_patch(model, "atc", keep_rate=0.7, reduction_loc=(3, 6, 9))
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
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
    attention_dtype,
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
WHAT = "a timm ViT"
UNUSED = {
    "unmerge": "unmerge is a transformers option; a timm model's forward_intermediates and "
    "features_only outputs are unmerged to the token grid already"
}


# model class -> (the timm module defining it, the atc_patch module patching it: "" = this one)
MODELS = {
    "VisionTransformer": ("timm.models.vision_transformer", ""),
    "Eva": ("timm.models.eva", ".timm_eva"),
    "NaFlexVit": ("timm.models.naflexvit", ".timm_naflex"),
}


def _model_class(model: Any) -> str | None:
    """The :data:`MODELS` key of the timm class ``model`` is an instance of, else ``None``."""
    for name, (module, _) in MODELS.items():
        lib = sys.modules.get(module)
        if lib is not None and isinstance(model, getattr(lib, name)):
            return name
    return None


def root_of(model: Any) -> nn.Module | None:
    """The supported timm model ``model`` is, or wraps (``features_only=True``), else ``None``."""
    if _model_class(model) is not None:
        return model
    features = sys.modules.get("timm.models._features")
    if features is not None and isinstance(model, features.FeatureGetterNet):
        inner = getattr(model, "model", None)
        if _model_class(inner) is not None:
            return inner
    return None


def apply(root: nn.Module, config: ViTConfig) -> PatchInfo:
    """Patch the timm model ``root`` in place (checks first, then overrides)."""
    name = _model_class(root)
    entry = MODELS[name][1]
    module = sys.modules[__name__] if not entry else importlib.import_module(entry, __package__)
    protected = int(root.num_prefix_tokens)
    slot = TraceSlot() if config.trace_source else None
    patch = ViTPatch(config, protected, f"timm {name}", slot)
    module.patch_model(root, patch)
    return PatchInfo(NAME, config, {"protected": protected}, state=slot, unused=tuple(UNUSED))


def remove(root: nn.Module) -> None:
    """Undo :func:`apply` (also a partial one)."""
    restore_tree(root)


def patch_model(vit: nn.Module, patch: ViTPatch) -> None:
    """The ``VisionTransformer`` entry: checks, then the model's and its blocks' overrides."""
    blocks = vit_blocks()
    check_blocks(vit, blocks)
    patch.check(len(vit.blocks), vit.patch_embed.num_patches + patch.protected)
    override(vit, "forward", _forward, patch, True)
    override(vit, "forward_features", _forward, patch, False)
    override(vit, "forward_intermediates", _forward_intermediates, patch)
    override(vit, "__prepare_scriptable__", refuse_script, patch)
    patch_blocks(vit, patch, blocks)


BlockTable = dict[str, tuple[Callable[..., None], tuple[type, ...]]]


def vit_blocks() -> BlockTable:
    """The block table of ``VisionTransformer``: ``Block`` with ``Attention``."""
    from timm.layers import Attention

    return {"timm.models.vision_transformer.Block": (patch_vit_block, (Attention,))}


def check_blocks(model: nn.Module, table: BlockTable) -> None:
    """Raise ``TypeError`` unless every block of ``model`` is a class of ``table`` (qualified
    name -> (its patch function, the attention classes it takes)) with one of its attentions."""
    for i, blk in enumerate(model.blocks):
        kind = f"{type(blk).__module__}.{type(blk).__name__}"
        entry = table.get(kind)
        if entry is None or type(getattr(blk, "attn", None)) not in entry[1]:
            names = ", ".join(
                f"{k} with {' or '.join(a.__name__ for a in v[1])}" for k, v in table.items()
            )
            raise TypeError(
                f"block {i} of this {type(model).__name__} is a {type(blk).__name__} with "
                f"{type(getattr(blk, 'attn', None)).__name__}; atc_patch supports timm "
                f"{type(model).__name__} models built from {names}"
            )


def patch_blocks(model: nn.Module, patch: ViTPatch, table: BlockTable, *bound: Any) -> None:
    """Override every block of ``model`` with its :data:`BlockTable` entry (checked first)."""
    for blk in model.blocks:
        table[f"{type(blk).__module__}.{type(blk).__name__}"][0](blk, patch, *bound)


def patch_vit_block(blk: nn.Module, patch: ViTPatch, *_: Any) -> None:
    override(blk, "forward", _block_forward, patch)
    override(blk.attn, "forward", _attention_forward)


# --- the model ---------------------------------------------------------------------------------


def _forward(
    vit: nn.Module,
    patch: ViTPatch,
    head: bool,
    x: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """timm's ``forward`` (``head=True``; its pooling weighs each token by its size, see
    :func:`forward_head`, which ``forward_head(forward_features(x))`` cannot see) or
    ``forward_features``: ``(B, 3, H, W)`` images -> ``(B, N', C)`` normed tokens."""
    if patch.is_passthrough:
        name = "forward" if head else "forward_features"
        return original(vit, name)(x, attn_mask=attn_mask, is_causal=is_causal)
    check_traceable(patch, x)
    tokens, _ = run_blocks(vit, patch, _tokens(vit, x, attn_mask), is_causal)
    x = vit.norm(tokens.x)
    return forward_head(vit, patch, x, tokens) if head else x


def _forward_intermediates(
    vit: nn.Module, patch: ViTPatch, x: Tensor, indices: int | list[int] | None = None,
    return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
    output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
    attn_mask: Tensor | None = None, is_causal: bool = False,
) -> Any:  # fmt: skip
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
    return reduced_intermediates(
        vit, patch, x, lambda: _tokens(vit, x, attn_mask), is_causal, indices, stop_early,
        output_fmt, norm, return_prefix_tokens, intermediates_only, output_dict,
    )  # fmt: skip


def reduced_intermediates(
    vit: nn.Module, patch: ViTPatch, x: Tensor, embed: Callable[[], Tokens], is_causal: bool,
    indices: int | list[int] | None, stop_early: bool, output_fmt: str, norm: bool,
    return_prefix_tokens: bool, intermediates_only: bool, output_dict: bool = False,
) -> Any:  # fmt: skip
    """The reduced ``forward_intermediates`` of a model whose patch embedding takes ``(B, 3,
    H, W)`` images ``x``: run the blocks on ``embed()`` and unmerge the intermediates."""
    check_format(output_fmt)
    check_traceable(patch, x)
    take, last = take_indices(vit, indices, stop_early)
    tokens, taken = run_blocks(vit, patch, embed(), is_causal, take, last)
    hw = vit.patch_embed.dynamic_feat_size(x.shape[-2:])
    return intermediates_out(
        vit, tokens, taken, hw, output_fmt, norm, return_prefix_tokens, intermediates_only,
        output_dict,
    )  # fmt: skip


def _tokens(vit: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tokens:
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    return Tokens(x, attn_mask=attn_mask, valid=key_padding(attn_mask, x.shape[0]))


# --- what the models share ---------------------------------------------------------------------


def run_blocks(
    vit: nn.Module,
    patch: ViTPatch,
    tokens: Tokens,
    is_causal: bool = False,
    take: set[int] | None = None,
    last: int | None = None,
) -> tuple[Tokens, list[Tensor]]:
    """Run blocks ``0 .. last`` (all by default) of ``vit`` on the embedded ``tokens``
    (``(B, N0, C)``, with their mask, padding and position terms).

    Every block is called as ``blk(x, r=r, tokens=tokens, is_causal=is_causal)`` and returns
    the next :class:`~atc_patch.patch.vit.Tokens`. Returns the final tokens and, for each block
    index in ``take``, its output unmerged to the ``(B, N0, C)`` grid.
    """
    if is_causal and patch.reduces:
        raise ValueError("is_causal attention cannot be combined with token reduction")
    num_tokens = tokens.x.shape[1]
    steps = patch.block_steps(len(vit.blocks), num_tokens)
    use_ckpt = vit.grad_checkpointing and vit.training and torch.is_grad_enabled()
    if take:
        tokens = tokens._replace(grid=start_grid(tokens.x))
    taken = []
    last = len(vit.blocks) - 1 if last is None else last
    for i, (blk, step) in enumerate(zip(vit.blocks, steps)):
        if i > last:
            break
        r = patch.r_for(step, tokens.x.shape[1])
        if use_ckpt:
            tokens = checkpoint(
                blk, tokens.x, r=r, tokens=tokens, is_causal=is_causal, use_reentrant=False
            )
        else:
            tokens = blk(tokens.x, r=r, tokens=tokens, is_causal=is_causal)
        if take and i in take:
            taken.append(to_grid(tokens.x, tokens.grid))
    store_source(patch, tokens, num_tokens)
    return tokens, taken


def check_format(output_fmt: str, formats: tuple[str, ...] = ("NCHW", "NLC")) -> None:
    if output_fmt not in formats:
        raise ValueError(f"output_fmt must be one of {formats}, got {output_fmt!r}")


def take_indices(vit: nn.Module, indices: Any, stop_early: bool) -> tuple[set[int], int]:
    """timm's block indices to take and the last block to run."""
    from timm.models._features import feature_take_indices

    take, max_index = feature_take_indices(len(vit.blocks), indices)
    return set(take), max_index if stop_early else len(vit.blocks) - 1


def intermediates_out(
    vit: nn.Module,
    tokens: Tokens,
    taken: list[Tensor],
    hw: tuple[int, int] | None,
    output_fmt: str,
    norm: bool,
    return_prefix_tokens: bool,
    intermediates_only: bool,
    output_dict: bool = False,
    extra: dict[str, Any] | None = None,
) -> Any:
    """timm's ``forward_intermediates`` outputs from the unmerged ``(B, N0, C)`` block outputs
    ``taken`` and the final ``tokens``: prefix tokens split off, ``NCHW`` on the ``hw`` grid,
    the final features the reduced ``(B, N', C)`` tokens; ``extra`` entries in the dict."""
    intermediates = [vit.norm(y) if norm else y for y in taken]
    prefix = vit.num_prefix_tokens
    prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
    intermediates = [y[:, prefix:] for y in intermediates]
    if output_fmt == "NCHW":
        h, w = hw
        intermediates = [
            y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
        ]
    if output_dict:
        result: dict[str, Any] = {"image_intermediates": intermediates}
        if prefix_tokens is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix_tokens
        result.update(extra or {})
        if not intermediates_only:
            result["image_features"] = vit.norm(tokens.x)
        return result
    if return_prefix_tokens and prefix_tokens is not None:
        intermediates = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return intermediates
    return vit.norm(tokens.x), intermediates


def forward_head(
    vit: nn.Module,
    patch: ViTPatch,
    x: Tensor,
    tokens: Tokens,
    own_head: Callable[[Tensor], Tensor] | None = None,
    map_prefix: bool | None = None,
) -> Tensor:
    """The classifier head on the normed reduced tokens ``x`` ``(B, N', C)``, weighing each
    token by its size (the input patches merged into it), as the ToMe and ATC MAE patches pool:
    ``global_pool="avg"`` is the size-weighted mean of the (valid) patch tokens, ``"map"``
    (attention pooling) gets ``log(size)`` on its keys with ``prop_attn`` and padding masked.
    Other poolings (and no merge yet) are the model's own (``own_head``, default
    ``vit.forward_head``). ``map_prefix``: the attention pool sees the prefix tokens (default
    ``vit.pool_include_prefix``)."""
    head = own_head or vit.forward_head
    pool = vit.global_pool if vit.attn_pool is None else "map"
    if tokens.size is None or pool not in ("avg", "map"):
        return head(x)
    include = getattr(vit, "pool_include_prefix", False)
    include = include if pool == "avg" or map_prefix is None else map_prefix
    start = 0 if include else vit.num_prefix_tokens
    x, size = x[:, start:], tokens.size[:, start:].to(x.dtype)
    valid = None if tokens.valid is None else tokens.valid[:, start:, None]
    if pool == "avg":
        weight = size if valid is None else size * valid
        pooled = (x * weight).sum(dim=1) / weight.sum(dim=1)
    else:
        bias = size.log() if patch.config.prop_attn else torch.zeros_like(size)
        if valid is not None:
            bias = bias.masked_fill(~valid, torch.finfo(bias.dtype).min)
        pooled = vit.attn_pool(x, attn_mask=bias.to(attention_dtype(x)).transpose(1, 2)[:, None])
    return vit.head(vit.head_drop(vit.fc_norm(pooled)))


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
