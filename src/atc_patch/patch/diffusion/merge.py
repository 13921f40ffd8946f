"""The merge-around step: a sublayer runs on its block's merged tokens, its output is unmerged.

A family names, per block, the sublayers that follow the block's plan and how (a :class:`Span`
per attribute name); :func:`merge_around` is what their ``forward`` becomes (through
:func:`~atc_patch.patch._override.override`, bound to the span and the block's index)::

    override(block.attn1, "forward", merge_around, Span(mask="keys"), index)

A sublayer sees ``(B, S, C)``: the block's ``N`` image tokens at ``[start, start + N)``, where
``start`` is the block's text length when the text comes first (``Span.after_text``: a Flux
single-stream block's ``[text, image]``) plus the image-stream tokens in front of the generated
image (:attr:`~.core.Call.skip`, e.g. prepended reference images); the ``N`` become ``num_out``
merged tokens and every other token (text, references, padding) passes through as it is. Outside
its block's call, or given fewer tokens (a chunked feed-forward), it runs as it is. Position
terms follow the plan: a :class:`Rotary` table's image rows are averaged over each cluster, a
:class:`JointMask`'s image columns (and rows) are merged by ``amax``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...kernel.plan import MergePlan
from .._override import original
from . import core

Arg = tuple[int | None, str]  # (position or None, keyword) of a sublayer argument


@dataclass(frozen=True)
class Rotary:
    """A sublayer's rotary position table(s) and where their image rows are.

    Attributes:
        arg: ``(position, name)`` of the argument (position ``None``: keyword only).
        parts: the entries of a tuple value that are tables (Flux ``(cos, sin)``: ``(0, 1)``;
            QwenImage ``(image, text)``: ``(0,)``); ``None``: the value is the table.
        batched: tables are ``(B | 1, S, ...)`` and the sublayer takes per-sample ones (merged
            once for the batch); else ``(S, ...)`` shared by the batch, and the sublayer runs
            once per sample with its own merged table (diffusers' 2-D rotary helpers).
        after_text: the table's rows are ``[block text, image stream, ...]`` (Flux's
            ``[text, image]``); else they start with the image stream (an image-only table, or
            Z-Image's / HiDream's ``[image, text]``).
    """

    arg: Arg = (None, "image_rotary_emb")
    parts: tuple[int, ...] | None = (0, 1)
    batched: bool = False
    after_text: bool = True


@dataclass(frozen=True)
class JointMask:
    """An attention mask over the attention's whole sequence that follows the plan: its image
    columns (and rows, when its last two axes are both the sequence) are merged by ``amax``, so
    a merged token is as visible as its most visible member; text and padding entries stay.

    Attributes:
        arg: ``(position, name)`` of the mask argument.
        after_text: the sequence is ``[block text, image stream, ...]`` (Chroma); else it starts
            with the image stream (Z-Image, HiDream).
    """

    arg: Arg = (None, "attention_mask")
    after_text: bool = False


@dataclass(frozen=True)
class Span:
    """How one sublayer follows its block's plan.

    Attributes:
        merge_in: merge the sublayer's ``hidden_states`` input.
        unmerge_out: unmerge its output (``False``: a later sublayer unmerges, as Flux's
            single-stream ``proj_out`` does for ``attn`` and ``proj_mlp``).
        outputs: for a tuple output, the positions holding image tokens (the others, e.g. the
            text stream of a joint attention, are returned as they are).
        after_text: the sublayer's tokens are ``[block text, image stream, ...]``.
        mask: ``"keys"``: ``attention_mask`` is a bias over the sublayer's own tokens as keys
            (self-attention; merged by ``amax``: a merged key is as visible as its most visible
            token); ``"reject"``: a mask cannot follow the merge; ``"pass"``: the mask concerns
            other keys (cross-attention to text) or is rebuilt from the token counts inside; a
            :class:`JointMask`: a mask over the attention's whole sequence.
        rotary: the sublayer's rotary table(s), which follow the merge, or ``None``.
        once: only the first call in a block call merges (CogView4's ``ff`` runs on the image
            tokens, then on the text); at most one such span per block.
        image_keys: under ``merge="kv"`` (:mod:`.kv`), where the sublayer's own sequence lies
            among the attention's keys when its text comes as a separate argument: ``"last"``
            (after the text: Flux, QwenImage, CogView4) or ``"first"`` (before the text: SD3's
            joint attention, HiDream, HunyuanVideo).
        text: under ``merge="kv"``, the ``(position, name)`` of the sublayer's separate text
            stream argument.
        cross: a cross-attention whose queries merge (``merge_crossattn``; its keys are the
            text): under ``merge="kv"`` it keeps merging its tokens.
    """

    merge_in: bool = True
    unmerge_out: bool = True
    outputs: tuple[int, ...] = (0,)
    after_text: bool = False
    mask: str | JointMask = "pass"
    rotary: Rotary | None = None
    once: bool = False
    image_keys: str = "last"
    text: Arg = (1, "encoder_hidden_states")
    cross: bool = False


def merge_around(module: nn.Module, span: Span, index: int, *args: Any, **kwargs: Any) -> Any:
    """The ``forward`` of a sublayer of patched block ``index`` (see the module docstring)."""
    forward = original(module, "forward")
    active = core.active_block(index)
    plan = None if active is None else core.block_plan(active)
    if plan is None:
        return forward(*args, **kwargs)
    if span.once:
        if active.once_done:
            return forward(*args, **kwargs)
        active.once_done = True
    positional = bool(args)
    x = args[0] if positional else kwargs["hidden_states"]
    start = active.start(span.after_text)
    if span.merge_in:
        n = start + plan.num_in
        if x.dim() != 3 or x.shape[0] != plan.labels.shape[0] or x.shape[1] < n:
            warn_unmerged(
                module,
                f"tokens of shape {tuple(x.shape)}, not (B, >= N) = {(plan.labels.shape[0], n)}",
                "e.g. feed-forward chunking with merge_mlp=True, set_chunk_feed_forward",
            )
            return forward(*args, **kwargs)
        args, kwargs = _merged_mask(plan, span, active, args, kwargs)
        x = _seq(plan.merge, start, plan.num_in, x)
    rotary = _get(args, kwargs, span.rotary.arg) if span.rotary is not None else None
    if rotary is not None and span.rotary.batched:
        merged = _merged_rotary(plan, span, active, rotary)
        args, kwargs = _put(args, kwargs, span.rotary.arg, merged)
        out = _call(forward, x, args, kwargs, positional)
    elif rotary is not None:
        merged = _merged_rotary(plan, span, active, rotary)
        out = _per_sample(forward, x, args, kwargs, merged, span)
    else:
        out = _call(forward, x, args, kwargs, positional)
    if not span.unmerge_out:
        return out
    if isinstance(out, Tensor):
        return _seq(plan.unmerge, start, plan.num_out, out)
    return type(out)(
        _seq(plan.unmerge, start, plan.num_out, o)
        if i in span.outputs and isinstance(o, Tensor)
        else o
        for i, o in enumerate(out)
    )


def _call(forward: Any, x: Tensor, args: tuple, kwargs: dict[str, Any], positional: bool) -> Any:
    if positional:
        return forward(x, *args[1:], **kwargs)
    return forward(**dict(kwargs, hidden_states=x))


def _get(args: tuple, kwargs: dict[str, Any], arg: Arg) -> Any:
    pos, name = arg
    if pos is not None and len(args) > pos:
        return args[pos]
    return kwargs.get(name)


def _put(args: tuple, kwargs: dict[str, Any], arg: Arg, value: Any) -> tuple[tuple, dict]:
    pos, name = arg
    if pos is not None and len(args) > pos:
        return (*args[:pos], value, *args[pos + 1 :]), kwargs
    return args, dict(kwargs, **{name: value})


def _seq(step: Any, start: int, n: int, x: Tensor) -> Tensor:
    """``step`` (``plan.merge`` / ``plan.unmerge``) on the ``n`` tokens at ``start`` of
    ``(B, S, C)`` (the image tokens, or their ``num_out`` merged ones); the others stay."""
    if start == 0 and x.shape[1] == n:
        return step(x)
    parts = [x[:, :start], step(x[:, start : start + n]), x[:, start + n :]]
    return torch.cat([p for p in parts if p.shape[1]], dim=1)


def warn_unmerged(module: nn.Module, what: str, why: str) -> None:
    """Warn (outside compilation) that ``module`` of a patched block runs unmerged: it got
    ``what`` instead of its own tokens, e.g. because of ``why``."""
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"{type(module).__name__} of a patched block got {what} ({why}): it runs unmerged",
            stacklevel=4,
        )


def _merged_mask(
    plan: MergePlan, span: Span, active: core.Active, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """``args, kwargs`` with the attention mask following the merge, as ``span.mask`` says."""
    if isinstance(span.mask, JointMask):
        mask = _get(args, kwargs, span.mask.arg)
        if mask is None:
            return args, kwargs
        merged = merge_joint_mask(plan, mask, active.start(span.mask.after_text))
        return _put(args, kwargs, span.mask.arg, merged)
    mask = kwargs.get("attention_mask")
    if mask is None or span.mask == "pass":
        return args, kwargs
    if span.mask == "reject":
        raise ValueError(
            "token merging does not support an attention_mask on joint text+image attention; "
            "run without the mask or without the patch"
        )
    if kwargs.get("encoder_hidden_states") is not None:  # cross-attention: other keys
        return args, kwargs
    return args, dict(kwargs, attention_mask=merge_key_mask(plan, mask))


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


def merge_rows(plan: MergePlan, t: Tensor, axis: int, start: int, mode: str = "mean") -> Tensor:
    """Merge the ``N`` image rows at ``start`` of ``t``'s ``axis`` over the plan's clusters.

    ``t`` is either shared by the batch (``axis == 0``: ``(S, ...)``) or batched (``axis >= 1``,
    leading dimension ``B`` or 1). Returns ``(B, ..., S - N + num_out, ...)`` (a shared table
    gains the batch dimension in front); rows outside the range are kept. Complex tables are
    merged as their real and imaginary parts (the mean of complex numbers); boolean ones as 0/1
    (with ``mode="amax"``: any member set).
    """
    b = plan.labels.shape[0]
    if axis == 0:
        t, axis = t.unsqueeze(0), 1
    if t.shape[axis] < start + plan.num_in or t.shape[0] not in (1, b):
        raise ValueError(
            f"token merging expects a position table or mask with {start + plan.num_in} or more "
            f"rows on dimension {axis} and a batch of 1 or {b}, got {tuple(t.shape)}"
        )
    complex_, bool_ = t.is_complex(), t.dtype == torch.bool
    work = torch.view_as_real(t) if complex_ else t.float() if bool_ else t
    moved = work.movedim(axis, 1)
    rest = moved.shape[2:]
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1).expand(b, -1, -1)
    merged = _seq(functools.partial(plan.merge, mode=mode), start, plan.num_in, flat)
    out = merged.reshape(b, merged.shape[1], *rest).movedim(1, axis)
    return torch.view_as_complex(out.contiguous()) if complex_ else out.bool() if bool_ else out


def merge_joint_mask(plan: MergePlan, mask: Tensor, start: int) -> Tensor:
    """A mask ``(B | 1, ..., S)`` or ``(B | 1, ..., S, S)`` over an attention's sequence, with
    the image tokens at ``start``: their columns (and rows, for a square mask) merged by
    ``amax``, to ``(B, ..., S')`` / ``(B, ..., S', S')``, ``S' = S - N + num_out``."""
    if mask.dim() < 2:
        raise ValueError(
            f"token merging expects an attention mask (B, ..., S), got shape {tuple(mask.shape)}"
        )
    square = mask.dim() >= 3 and mask.shape[-2] == mask.shape[-1]
    out = merge_rows(plan, mask, mask.dim() - 1, start, mode="amax")
    return merge_rows(plan, out, out.dim() - 2, start, mode="amax") if square else out


def _merged_rotary(plan: MergePlan, span: Span, active: core.Active, value: Any) -> Any:
    """The span's rotary argument ``value`` with its tables' image rows merged: batched
    ``(B, S', ...)`` tables (or a tuple holding them where the value is a tuple)."""
    rotary = span.rotary
    start = active.start(rotary.after_text)
    axis = 1 if rotary.batched else 0

    def merged(t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.dim() < axis + 2:
            raise ValueError(
                f"token merging expects rotary tables of {axis + 2} or more dimensions for "
                f"{rotary.arg[1]!r}, got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
            )
        return merge_rows(plan, t, axis, start)

    if rotary.parts is None:
        return merged(value)
    if not isinstance(value, (tuple, list)) or len(value) <= max(rotary.parts):
        raise ValueError(
            f"token merging expects {rotary.arg[1]!r} to be a tuple of tables, got "
            f"{type(value).__name__}"
        )
    return type(value)(merged(v) if i in rotary.parts else v for i, v in enumerate(value))


def _per_sample(
    forward: Any,
    x: Tensor,
    args: tuple,
    kwargs: dict[str, Any],
    rotary: Any,
    span: Span,
) -> Any:
    """Run ``forward`` once per batch element with its own merged rotary tables (``rotary``:
    the merged value, tables ``(B, S', ...)``): diffusers' rotary helpers take one table for
    the whole batch, plans differ per sample."""
    b = x.shape[0]
    outs = []
    for i in range(b):
        value = _row(rotary, i, span.rotary.parts)
        a = tuple(_sample(v, i, b) for v in args)
        kw = {k: _sample(v, i, b) for k, v in kwargs.items()}
        a, kw = _put(a, kw, span.rotary.arg, value)
        outs.append(_call(forward, x[i : i + 1], a, kw, bool(args)))
    return _cat(outs)


def _row(value: Any, i: int, parts: tuple[int, ...] | None) -> Any:
    """Sample ``i``'s tables of a merged rotary value."""
    if parts is None:
        return value[i]
    return type(value)(v[i] if j in parts else v for j, v in enumerate(value))


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
