"""The merge-around step: a sublayer runs on its block's merged tokens, its output is unmerged.

A family names, per block, the sublayers that follow the block's plan and how (a :class:`Span`
per attribute name); :func:`merge_around` is what their ``forward`` becomes (through
:func:`~atc_patch.patch._override.override`, bound to the span and the block's index)::

    override(block.attn1, "forward", merge_around, Span(mask="keys"), index)

A sublayer sees ``(B, prefix + N, C)``: ``prefix`` leading tokens that never merge (the text of
a Flux single-stream block, else none) and the block's ``N`` image tokens, which become
``num_out`` merged tokens. Outside its block's call, or given another token count (a chunked
feed-forward), it runs as it is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...kernel.plan import MergePlan
from .._override import original
from . import core


@dataclass(frozen=True)
class Span:
    """How one sublayer follows its block's plan.

    Attributes:
        merge_in: merge the sublayer's ``hidden_states`` input.
        unmerge_out: unmerge its output (``False``: a later sublayer unmerges, as Flux's
            single-stream ``proj_out`` does for ``attn`` and ``proj_mlp``).
        outputs: for a tuple output, the positions holding image tokens (the others, e.g. the
            text stream of a joint attention, are returned as they are).
        mask: ``"keys"``: ``attention_mask`` is a bias over the sublayer's own tokens as keys
            (self-attention; merged by ``amax``: a merged key is as visible as its most visible
            token); ``"reject"``: a mask cannot follow the merge (joint text+image attention);
            ``"pass"``: the mask concerns other keys (cross-attention to text).
        rotary: ``image_rotary_emb`` ``(cos, sin)`` tables ``(S, D)`` follow the merge (Flux).
        image_keys: under ``merge="kv"`` (:mod:`.kv`), where the image tokens are among the
            attention's keys: ``"last"`` (after the prefix or the text: self-attention, Flux)
            or ``"first"`` (before the text: SD3's joint attention).
    """

    merge_in: bool = True
    unmerge_out: bool = True
    outputs: tuple[int, ...] = (0,)
    mask: str = "pass"
    rotary: bool = False
    image_keys: str = "last"


def merge_around(module: nn.Module, span: Span, index: int, *args: Any, **kwargs: Any) -> Any:
    """The ``forward`` of a sublayer of patched block ``index`` (see the module docstring)."""
    forward = original(module, "forward")
    active = core.active_block(index)
    plan = None if active is None else core.block_plan(active)
    if plan is None:
        return forward(*args, **kwargs)
    positional = bool(args)
    x = args[0] if positional else kwargs["hidden_states"]
    n = active.prefix + plan.num_in
    if span.merge_in:
        if x.dim() != 3 or x.shape[0] != plan.labels.shape[0] or x.shape[1] != n:
            _warn_unmerged(module, tuple(x.shape), (plan.labels.shape[0], n))
            return forward(*args, **kwargs)
        kwargs = _merged_mask(plan, span, kwargs)
        x = _seq(plan.merge, active.prefix, x)
    rotary = kwargs.get("image_rotary_emb") if span.rotary else None
    if rotary is not None:
        out = _per_sample(forward, plan, x, args[1:], kwargs, rotary, positional)
    elif positional:
        out = forward(x, *args[1:], **kwargs)
    else:
        out = forward(**dict(kwargs, hidden_states=x))
    if not span.unmerge_out:
        return out
    if isinstance(out, Tensor):
        return _seq(plan.unmerge, active.prefix, out)
    return type(out)(
        _seq(plan.unmerge, active.prefix, o) if i in span.outputs and isinstance(o, Tensor) else o
        for i, o in enumerate(out)
    )


def _seq(step: Any, prefix: int, x: Tensor) -> Tensor:
    """``step`` (``plan.merge`` or ``plan.unmerge``) on the image part of ``(B, prefix + ., C)``."""
    if not prefix:
        return step(x)
    return torch.cat([x[:, :prefix], step(x[:, prefix:])], dim=1)


def _warn_unmerged(module: nn.Module, got: tuple[int, ...], want: tuple[int, int]) -> None:
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"token merging: a {type(module).__name__} of a patched block got tokens of shape "
            f"{got}, not (B, N) = {want} (e.g. feed-forward chunking with merge_mlp=True, "
            "set_chunk_feed_forward): it runs unmerged",
            stacklevel=4,
        )


def _merged_mask(plan: MergePlan, span: Span, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``attention_mask`` following the merge, as ``span.mask`` says."""
    mask = kwargs.get("attention_mask")
    if mask is None or span.mask == "pass":
        return kwargs
    if span.mask == "reject":
        raise ValueError(
            "token merging does not support an attention_mask on joint text+image attention; "
            "run without the mask or without the patch"
        )
    if kwargs.get("encoder_hidden_states") is not None:  # cross-attention: other keys
        return kwargs
    return dict(kwargs, attention_mask=merge_key_mask(plan, mask))


def merge_key_mask(plan: MergePlan, mask: Tensor) -> Tensor:
    """Merge a self-attention key bias ``(B|1, 1, N)`` / ``(B|1, N)`` over the plan's clusters
    (``amax``), to ``(B, 1, num_out)`` / ``(B, num_out)``."""
    n = plan.num_in
    if mask.dim() not in (2, 3) or mask.shape[-1] != n or mask.numel() != mask.shape[0] * n:
        raise ValueError(
            f"token merging supports a self-attention key mask of shape (B, 1, N) or (B, N) "
            f"with N = {n}, got {tuple(mask.shape)}"
        )
    bias = mask.reshape(mask.shape[0], n, 1).expand(plan.labels.shape[0], -1, -1)
    merged = plan.merge(bias, mode="amax")  # (B, num_out, 1)
    return merged.reshape(merged.shape[0], *([1] if mask.dim() == 3 else []), plan.num_out)


def merge_rotary(plan: MergePlan, table: Tensor) -> Tensor:
    """A ``(S, D)`` position table whose last ``N`` rows are the image tokens, merged per sample
    to ``(B, S - N + num_out, D)`` (size-weighted mean of each cluster's rows; for members with
    the same key, ``mean_i(R_i) k = mean_i(R_i k)``: rotate, then merge)."""
    n = plan.num_in
    if table.dim() != 2 or table.shape[0] < n:
        raise ValueError(
            f"token merging expects a rotary table of shape (S, D) with S >= {n} image tokens, "
            f"got {tuple(table.shape)}"
        )
    b = plan.labels.shape[0]
    head = table[: table.shape[0] - n].expand(b, -1, -1)
    return torch.cat([head, plan.merge(table[table.shape[0] - n :].expand(b, -1, -1))], dim=1)


def _per_sample(
    forward: Any,
    plan: MergePlan,
    x: Tensor,
    rest: tuple,
    kwargs: dict[str, Any],
    rotary: tuple[Tensor, Tensor],
    positional: bool,
) -> Any:
    """Run ``forward`` once per batch element with its own merged ``(S', D)`` rotary tables:
    diffusers' rotary helper takes one table for the whole batch, plans differ per sample."""
    cos, sin = (merge_rotary(plan, t) for t in rotary)
    b = x.shape[0]
    outs = []
    for i in range(b):
        kw = {k: _sample(v, i, b) for k, v in kwargs.items()}
        kw["image_rotary_emb"] = (cos[i], sin[i])
        if positional:
            outs.append(forward(x[i : i + 1], *(_sample(a, i, b) for a in rest), **kw))
        else:
            outs.append(forward(**dict(kw, hidden_states=x[i : i + 1])))
    return _cat(outs)


def _sample(value: Any, i: int, b: int) -> Any:
    """Element ``i`` of a batch-``b`` argument (tensors and lists/tuples of them), else as is."""
    if isinstance(value, Tensor):
        return value[i : i + 1] if value.dim() > 0 and value.shape[0] == b else value
    if isinstance(value, (list, tuple)):
        return type(value)(_sample(v, i, b) for v in value)
    return value


def _cat(outs: list[Any]) -> Any:
    if isinstance(outs[0], Tensor):
        return torch.cat(outs, dim=0)
    if isinstance(outs[0], (tuple, list)):
        return type(outs[0])(_cat(list(parts)) for parts in zip(*outs))
    return outs[0]
