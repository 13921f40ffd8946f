"""K/V merging (``merge="kv"``): attention keeps every query, the image keys and values become
the cluster means of the block's plan, and each merged key's logit gets ``+ log(size)``.

Under ``merge="kv"`` a sublayer that attends over the block's image tokens (a
:class:`~.merge.Span` with ``mask="keys"``: self-attention, or ``mask="reject"``: joint
text+image attention) gets :func:`kv_around` as its ``forward``; the other sublayers keep
token merging (:func:`sublayers`: ``merge_crossattn``'s queries and ``merge_mlp``'s MLP, each
unmerged right after it). :func:`kv_around` runs the sublayer as it is, and its
``F.scaled_dot_product_attention`` call over its own tokens (queries and keys: a never-merged
prefix, the image tokens and, in joint attention, the text) is answered by
:class:`KVAttention`: the image part of ``key`` and ``value`` ``(B, H, S, D)`` is merged into
``(B, H, M, D)`` cluster means (after the projections, norms and rotary embeddings, so a
merged key is the mean of its members' rotated keys; the text keys stay as they are), and
``log(size)`` is added to the merged keys' logits through an additive ``attn_mask`` (an
existing mask is merged over the image keys by ``amax``). Nothing is unmerged or scattered
afterwards: the output has a row per query. A cluster of ``n`` identical tokens gives exactly
the unmerged attention (``n`` equal logits weigh as one logit plus ``log n``).

This works with every attention processor that computes attention with torch's
``scaled_dot_product_attention``: diffusers' ``AttnProcessor2_0``, ``JointAttnProcessor2_0``,
``FluxAttnProcessor`` and the IP-Adapter processors on diffusers' native attention backends.
A sublayer whose attention goes elsewhere (xFormers, the flash / sage backends, the math
``AttnProcessor``) raises a ``ValueError`` naming it instead of running unmerged::

    override(block.attn1, "forward", kv_around, Span(mask="keys"), index)
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
from .merge import Span, merge_around

# F.scaled_dot_product_attention's parameters (a builtin: no signature to inspect).
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sublayers(spec: core.BlockSpec) -> list[tuple[str, Callable[..., Any], Span]]:
    """``(attribute, forward, span)`` of the sublayers of ``spec``: :func:`merge_around`, or
    under ``merge="kv"`` :func:`kv_around` for attention over the image tokens (and the spans
    that only carried merged outputs to a later unmerge then unmerge right away)."""
    if spec.config.merge != "kv":
        return [(name, merge_around, span) for name, span in spec.spans]
    out = []
    for name, span in spec.spans:
        if span.mask in ("keys", "reject"):
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
    text = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    b, n = plan.labels.shape[0], active.prefix + plan.num_in
    if x.dim() != 3 or tuple(x.shape[:2]) != (b, n) or (span.mask == "keys" and text is not None):
        _warn_unmerged(module, tuple(x.shape), (b, n))
        return forward(*args, **kwargs)
    keys = n + (int(text.shape[1]) if text is not None else 0)
    mode = KVAttention(plan, keys, span.image_keys == "first")
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
        keys: the attention's sequence length (prefix + image tokens + text).
        image_first: the image tokens are the first ``N`` keys (SD3's joint attention), not
            the last ``N`` (Flux: text first; self-attention: the prefix first).
    """

    def __init__(self, plan: MergePlan, keys: int, image_first: bool) -> None:
        super().__init__()
        self.plan = plan
        self.keys = keys
        self.image_first = image_first
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
        n, s = plan.num_in, k.shape[-2]
        image = slice(0, n) if self.image_first else slice(s - n, s)
        rest = slice(n, s) if self.image_first else slice(0, s - n)
        k_m, v_m = _merge_heads(plan, k[..., image, :]), _merge_heads(plan, v[..., image, :])
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = plan.sizes().to(wide).log().to(q.dtype)  # (B, M)
        if s == n:  # self-attention without a prefix: the image tokens are every key
            k, v = k_m, v_m
        elif self.image_first:
            k, v = torch.cat([k_m, k[..., rest, :]], -2), torch.cat([v_m, v[..., rest, :]], -2)
            bias = torch.cat([bias, bias.new_zeros(bias.shape[0], s - n)], dim=-1)
        else:
            k, v = torch.cat([k[..., rest, :], k_m], -2), torch.cat([v[..., rest, :], v_m], -2)
            bias = torch.cat([bias.new_zeros(bias.shape[0], s - n), bias], dim=-1)
        mask = bias[:, None, None, :]  # (B, 1, 1, S - N + M)
        if sdpa.get("attn_mask") is not None:
            mask = mask + _merge_mask(plan, sdpa["attn_mask"], image, rest, q.dtype, self)
        return dict(sdpa, key=k, value=v, attn_mask=mask, is_causal=False)


def _merge_heads(plan: MergePlan, x: Tensor) -> Tensor:
    """Cluster means of ``x`` ``(B, H, N, D)`` over the tokens: ``(B, H, num_out, D)`` (the
    usual layout, a head view of ``(B, N, H * D)``, needs no copy to get there)."""
    b, h, n, d = x.shape
    flat = x.transpose(1, 2).reshape(b, n, h * d)
    return plan.merge(flat).view(b, plan.num_out, h, d).transpose(1, 2)


def _merge_mask(
    plan: MergePlan, mask: Tensor, image: slice, rest: slice, dtype: torch.dtype, kv: KVAttention
) -> Tensor:
    """An attention mask ``(..., S)`` (bool or additive, broadcastable to ``(B, H, Sq, S)``) as
    an additive mask over the merged keys: the image columns reduced by ``amax`` per cluster
    (a merged key is as visible as its most visible token)."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )
    b = plan.labels.shape[0]
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, -1, -1, -1)
    part = mask[..., image]
    lead = part.shape[1:3]
    flat = part.reshape(b, -1, plan.num_in).transpose(1, 2)  # (B, N, H' * Sq')
    merged = plan.merge(flat, mode="amax").transpose(1, 2).reshape(b, *lead, plan.num_out)
    other = mask[..., rest]
    return torch.cat([merged, other] if kv.image_first else [other, merged], dim=-1)


def _warn_unmerged(module: nn.Module, got: tuple[int, ...], want: tuple[int, int]) -> None:
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"merge='kv': a {type(module).__name__} of a patched block got hidden states of "
            f"shape {got}, not its own (B, N) = {want} tokens as keys (e.g. cross-attention "
            "in a self-attention slot): it runs unmerged",
            stacklevel=4,
        )
