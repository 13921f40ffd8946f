"""K/V merging (``merge="kv"``): attention keeps every query, the image keys and values become
the cluster means of the block's plan, and each merged key's logit gets ``+ log(size)``.

Under ``merge="kv"`` every attention sublayer of a block (a spanned module with a diffusers
attention ``processor``) gets :func:`kv_around` as its ``forward``; the other spans keep token
merging (:func:`sublayers`: ``merge_mlp``'s MLP and the like, each unmerged right after it).
:func:`kv_around` runs the sublayer as it is, and its ``F.scaled_dot_product_attention`` call
over its own tokens (the text, in front of or after the image stream or in a separate stream,
the image tokens, references or padding) is answered by :class:`KVAttention`: the image part of
``key`` and ``value`` ``(B, H, S, D)`` is merged into ``(B, H, M, D)`` cluster means (after the
projections, norms and rotary embeddings, so a merged key is the mean of its members' rotated
keys; every other key stays as it is), and ``log(size)`` is added to the merged keys' logits
through an additive ``attn_mask`` (an existing mask is merged over the image keys by
``amax``). Nothing is unmerged or scattered afterwards: the output has a row per query. A
cluster of ``n`` identical tokens gives exactly the unmerged attention (``n`` equal logits
weigh as one logit plus ``log n``).

This works with every attention processor that computes attention with torch's
``scaled_dot_product_attention``: diffusers' ``AttnProcessor2_0``, ``JointAttnProcessor2_0``,
``FluxAttnProcessor`` and the IP-Adapter processors on diffusers' native attention backends.
A sublayer whose attention goes elsewhere (xFormers, the flash / sage backends, the math
``AttnProcessor``) raises a ``ValueError`` naming it instead of running unmerged::

    override(block.attn1, "forward", kv_around, Span(), index)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ...kernel.plan import MergePlan
from .._override import original
from . import core
from .merge import Span, _get, merge_around, warn_unmerged

# F.scaled_dot_product_attention's parameters (a builtin: no signature to inspect).
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sublayers(spec: core.BlockSpec, block: nn.Module) -> list[tuple[str, Callable[..., Any], Span]]:
    """``(attribute, forward, span)`` of the sublayers of ``spec`` in ``block``:
    :func:`merge_around`, or under ``merge="kv"`` :func:`kv_around` for the self- and joint
    attention modules (those with a diffusers attention ``processor``, not ``Span.cross``); the
    other spans then merge and unmerge their own tokens (a span that only unmerged others'
    outputs has nothing left to do)."""
    if spec.config.merge != "kv":
        return [(name, merge_around, span) for name, span in spec.spans]
    out = []
    for name, span in spec.spans:
        if hasattr(getattr(block, name), "processor") and not span.cross:
            out.append((name, kv_around, span))
        elif span.merge_in:  # (a span that only unmerges others' outputs has nothing to do)
            out.append((name, merge_around, dataclasses.replace(span, unmerge_out=True)))
    return out


def kv_around(module: nn.Module, span: Span, index: int, *args: Any, **kwargs: Any) -> Any:
    """The ``forward`` of an attention sublayer of patched block ``index`` under
    ``merge="kv"`` (see the module docstring)."""
    forward = original(module, "forward")
    active = core.active_block(index)
    plan = None if active is None else core.block_plan(active)
    if plan is None:
        return forward(*args, **kwargs)
    x = args[0] if args else kwargs["hidden_states"]
    text = _get(args, kwargs, span.text)
    b, n, start = plan.labels.shape[0], plan.num_in, active.start(span.after_text)
    cross = span.mask == "keys" and text is not None
    if x.dim() != 3 or x.shape[0] != b or x.shape[1] < start + n or cross:
        warn_unmerged(
            module,
            f"hidden states of shape {tuple(x.shape)}, not its own (B, N) = {(b, start + n)} "
            "tokens as keys",
            "merge='kv'; e.g. cross-attention in a self-attention slot",
        )
        return forward(*args, **kwargs)
    extra = int(text.shape[1]) if isinstance(text, Tensor) else 0  # a separate text stream
    keys = int(x.shape[1]) + extra
    mode = KVAttention(plan, keys, start + (extra if span.image_keys == "last" else 0))
    with mode:
        out = forward(*args, **kwargs)
    if not mode.hits:
        processor = type(getattr(module, "processor", module)).__name__
        raise ValueError(
            f"merge='kv' merges the keys and values of torch's scaled_dot_product_attention, "
            f"which this {type(module).__name__} ({processor}) did not call over its {keys} "
            "tokens (xFormers, flash / sage attention backends and the math AttnProcessor "
            "compute attention elsewhere): use diffusers' native attention backend "
            "(AttnProcessor2_0 and the like) or merge='tokens'"
        )
    return out


class KVAttention(TorchFunctionMode):
    """While active, a ``F.scaled_dot_product_attention`` call with ``keys`` queries and keys
    runs on merged image keys and values (see the module docstring); ``hits`` counts them.

    Args:
        plan: the block's plan over its ``N`` image tokens.
        keys: the attention's sequence length (text, image stream and anything else).
        start: where the ``N`` image tokens begin among the keys.
    """

    def __init__(self, plan: MergePlan, keys: int, start: int) -> None:
        super().__init__()
        self.plan = plan
        self.keys = keys
        self.start = start
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_ARGS, args, strict=False), **kwargs)
            q, k = bound["query"], bound["key"]
            if k.dim() == 4 and k.shape[-2] == q.shape[-2] == self.keys:
                self.hits += 1
                return func(**self._merged(bound))
        return func(*args, **kwargs)

    def _merged(self, sdpa: dict[str, Any]) -> dict[str, Any]:
        """``sdpa``'s arguments with merged image keys and values and the ``log(size)`` bias."""
        if sdpa.get("is_causal"):
            raise ValueError("merge='kv' does not apply to causal attention")
        plan, q, k, v = self.plan, sdpa["query"], sdpa["key"], sdpa["value"]
        a, e, s = self.start, self.start + plan.num_in, k.shape[-2]
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = plan.sizes().to(wide).log().to(q.dtype)  # (B, M)
        k, v = (_around(t, a, e, _merge_heads(plan, t[..., a:e, :]), -2) for t in (k, v))
        zeros = bias.new_zeros(bias.shape[0], s)
        mask = _around(zeros, a, e, bias, -1)[:, None, None, :]  # (B, 1, 1, S - N + M)
        if sdpa.get("attn_mask") is not None:
            mask = mask + _merge_mask(plan, sdpa["attn_mask"], a, e, q.dtype)
        return dict(sdpa, key=k, value=v, attn_mask=mask, is_causal=False)


def _around(x: Tensor, a: int, e: int, middle: Tensor, dim: int) -> Tensor:
    """``x`` with its entries ``a:e`` along ``dim`` replaced by ``middle`` (no copy if they
    are all of ``x``)."""
    if a == 0 and e == x.shape[dim]:
        return middle
    parts = [x.narrow(dim, 0, a), middle, x.narrow(dim, e, x.shape[dim] - e)]
    return torch.cat([p for p in parts if p.shape[dim]], dim)


def _merge_heads(plan: MergePlan, x: Tensor) -> Tensor:
    """Cluster means of ``x`` ``(B, H, N, D)`` over the tokens: ``(B, H, num_out, D)`` (the
    usual layout, a head view of ``(B, N, H * D)``, needs no copy to get there)."""
    b, h, n, d = x.shape
    flat = x.transpose(1, 2).reshape(b, n, h * d)
    return plan.merge(flat).view(b, plan.num_out, h, d).transpose(1, 2)


def _merge_mask(plan: MergePlan, mask: Tensor, a: int, e: int, dtype: torch.dtype) -> Tensor:
    """An attention mask ``(..., S)`` (bool or additive, broadcastable to ``(B, H, Sq, S)``) as
    an additive mask over the merged keys: the image columns reduced by ``amax`` per cluster
    (a merged key is as visible as its most visible token)."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )
    b = plan.labels.shape[0]
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, -1, -1, -1)
    part = mask[..., a:e]
    lead = part.shape[1:3]
    flat = part.reshape(b, -1, plan.num_in).transpose(1, 2)  # (B, N, H' * Sq')
    merged = plan.merge(flat, mode="amax").transpose(1, 2).reshape(b, *lead, plan.num_out)
    return _around(mask, a, e, merged, -1)


def _warn_unmerged(module: nn.Module, got: tuple[int, ...], want: tuple[int, int]) -> None:
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"merge='kv': a {type(module).__name__} of a patched block got hidden states of "
            f"shape {got}, not its own (B, N) = {want} tokens as keys (e.g. cross-attention "
            "in a self-attention slot): it runs unmerged",
            stacklevel=4,
        )
