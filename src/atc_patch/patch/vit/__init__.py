"""The ViT core: the reduction step the ViT-like families share (timm, torchvision, transformers).

A family binds one :class:`ViTPatch` (the user's :class:`~atc_patch.ViTConfig` plus what the
model decides: its protected tokens) to the methods it overrides. Its patched model-level
forward runs the blocks and passes the per-forward token state from block to block, so
nothing about one forward is stored where another forward could see it::

    steps = patch.block_steps(len(blocks), x.shape[1])     # this forward's schedule
    tokens = Tokens(x, attn_mask=mask, valid=key_padding(mask, x.shape[0]), pos=rope)
    for blk, step in zip(blocks, steps):
        r = patch.r_for(step, tokens.x.shape[1])           # from the tokens actually left
        tokens = blk(tokens.x, ..., r=r, size=tokens.size, ...)  # a Tokens again

Inside a block, between attention and MLP (as in ToMe), :func:`merge_step` asks the kernel
for a plan from the attention keys averaged over heads (:meth:`ViTPatch.plan`, the one call
into the kernel) and applies it to the hidden states, token sizes, source map, the caller's
attention mask, its key-padding mask, the map from the input grid to the current tokens and
the position terms (rotary tables: each cluster gets the size-weighted mean of its members'
rows, see :func:`merge_positions`). The source map of the last forward (``trace_source=True``)
is kept per thread in the patch record, see :func:`last_source`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ...kernel import cluster_tokens
from ...kernel.plan import MergePlan
from ...schedule import Step, simulate, step_r
from ..config import ViTConfig


class TraceSlot:
    """Per-thread holder of the last forward's source map (``trace_source=True``).

    Not state: ``copy.deepcopy`` and ``pickle`` (``torch.save``, ``timm.utils.ModelEmaV3``)
    give the copy its own empty slot (shared by whatever shared the original one).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def source(self) -> Tensor | None:
        return getattr(self._local, "source", None)

    @source.setter
    def source(self, value: Tensor) -> None:
        self._local.source = value

    def __reduce__(self) -> tuple:
        return (TraceSlot, ())

    def __deepcopy__(self, memo: dict) -> TraceSlot:
        return TraceSlot()


@dataclass(frozen=True)
class ViTPatch:
    """A :class:`~atc_patch.ViTConfig` bound to one model: what its patched methods hold.

    Attributes:
        config: the validated settings.
        protected: leading tokens that never merge (class, distillation, register tokens).
        what: the kind of model, for messages (``"timm VisionTransformer"``).
        slot: the per-thread source-map slot (``trace_source=True``), also the record's
            ``PatchInfo.state``; ``None`` otherwise.
    """

    config: ViTConfig
    protected: int
    what: str = "model"
    slot: TraceSlot | None = field(default=None, compare=False, repr=False)

    @property
    def reduces(self) -> bool:
        """False when the schedule removes nothing for any input (``r=0``, ``keep_rate=1``)."""
        return not self.config.schedule.is_identity()

    @property
    def is_passthrough(self) -> bool:
        """True when a patched forward has nothing to do and runs the original one."""
        c = self.config
        return not self.reduces and not c.trace_source and not c.unmerge

    @property
    def tracks_source(self) -> bool:
        return self.config.trace_source or self.config.unmerge

    def check(self, num_blocks: int, num_tokens: int) -> None:
        """At ``apply``, for the model's own input size: schedule errors now, not at the first
        forward, and one warning when a ``keep_rate`` target cannot be reached.

        Raises:
            ValueError: a ``reduction_loc`` or an ``r`` list past the last block.
        """
        c = self.config
        c.schedule.check_reachable(num_blocks, num_tokens, c.method, self.protected, self.what)

    def block_steps(self, num_blocks: int, num_tokens: int) -> list[Step]:
        """What each of ``num_blocks`` blocks is asked when ``num_tokens`` tokens enter block 0.

        Evaluated per forward, so ``keep_rate`` follows the input size. Warns once per input
        size when a target cannot be reached (not while ``torch.compile`` traces). Turn each
        step into an ``r`` with :meth:`r_for` from the tokens entering that block.
        """
        c = self.config
        if not torch.compiler.is_compiling():
            c.schedule.check_reachable(num_blocks, num_tokens, c.method, self.protected, self.what)
        return c.schedule.steps(num_blocks, max(num_tokens - self.protected, 0))

    def r_for(self, step: Step, num_tokens: int) -> int:
        """Tokens a block removes when ``num_tokens`` tokens (prefix tokens included) enter it:
        toward the step's target, clamped to what the method can remove."""
        return step_r(step, num_tokens, self.config.method, self.protected)

    def block_r(self, num_blocks: int, num_tokens: int) -> list[int]:
        """Tokens each block removes when ``num_tokens`` tokens enter block 0 (no warning)."""
        steps = self.config.schedule.steps(num_blocks, max(num_tokens - self.protected, 0))
        return simulate(steps, num_tokens, self.config.method, self.protected)

    def plan(self, metric: Tensor, r: int, valid: Tensor | None = None) -> MergePlan:
        """The merge plan removing ``r`` of the ``(B, N, D)`` ``metric``'s tokens: the one call
        into the kernel.

        ``valid`` ``(B, N)`` bool marks real tokens (``False``: padding). Padding never merges
        with a real token, real tokens take the merges first, and how real tokens are
        partitioned does not depend on the padding's values. A ``meta`` metric gives a plan of
        the right shape (labels unset).
        """
        c = self.config
        return cluster_tokens(
            metric,
            r,
            method=c.method,
            linkage=c.linkage,
            protected=self.protected,
            mask=valid,
            backend=c.backend,
        )


class Tokens(NamedTuple):
    """Per-forward token state passed from block to block (never stored on a module).

    Attributes:
        x: ``(B, N, C)`` hidden states.
        size: ``(B, N, 1)`` input tokens merged into each token; ``None`` before any merge.
        source: ``(B, N, N0)`` 0/1 map to the ``N0`` tokens that entered the first block;
            ``None`` before any merge or when not tracked.
        attn_mask: the caller's attention mask, merged along with the tokens; or ``None``.
        grid: ``(B, N0)`` int64, the current token each of the ``N0`` input tokens is merged
            into; only tracked when the caller starts it (``forward_intermediates``).
        valid: ``(B, N)`` bool, ``False`` for padding tokens (keys masked for every query);
            ``None`` without an attention mask.
        pos: position terms of the ``N - protected`` unprotected tokens, merged along with
            them: a tensor or a tuple of tensors ``(M, D)``, ``(K, M, D)`` or ``(B|1, K, M, D)``
            with ``M = N - protected`` (rotary tables: timm's ``(M, 2 * head_dim)`` sin/cos
            rows, DINOv3's ``(cos, sin)``); after a merge each is ``(B, K, M', D)``.
    """

    x: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    attn_mask: Any = None
    grid: Tensor | None = None
    valid: Tensor | None = None
    pos: Any = None


def merge_step(patch: ViTPatch, metric: Tensor, r: int, tokens: Tokens) -> Tokens:
    """Remove ``r`` tokens from ``tokens`` by merging those ``metric`` finds similar.

    Args:
        patch: the model's settings.
        metric: ``(B, N, D)`` attention keys averaged over heads.
        r: tokens to remove (clamped to what the method can remove).
        tokens: the state after attention; ``tokens.x`` is ``(B, N, C)``.

    Returns:
        The state with ``N - r`` tokens: size-weighted means of each cluster and summed sizes
        (with ``size_mode="reset"``: plain means and ``size=None``), and every tracked map
        and mask merged along.
    """
    if r <= 0:
        return tokens
    plan = patch.plan(metric, r, tokens.valid)
    if plan.is_identity:
        return tokens
    source = plan.merge_source(tokens.source) if patch.tracks_source else None
    reset = patch.config.size_mode == "reset"
    weights = None if reset else tokens.size
    x, size = plan.merge_wavg(tokens.x, weights)
    size = None if reset else size
    mask = None if tokens.attn_mask is None else merge_attn_mask(tokens.attn_mask, plan)
    grid = None if tokens.grid is None else plan.labels.gather(1, tokens.grid)
    valid = tokens.valid
    if valid is not None:
        valid = plan.merge(valid[..., None].to(x.dtype), mode="amax")[..., 0] > 0
    pos = None
    if tokens.pos is not None:
        pos = merge_positions(plan, tokens.pos, weights, patch.protected)
    return Tokens(x, size, source, mask, grid, valid, pos)


def merge_positions(
    plan: MergePlan, pos: Tensor | tuple[Tensor, ...], size: Tensor | None, protected: int
) -> Tensor | tuple[Tensor, ...]:
    """Position terms of the unprotected tokens (:attr:`Tokens.pos`) after ``plan``.

    Every cluster gets the ``size``-weighted mean of its members' rows (the mean over the input
    tokens behind it), the rows of the protected tokens stay out. For members with the same
    content this is exact where a rotation is applied to a key: ``mean_i(R_i) k =
    mean_i(R_i k)``.

    Args:
        plan: the plan of ``N`` tokens, the first ``protected`` of them protected.
        pos: a tensor or a tuple of tensors ``(M, D)``, ``(K, M, D)`` or ``(B|1, K, M, D)``,
            ``M = N - protected``.
        size: ``(B, N, 1)`` token sizes (``None``: all 1).

    Returns:
        The same structure, each tensor ``(B, K, M', D)`` with ``M' = num_out - protected``.
    """
    tables = pos if isinstance(pos, tuple) else (pos,)
    if not tables:
        return pos
    b = plan.labels.shape[0]
    flat, shapes = [], []
    for t in tables:
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(b, -1, -1, -1)
        _, k, m, d = t4.shape
        flat.append(t4.transpose(1, 2).reshape(b, m, k * d))
        shapes.append((k, d, t.dtype))
    work = torch.cat(flat, dim=-1) if len(flat) > 1 else flat[0]
    if protected:  # rows for the protected tokens, which keep their own slots
        work = torch.cat([work.new_zeros(b, protected, work.shape[-1]), work], dim=1)
    merged = plan.merge_wavg(work, size)[0][:, protected:]
    out, start = [], 0
    for k, d, dtype in shapes:
        part = merged[..., start : start + k * d]
        out.append(part.reshape(b, -1, k, d).transpose(1, 2).to(dtype))
        start += k * d
    return tuple(out) if isinstance(pos, tuple) else out[0]


def key_padding(mask: Any, batch: int) -> Tensor | None:
    """``(B, N)`` bool, ``False`` for padding: the keys an attention mask hides from every query
    (and head). ``mask``: boolean (``True`` = attend) or additive float (a key is hidden at
    ``-inf`` or ``finfo.min``), ``(N, N)`` or ``(B|1, H|1, N|1, N)``; ``None`` gives ``None``."""
    if not isinstance(mask, Tensor):
        return None
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    n = mask.shape[-1]
    if seen.dim() == 2:
        seen = seen[None]
    return seen.reshape(seen.shape[0], -1, n).any(1).expand(batch, n)


def start_grid(x: Tensor) -> Tensor:
    """The identity input-grid map ``(B, N0)`` of tokens ``x`` ``(B, N0, C)``."""
    b, n = x.shape[:2]
    return torch.arange(n, device=x.device).expand(b, n)


def to_grid(x: Tensor, grid: Tensor | None) -> Tensor:
    """Unmerge ``(B, N, C)`` tokens to the ``(B, N0, C)`` input grid: every input token gets
    the token it was merged into (``grid`` from :attr:`Tokens.grid`; ``None``: ``x`` itself)."""
    if grid is None:
        return x
    return x.gather(1, grid[..., None].expand(-1, -1, x.shape[-1]))


def check_traceable(patch: ViTPatch, x: Any) -> None:
    """Refuse ``torch.fx``, ``torch.jit.trace`` and ``torch.export`` of a model that reduces.

    The merge plan depends on the data (which tokens are similar), so a trace would replay
    the plan of the example input on every input, and a symbolic trace has no data to
    cluster. A model that reduces nothing runs its original forwards and traces like them.

    Raises:
        RuntimeError: saying so and what works instead.
    """
    if not patch.reduces:
        return
    how = None
    if isinstance(x, torch.fx.Proxy):
        how, graph = "torch.fx symbolic tracing", "a symbolic"
    elif torch.jit.is_tracing():
        how, graph = "torch.jit.trace", "a traced"
    elif torch.compiler.is_exporting():
        how, graph = "torch.export", "an exported"
    if how is not None:
        raise RuntimeError(
            f"{how} is not supported for a model patched by atc_patch (method="
            f"{patch.config.method!r}): which tokens merge depends on the input, which {graph} "
            "graph cannot follow. Use the eager model or torch.compile, or "
            "atc_patch.remove_patch(model) before tracing/exporting (docs/timm.md)"
        )


def refuse_script(module: torch.nn.Module, patch: ViTPatch) -> None:
    """``__prepare_scriptable__`` of a patched model: ``torch.jit.script`` cannot compile it.

    Raises:
        RuntimeError: saying so and what works instead.
    """
    raise RuntimeError(
        f"torch.jit.script is not supported for a {type(module).__name__} patched by atc_patch "
        "(the patched forwards are instance overrides with keyword-only arguments, named tuples "
        "and data-dependent token counts). Use the eager model or torch.compile, or "
        "atc_patch.remove_patch(model) before scripting (docs/timm.md)"
    )


def size_bias(size: Tensor | None, enabled: bool) -> Tensor | None:
    """Proportional attention: ``(B, 1, 1, N)`` bias ``log(size)`` on the keys, or ``None``.

    ``None`` before the first merge (all sizes are 1), which keeps unreduced models exact.
    """
    if not enabled or size is None:
        return None
    return size.log()[:, None, None, :, 0]


def attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention on ``x`` runs in: the autocast dtype when autocast is on, else
    ``x.dtype`` (an additive mask must match it)."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):  # e.g. meta
        return x.dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def combine_masks(attn_mask: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Any:
    """Add the proportional-attention ``bias`` to the caller's ``attn_mask``.

    Returns ``attn_mask`` itself when there is no bias (so unreduced models are exact);
    otherwise an additive float mask of ``dtype`` (a boolean mask becomes ``0 / -inf``).
    """
    if bias is None:
        return attn_mask
    bias = bias.to(dtype)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(~attn_mask, -torch.inf)
    return attn_mask.to(dtype) + bias


def merge_attn_mask(mask: Tensor, plan: MergePlan) -> Tensor:
    """Carry an attention mask ``(N, N)``, ``(B|1, H|1, N, N)`` or a key mask
    ``(B|1, H|1, 1, N)`` through ``plan``.

    A merged query may attend to a merged key when any of their members could (boolean masks),
    or with the largest (least negative) of their additive values (float masks). The result is
    ``(B, H|1, N', N')`` (a key mask: ``(B, H|1, 1, N')``).
    """
    if mask.dim() == 2:
        mask = mask[None, None]
    n = plan.num_in
    if mask.dim() != 4 or mask.shape[-1] != n or mask.shape[-2] not in (1, n):
        raise ValueError(
            f"attn_mask must be (N, N), (B, H, N, N) or (B, H, 1, N) with N={n} to follow "
            f"token merging, got shape {tuple(mask.shape)}"
        )
    is_bool = mask.dtype == torch.bool
    work = mask.float() if is_bool else mask
    b = plan.labels.shape[0]
    heads = work.shape[1]
    if work.shape[-2] == 1:  # keys only: (B, H, 1, N) -> (B, N, H) -> merge -> (B, H, 1, N')
        keys = plan.merge(work.expand(b, heads, 1, n).reshape(b, heads, n).transpose(1, 2), "amax")
        out = keys.transpose(1, 2)[:, :, None]
        return out.bool() if is_bool else out.contiguous()
    work = work.expand(b, heads, n, n)
    # keys: (B, H*N, N) -> (B, N, H*N) -> merge -> (B, N', H*N)
    cols = plan.merge(work.reshape(b, heads * n, n).transpose(1, 2), mode="amax")
    m = plan.num_out
    # queries: (B, N', H, N) -> (B, N, H*N') after moving the query axis to dim 1
    rows = cols.reshape(b, m, heads, n).permute(0, 3, 2, 1).reshape(b, n, heads * m)
    out = plan.merge(rows, mode="amax").reshape(b, m, heads, m).permute(0, 2, 1, 3)
    return out.bool() if is_bool else out.contiguous()


def store_source(patch: ViTPatch, tokens: Tokens, num_tokens: int) -> None:
    """Record the source map of a finished forward in the calling thread's slot (when
    ``trace_source``); ``num_tokens`` entered the first block (no merge: the identity)."""
    if patch.slot is None:
        return
    source = tokens.source
    if source is None:
        b = tokens.x.shape[0]
        source = torch.eye(num_tokens, device=tokens.x.device).expand(b, -1, -1)
    patch.slot.source = source


def last_source(model: torch.nn.Module) -> Tensor:
    """The source map of the last forward this thread ran on ``model`` (``trace_source=True``).

    Args:
        model: the patched model, or what holds it (a task model, a ``features_only`` model).

    Returns:
        ``(B, N_out, N0)`` 0/1 tensor: row ``i`` marks the tokens that entered the first block
        (prefix tokens first, then patches in raster order) merged into output token ``i``.

    The map is kept per thread: a forward in another thread never overwrites the map this
    thread reads (``nn.DataParallel`` replicas run in worker threads, so read it after a
    forward on the model itself).

    Raises:
        ValueError: the model was not patched with ``trace_source=True``, or no forward has run
            on it in this thread since.
    """
    from .. import find_patch_info

    info = find_patch_info(model)
    if info is None or not isinstance(info.state, TraceSlot):
        raise ValueError("the model was not patched with trace_source=True")
    source = info.state.source
    if source is None:
        raise ValueError("no forward has run on this model in this thread since patching")
    return source


__all__ = [
    "TraceSlot",
    "Tokens",
    "ViTPatch",
    "attention_dtype",
    "check_traceable",
    "combine_masks",
    "key_padding",
    "last_source",
    "merge_attn_mask",
    "merge_positions",
    "merge_step",
    "refuse_script",
    "size_bias",
    "start_grid",
    "store_source",
    "to_grid",
]
