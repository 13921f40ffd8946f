"""The shared merge-around step for diffusion models: merge before a sublayer, unmerge after.

ToMe-SD's recipe (Bolya & Hoffman, 2023): a block computes one merge plan for its image tokens;
the sublayers it names (attention, optionally cross-attention and the MLP) run on the merged
tokens and their outputs are unmerged back, so the residual stream keeps full resolution.

How a family uses it:

* at patch time, give each chosen block a table of :class:`Span` entries, one per sublayer
  attribute name (``"attn"``, ``"ff"``, ...), and :func:`~._common.swap_class` each named
  sublayer with :class:`MergeAroundMixin`;
* in the block's forward, compute the plan and run diffusers' forward inside
  ``with merging(ActiveMerge(plan, spans, prefix)):``.

The active merge lives in a :mod:`contextvars` variable, private to the running thread/task,
so concurrent calls on one model never see each other's plan. Outside an active merge, or for
a module the active block does not name, the mixin is a no-op.

Sequences: a sublayer sees ``(B, prefix + N, C)``: ``prefix`` leading tokens that never merge
(the text part of a Flux single-stream block; 0 elsewhere) then the ``N`` image tokens the plan
covers. Merging gives ``(B, prefix + num_out, C)``; text tokens are passed through as they are.

Position terms (``image_rotary_emb``, Flux): a ``(cos, sin)`` pair of ``(prefix + N, D)`` tables
follows the plan by the size-weighted mean of each cluster's rows. For a cluster whose members
have (nearly) the same query/key ``k``, ``mean_i(R_i) k = mean_i(R_i k)``: the merged token is
rotated exactly as "rotate every member, then merge" would give. diffusers' rotary helper takes
one ``(S, D)`` table for the whole batch while plans differ per sample, so with a merged rotary
table the sublayer runs once per batch element (a ``(1, ...)`` slice each). Ratio 0 never gets
here (no plan), so it stays bit-identical.

The UNet family (:mod:`.diffusers`) can adopt this module by replacing its ``_ActiveMerge`` /
``_MergeAround`` with :class:`ActiveMerge` / :class:`MergeAroundMixin` and a ``Span`` table
``{"attn1": Span(mask="keys"), "attn2": Span(), "ff": Span()}`` filtered by its flags.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kernel.plan import MergePlan


@dataclass(frozen=True)
class Span:
    """How one sublayer follows its block's plan.

    Attributes:
        merge_in: merge the sublayer's ``hidden_states`` input.
        unmerge_out: unmerge its output (``False``: leave it merged for a later sublayer that
            unmerges, as Flux's single-stream ``proj_out`` does for ``attn`` and ``proj_mlp``).
        outputs: for a tuple output, the positions holding image tokens (unmerged); others
            (the text stream of a joint attention) are returned untouched.
        mask: ``"keys"`` if ``attention_mask`` masks the sublayer's own (merged) tokens as keys
            (self-attention; merged with ``amax``), ``"reject"`` if a mask cannot follow the
            merge (joint text+image attention: a clear error), ``"pass"`` if it concerns
            other keys (cross-attention to text).
        rotary: merge ``image_rotary_emb`` with the tokens (see the module docstring).
    """

    merge_in: bool = True
    unmerge_out: bool = True
    outputs: tuple[int, ...] = (0,)
    mask: str = "pass"
    rotary: bool = False


@dataclass(frozen=True)
class ActiveMerge:
    """The plan of the running block and how its sublayers follow it.

    Attributes:
        plan: over the block's ``N`` image tokens, labels ``(B, N)``.
        spans: ``{id(sublayer): Span}`` for the sublayers that follow the plan.
        prefix: leading never-merged tokens in front of the image tokens in those sublayers.
    """

    plan: MergePlan
    spans: Mapping[int, Span]
    prefix: int = 0


_ACTIVE: contextvars.ContextVar[ActiveMerge | None] = contextvars.ContextVar(
    "atc_patch_merge_around", default=None
)


@contextmanager
def merging(active: ActiveMerge) -> Iterator[None]:
    """Make ``active`` the running block's merge for the duration of the ``with`` body."""
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def merge_seq(active: ActiveMerge, x: Tensor) -> Tensor:
    """``(B, prefix + N, C)`` -> ``(B, prefix + num_out, C)``; the prefix passes through."""
    p = active.prefix
    if not p:
        return active.plan.merge(x)
    return torch.cat([x[:, :p], active.plan.merge(x[:, p:])], dim=1)


def unmerge_seq(active: ActiveMerge, x: Tensor) -> Tensor:
    """``(B, prefix + num_out, C)`` -> ``(B, prefix + N, C)``; the prefix passes through."""
    p = active.prefix
    if not p:
        return active.plan.unmerge(x)
    return torch.cat([x[:, :p], active.plan.unmerge(x[:, p:])], dim=1)


def merge_rotary(plan: MergePlan, table: Tensor) -> Tensor:
    """A ``(S, D)`` position table whose last ``N`` rows are the image tokens, merged per sample
    to ``(B, S - N + num_out, D)`` (mean of each cluster's rows; leading rows unchanged)."""
    n = plan.num_in
    if table.dim() != 2 or table.shape[0] < n:
        raise ValueError(
            f"token merging expects a rotary table of shape (S, D) with S >= {n} image tokens, "
            f"got {tuple(table.shape)}"
        )
    b = plan.labels.shape[0]
    head = table[: table.shape[0] - n].expand(b, -1, -1)
    tail = plan.merge(table[table.shape[0] - n :].expand(b, -1, -1))
    return torch.cat([head, tail], dim=1)


def _merge_key_bias(plan: MergePlan, mask: Tensor) -> Tensor:
    from .diffusers import _merge_key_mask  # the UNet family's key-mask merge, shared

    return _merge_key_mask(plan, mask)


def _slice_batch(value: Any, i: int, b: int) -> Any:
    """Element ``i`` of a batch-``b`` argument (tensors and lists/tuples of them), else as is."""
    if isinstance(value, Tensor):
        return value[i : i + 1] if value.dim() > 0 and value.shape[0] == b else value
    if isinstance(value, list):
        return [_slice_batch(v, i, b) for v in value]
    if isinstance(value, tuple):
        return tuple(_slice_batch(v, i, b) for v in value)
    return value


def _cat_batch(outs: list[Any]) -> Any:
    if isinstance(outs[0], Tensor):
        return torch.cat(outs, dim=0)
    if isinstance(outs[0], (tuple, list)):
        return type(outs[0])(_cat_batch(list(parts)) for parts in zip(*outs))
    return outs[0]


class MergeAroundMixin:
    """Mixin for a sublayer (attention, feed-forward, a projection) of a patched block.

    ``forward(hidden_states, *args, **kwargs)`` (``hidden_states`` positional or keyword,
    ``(B, prefix + N, C)``) merges the input, runs the sublayer's own forward, attention
    processor and backend dispatch untouched, on ``(B, prefix + num_out, C)``, and unmerges the
    image outputs, as the block's :class:`Span` for this module says.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = _ACTIVE.get()
        span = None if active is None else active.spans.get(id(self))
        if span is None:
            return super().forward(*args, **kwargs)
        positional = bool(args)
        x = args[0] if positional else kwargs["hidden_states"]
        if span.merge_in:
            x = _merge_input(active, span, x, kwargs)
        rotary = kwargs.get("image_rotary_emb") if span.rotary else None
        if rotary is not None:
            out = _run_per_sample(self, active.plan, x, args[1:], kwargs, rotary, positional)
        elif positional:
            out = super().forward(x, *args[1:], **kwargs)
        else:
            out = super().forward(**dict(kwargs, hidden_states=x))
        if not span.unmerge_out:
            return out
        if isinstance(out, Tensor):
            return unmerge_seq(active, out)
        return type(out)(
            unmerge_seq(active, o) if i in span.outputs and isinstance(o, Tensor) else o
            for i, o in enumerate(out)
        )


def _merge_input(active: ActiveMerge, span: Span, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """Merge ``x`` and, in place in ``kwargs``, the attention mask the span says follows it."""
    n = active.prefix + active.plan.num_in
    if x.dim() != 3 or x.shape[0] != active.plan.labels.shape[0] or x.shape[1] != n:
        raise ValueError(
            f"token merging: expected hidden_states (B, {n}, C) with "
            f"B = {active.plan.labels.shape[0]}, got {tuple(x.shape)}"
        )
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if span.mask == "reject":
            raise ValueError(
                "token merging does not support an attention_mask on joint text+image "
                "attention; run without the mask or without the patch"
            )
        if span.mask == "keys":
            kwargs["attention_mask"] = _merge_key_bias(active.plan, mask)
    return merge_seq(active, x)


def _run_per_sample(
    module: Any,
    plan: MergePlan,
    x: Tensor,
    rest: tuple,
    kwargs: dict[str, Any],
    rotary: tuple[Tensor, Tensor],
    positional: bool,
) -> Any:
    """Run ``module`` once per batch element with its own merged ``(S', D)`` rotary tables."""
    cos, sin = (merge_rotary(plan, t) for t in rotary)
    b = x.shape[0]
    outs = []
    for i in range(b):
        kw = {k: _slice_batch(v, i, b) for k, v in kwargs.items()}
        kw["image_rotary_emb"] = (cos[i], sin[i])
        xi = x[i : i + 1]
        if positional:
            args_i = tuple(_slice_batch(a, i, b) for a in rest)
            outs.append(super(MergeAroundMixin, module).forward(xi, *args_i, **kw))
        else:
            outs.append(super(MergeAroundMixin, module).forward(**dict(kw, hidden_states=xi)))
    return _cat_batch(outs)
