"""The transformers family's per-forward run: the owner's loop over the layers and the layer
with a merge between attention and MLP (see :mod:`.transformers`).

The owner's patched forward calls :func:`encode`, which passes the token state
(:class:`~atc_patch.patch.vit.Tokens`) from layer to layer; a layer reads its sublayers from
its table row (``_LAYERS`` in :mod:`.transformers`) and runs the attention module unchanged:
proportional attention is its additive ``attention_mask``, rotary position terms
(``position_embeddings``, DINOv3) are the token state's ``pos`` and follow every merge, the
metric is the keys averaged over heads, ``h`` times the head-averaged key weights::

    tokens = encode(owner, patch, owner.layer, hidden_states, mask, kwargs, pos=(cos, sin))
    x, size = finish(patch, tokens)           # (B, N', C), or (B, N0, C) with unmerge=True
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._override import original
from . import (
    Tokens,
    ViTPatch,
    attention_dtype,
    check_traceable,
    combine_masks,
    key_padding,
    merge_step,
    size_bias,
    store_source,
)

# Backends that take the proportional-attention bias as an additive float mask. flex_attention
# is left out: a tensor mask makes it crash on the CPU (torch 2.14, unpatched models too).
BIAS_BACKENDS = ("eager", "sdpa")


def check_backend(impl: str) -> None:
    if impl not in BIAS_BACKENDS:
        raise ValueError(
            f"prop_attn=True adds log(size) to the attention logits, which attn_implementation "
            f"{impl!r} cannot take; use one of {BIAS_BACKENDS} (model.set_attn_implementation) "
            "or apply_patch(..., prop_attn=False)"
        )


# --- the owner's loop ---------------------------------------------------------------------------


def encode(
    owner: nn.Module,
    patch: ViTPatch,
    layers: nn.ModuleList,
    x: Tensor,
    mask: Any,
    kwargs: dict,
    pos: Any = None,
) -> Tokens:
    """Run ``layers`` on ``(B, N, C)`` tokens with reduction; returns the final ``Tokens``.

    ``mask``: the layers' ``attention_mask`` (it follows the merges; padding never merges with
    a real token). ``pos``: the layers' ``position_embeddings`` (rotary ``(cos, sin)`` of the
    unprotected tokens), merged along with the tokens.
    """
    check_traceable(patch, x)
    num_tokens = x.shape[1]
    steps = patch.block_steps(len(layers), num_tokens)
    if patch.reduces and mask is not None and not isinstance(mask, Tensor):
        raise ValueError(f"a {type(mask).__name__} attention mask cannot follow merged tokens")
    tokens = Tokens(x, attn_mask=mask, valid=key_padding(mask, x.shape[0]), pos=pos)
    for layer, step in zip(layers, steps):
        r = patch.r_for(step, tokens.x.shape[1])
        extra = {} if tokens.pos is None else {"position_embeddings": tokens.pos}
        x, *rest = layer(tokens.x, tokens.attn_mask, r=r, tokens=tokens, **kwargs, **extra)
        # A reentrant checkpoint returns a plain tuple of differentiable tensors: rebuild the
        # named tuple with the sizes, source map and masks (never trained) detached.
        tokens = Tokens(x, *(t.detach() if isinstance(t, Tensor) else t for t in rest))
    store_source(patch, tokens, num_tokens)
    return tokens


def finish(patch: ViTPatch, tokens: Tokens) -> tuple[Tensor, Tensor | None]:
    """``(x, size)`` for the model's head: the reduced tokens and their sizes, or with
    ``unmerge`` ``(B, N0, C)``, every input token a copy of its cluster, and ``None``."""
    if not patch.config.unmerge or tokens.source is None:
        return tokens.x, tokens.size
    slot = tokens.source.argmax(1)  # (B, N0): the output token holding each input token
    return tokens.x.gather(1, slot[..., None].expand(-1, -1, tokens.x.shape[-1])), None


def padding_mask(owner: nn.Module, patch: ViTPatch, x: Tensor, attention_mask: Any) -> Any:
    """transformers' bidirectional mask; ``None`` for flex attention's full ``BlockMask`` when
    tokens are reduced (the same attention, and ``None`` can follow the merges)."""
    from transformers.masking_utils import create_bidirectional_mask

    c = owner.config
    if attention_mask is None and c._attn_implementation == "flex_attention" and patch.reduces:
        return None
    return create_bidirectional_mask(config=c, inputs_embeds=x, attention_mask=attention_mask)


# --- layers ---------------------------------------------------------------------------------------


def layer_forward(
    layer: nn.Module,
    patch: ViTPatch,
    table: tuple[str, ...],
    hidden_states: Tensor,
    attention_mask: Any = None,
    *,
    r: int | None = None,
    tokens: Tokens | None = None,
    **kwargs: Any,
) -> Tensor | Tokens:
    """Without ``r``: transformers' layer, ``(B, N, C) -> (B, N, C)``.

    With ``r`` (called by the owner): ``(B, N, C)`` tokens with the rest of their state in
    ``tokens`` -> :class:`~atc_patch.patch.vit.Tokens` with ``N - r`` tokens.
    """
    if r is None or tokens is None or (r == 0 and tokens.size is None):
        out = original(layer, "forward")(hidden_states, attention_mask, **kwargs)
        return out if tokens is None else tokens._replace(x=out)
    body = functools.partial(_merge_layer, layer, patch, table, r=r, tokens=tokens, **kwargs)
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(body, hidden_states, attention_mask)
    return body(hidden_states, attention_mask)


def _merge_layer(
    layer: nn.Module,
    patch: ViTPatch,
    table: tuple[str, ...],
    hidden_states: Tensor,
    attention_mask: Any,
    *,
    r: int,
    tokens: Tokens,
    **kwargs: Any,
) -> Tokens:
    """The layer with a merge between attention and MLP (see ``_LAYERS``)."""
    n1, a, after_attn, n2, m, after_mlp = table
    norm1, attn, norm2, mlp = (getattr(layer, name) for name in (n1, a, n2, m))
    h = norm1(hidden_states)
    mask = _attention_mask(attn, attention_mask, size_bias(tokens.size, patch.config.prop_attn), h)
    x = hidden_states + _chain(layer, after_attn, attn(h, attention_mask=mask, **kwargs)[0])
    metric = _mean_keys(attn, h) if r > 0 else None
    merged = merge_step(patch, metric, r, tokens._replace(x=x, attn_mask=attention_mask))
    return merged._replace(x=merged.x + _chain(layer, after_mlp, mlp(norm2(merged.x))))


def _chain(layer: nn.Module, names: str, x: Tensor) -> Tensor:
    for name in names.split():
        x = getattr(layer, name)(x)
    return x


def _attention_mask(attn: nn.Module, mask: Any, bias: Tensor | None, h: Tensor) -> Any:
    """The layer's ``attention_mask`` plus the ``(B, 1, 1, N)`` proportional-attention ``bias``."""
    if bias is None:
        return mask
    check_backend(attn.config._attn_implementation)
    return combine_masks(mask, bias, attention_dtype(h))


def _mean_keys(attn: nn.Module, h: Tensor) -> Tensor:
    """Keys of ``h`` ``(B, N, C)`` averaged over heads: ``(B, N, head_dim)``."""
    proj, d = attn.k_proj, attn.head_dim
    weight = proj.weight.view(-1, d, proj.weight.shape[-1]).mean(0)
    return F.linear(h, weight, None if proj.bias is None else proj.bias.view(-1, d).mean(0))
