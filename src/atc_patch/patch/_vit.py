"""The reduction step every Vision Transformer patch shares (timm and torchvision).

A patched ViT runs its blocks itself and threads the per-forward token state through them
explicitly, so nothing about one forward is stored where another forward could see it::

    steps = config.block_steps(len(blocks), x.shape[1])  # what each block is asked, this forward
    tokens = Tokens(x, size=None, source=None, attn_mask=attn_mask)
    for blk, step in zip(blocks, steps):
        r = config.r_for(step, tokens.x.shape[1])         # from the tokens actually left
        tokens = blk(tokens.x, tokens.attn_mask, r=r, size=tokens.size, source=tokens.source)

Inside a block, between attention and MLP (as in ToMe), :func:`merge_step` asks the kernel for
a plan from the attention keys averaged over heads and applies it to the hidden states, the
token sizes, the source map, the caller's attention mask and (for ``forward_intermediates``)
the map from the input grid to the current tokens.

Only immutable configuration (:class:`ViTReduction`) is stored on modules. The source map of
the last forward (``trace_source=True``) is kept per thread, see :func:`last_source`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._validate import CROSS_FAMILY_HINTS, as_bool, check_options
from ..kernel import BACKENDS, LINKAGES, cluster_tokens
from ..kernel.plan import MergePlan
from ..schedule import Schedule, Step, make_schedule, simulate, step_r

VIT_METHODS = ("atc", "tome", "kmedoids", "dpcknn")
VIT_OPTIONS = (
    "r",
    "r_schedule",
    "keep_rate",
    "reduction_loc",
    "keep_rate_mode",
    "linkage",
    "prop_attn",
    "size_mode",
    "trace_source",
    "backend",
)
SIZE_MODES = ("keep", "reset")

_CONFIG_ATTR = "_atc_vit"
_TRACE_ATTR = "_atc_trace"


@dataclass(frozen=True)
class ViTReduction:
    """Immutable settings of a patched ViT (safe to share between replicas and threads).

    Attributes:
        method: kernel method, one of :data:`VIT_METHODS`.
        linkage: ATC linkage (``None`` for other methods).
        schedule: how many tokens each block removes.
        prop_attn: add ``log(size)`` to the attention logits (proportional attention).
        size_mode: ``"keep"`` (token sizes add up over the blocks, so a merge is the mean of
            the input patches behind it) or ``"reset"`` (sizes restart at 1 after every block,
            so each merge is the unweighted mean of the tokens it merges; the ATC reference
            DeiT without proportional attention; needs ``prop_attn=False``).
        trace_source: keep the map from output tokens to input tokens of the last forward.
        protected: leading tokens that never merge (class, distillation, register tokens).
        backend: ATC kernel backend, one of :data:`~atc_patch.kernel.BACKENDS`.
    """

    method: str
    linkage: str | None
    schedule: Schedule
    prop_attn: bool
    trace_source: bool
    protected: int
    backend: str = "auto"
    size_mode: str = "keep"

    def block_steps(self, num_blocks: int, num_tokens: int) -> list[Step]:
        """What each of ``num_blocks`` blocks is asked when ``num_tokens`` tokens enter block 0.

        Evaluated per forward, so ``keep_rate`` follows the input size (``dynamic_img_size``).
        Warns once per input size when a ``keep_rate`` target cannot be reached by the method.
        Turn each step into an ``r`` with :meth:`r_for` from the tokens entering that block.
        """
        if not torch.compiler.is_compiling():
            self.schedule.check_reachable(num_blocks, num_tokens, self.method, self.protected)
        return self.schedule.steps(num_blocks, max(num_tokens - self.protected, 0))

    def r_for(self, step: Step, num_tokens: int) -> int:
        """Tokens a block removes when ``num_tokens`` tokens (prefix tokens included) enter it:
        toward the step's target, clamped to what the method can remove."""
        return step_r(step, num_tokens, self.method, self.protected)

    def block_r(self, num_blocks: int, num_tokens: int) -> list[int]:
        """Tokens each of ``num_blocks`` blocks removes when ``num_tokens`` tokens enter block 0
        (what :meth:`block_steps` + :meth:`r_for` give in a forward; clamped, no warning).

        Raises:
            ValueError: for a ``reduction_loc`` or an ``r`` list past the last block.
        """
        steps = self.schedule.steps(num_blocks, max(num_tokens - self.protected, 0))
        return simulate(steps, num_tokens, self.method, self.protected)


class Tokens(NamedTuple):
    """Per-forward token state passed from block to block (never stored on a module).

    Attributes:
        x: ``(B, N, C)`` hidden states.
        size: ``(B, N, 1)`` input tokens merged into each token; ``None`` before any merge.
        source: ``(B, N, N0)`` 0/1 map to the ``N0`` tokens that entered the first block;
            ``None`` before any merge or without ``trace_source``.
        attn_mask: the caller's attention mask, merged along with the tokens; or ``None``.
        grid: ``(B, N0)`` int64, the current token each of the ``N0`` input tokens is merged
            into; only tracked when the caller starts it (``forward_intermediates``), else
            ``None``. :func:`to_grid` unmerges with it.
    """

    x: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    attn_mask: Tensor | None = None
    grid: Tensor | None = None


def make_reduction(
    method: str, protected: int, options: dict[str, Any], family: str = "a ViT"
) -> ViTReduction:
    """Validate ``apply_patch`` options for a ViT.

    Raises:
        ValueError: for an unknown option (listing :data:`VIT_OPTIONS`, with a hint for the
            other families' options), a bad value (naming the valid choices), or neither ``r``
            nor ``keep_rate`` given (a patch that would silently reduce nothing).
    """
    check_options(family, options, VIT_OPTIONS, hints=CROSS_FAMILY_HINTS["vit"])
    if method not in VIT_METHODS:
        raise ValueError(f"method must be one of {VIT_METHODS} for a ViT, got {method!r}")
    linkage = options.get("linkage")
    if linkage is not None:
        if method != "atc":
            raise ValueError(f"linkage applies to method='atc' only, not to {method!r}")
        if linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    elif method == "atc":
        linkage = "average"
    prop_attn = as_bool("prop_attn", options.get("prop_attn", True))
    size_mode = options.get("size_mode", "keep")
    if size_mode not in SIZE_MODES:
        raise ValueError(f"size_mode must be one of {SIZE_MODES}, got {size_mode!r}")
    if size_mode == "reset" and prop_attn:
        raise ValueError(
            "size_mode='reset' drops the token sizes after every block, so proportional "
            "attention would have none to use: pass prop_attn=False with it"
        )
    trace_source = as_bool("trace_source", options.get("trace_source", False))
    backend = options.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and method != "atc":
        raise ValueError(f"backend='triton' applies to method='atc' only, not to {method!r}")
    schedule = make_schedule(
        r=options.get("r"),
        r_schedule=options.get("r_schedule", "constant"),
        keep_rate=options.get("keep_rate"),
        reduction_loc=options.get("reduction_loc"),
        keep_rate_mode=options.get("keep_rate_mode", "target"),
        required=True,
    )
    return ViTReduction(
        method=method,
        linkage=linkage,
        schedule=schedule,
        prop_attn=prop_attn,
        trace_source=trace_source,
        protected=protected,
        backend=backend,
        size_mode=size_mode,
    )


def settings_of(config: ViTReduction, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings reported by ``patch_settings``: the values in use, as plain Python values
    (``r`` an int or a list of ints, ``reduction_loc`` a tuple of ints, ``keep_rate`` a float).
    ``options`` is accepted for compatibility and not read."""
    return {
        **config.schedule.settings(),
        "linkage": config.linkage,
        "prop_attn": config.prop_attn,
        "size_mode": config.size_mode,
        "trace_source": config.trace_source,
        "protected": config.protected,
        "backend": config.backend,
    }


# --- attaching configuration to modules -------------------------------------------------------


def set_config(module: torch.nn.Module, config: ViTReduction) -> None:
    """Store the immutable ``config`` on ``module`` (not registered as a submodule/buffer)."""
    object.__setattr__(module, _CONFIG_ATTR, config)


def get_config(module: torch.nn.Module) -> ViTReduction:
    return vars(module)[_CONFIG_ATTR]


def clear_config(module: torch.nn.Module) -> None:
    for attr in (_CONFIG_ATTR, _TRACE_ATTR):
        if attr in vars(module):
            object.__delattr__(module, attr)


# --- the reduction step -----------------------------------------------------------------------


def _plan(metric: Tensor, r: int, config: ViTReduction) -> MergePlan:
    # ATC runs as a custom op under torch.compile (its output shape is fixed), so a patched
    # model compiles with fullgraph=True.
    return cluster_tokens(
        metric,
        r,
        method=config.method,
        linkage=config.linkage,
        protected=config.protected,
        backend=config.backend,
    )


def merge_step(config: ViTReduction, metric: Tensor, r: int, tokens: Tokens) -> Tokens:
    """Remove ``r`` tokens from ``tokens`` by merging those ``metric`` finds similar.

    Args:
        config: the model's reduction settings.
        metric: ``(B, N, D)`` attention keys averaged over heads.
        r: tokens to remove (the kernel clamps it to what the method can remove).
        tokens: the state after attention; ``tokens.x`` is ``(B, N, C)``.

    Returns:
        The state with ``N - r`` tokens: size-weighted means of each cluster and summed sizes
        (with ``size_mode="reset"``: unweighted means and ``size=None``), the merged source
        map (only with ``trace_source``), the merged attention mask and the composed
        input-grid map (only when ``tokens.grid`` is tracked).
    """
    if r <= 0:
        return tokens
    plan = _plan(metric, r, config)
    if plan.is_identity:
        return tokens
    source = plan.merge_source(tokens.source) if config.trace_source else None
    reset = config.size_mode == "reset"
    x, size = plan.merge_wavg(tokens.x, None if reset else tokens.size)
    size = None if reset else size
    mask = None if tokens.attn_mask is None else merge_attn_mask(tokens.attn_mask, plan)
    grid = None if tokens.grid is None else plan.labels.gather(1, tokens.grid)
    return Tokens(x, size, source, mask, grid)


def start_grid(x: Tensor) -> Tensor:
    """The identity input-grid map ``(B, N0)`` of tokens ``x`` ``(B, N0, C)`` (for
    :attr:`Tokens.grid`)."""
    b, n = x.shape[:2]
    return torch.arange(n, device=x.device).expand(b, n)


def to_grid(x: Tensor, grid: Tensor | None) -> Tensor:
    """Unmerge ``(B, N, C)`` tokens to the ``(B, N0, C)`` input grid: every input token gets
    the token it was merged into (``grid`` from :attr:`Tokens.grid`; ``None``: ``x`` itself)."""
    if grid is None:
        return x
    return x.gather(1, grid[..., None].expand(-1, -1, x.shape[-1]))


def check_traceable(config: ViTReduction, reduces: bool) -> None:
    """Refuse ``torch.jit.trace`` and ``torch.export`` of a model that reduces tokens.

    The merge plan depends on the data (which tokens are similar), so a trace would replay the
    plan of the example input on every other input, and export cannot follow the clustering.

    Raises:
        RuntimeError: saying so and what works instead.
    """
    if not reduces:
        return
    how = None
    if torch.jit.is_tracing():
        how, graph = "torch.jit.trace", "a traced"
    elif torch.compiler.is_exporting():
        how, graph = "torch.export", "an exported"
    if how is not None:
        raise RuntimeError(
            f"{how} is not supported for a model patched by atc_patch (method="
            f"{config.method!r}): which tokens merge depends on the input, which {graph} "
            "graph cannot follow. Use the eager model or torch.compile, or "
            "atc_patch.remove_patch(model) before tracing/exporting (docs/timm.md)"
        )


def refuse_script(model: torch.nn.Module) -> None:
    """``__prepare_scriptable__`` of patched modules: ``torch.jit.script`` cannot compile them.

    Raises:
        RuntimeError: saying so and what works instead.
    """
    raise RuntimeError(
        f"torch.jit.script is not supported for a {type(model).__name__} patched by atc_patch "
        "(the patched forwards use keyword-only arguments, named tuples and data-dependent "
        "token counts). Use the eager model or torch.compile, or atc_patch.remove_patch(model) "
        "before scripting (docs/timm.md)"
    )


def size_bias(size: Tensor | None, enabled: bool) -> Tensor | None:
    """Proportional attention: ``(B, 1, 1, N)`` bias ``log(size)`` on the keys, or ``None``.

    ``None`` before the first merge (all sizes are 1), which keeps unreduced models exact.
    """
    if not enabled or size is None:
        return None
    return size.log()[:, None, None, :, 0]


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
    """Carry an attention mask ``(N, N)`` or ``(B|1, H|1, N, N)`` through ``plan``.

    A merged query may attend to a merged key when any of their members could (boolean masks),
    or with the largest (least negative) of their additive values (float masks). The result is
    ``(B, H|1, N', N')``.
    """
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dim() != 4 or mask.shape[-1] != plan.num_in or mask.shape[-2] != plan.num_in:
        raise ValueError(
            f"attn_mask must be (N, N) or (B, H, N, N) with N={plan.num_in} to follow token "
            f"merging, got shape {tuple(mask.shape)}"
        )
    is_bool = mask.dtype == torch.bool
    work = mask.float() if is_bool else mask
    b, n = plan.labels.shape
    heads = work.shape[1]
    work = work.expand(b, heads, n, n)
    # keys: (B, H*N, N) -> (B, N, H*N) -> merge -> (B, N', H*N)
    cols = plan.merge(work.reshape(b, heads * n, n).transpose(1, 2), mode="amax")
    m = plan.num_out
    # queries: (B, N', H, N) -> (B, N, H*N') after moving the query axis to dim 1
    rows = cols.reshape(b, m, heads, n).permute(0, 3, 2, 1).reshape(b, n, heads * m)
    out = plan.merge(rows, mode="amax").reshape(b, m, heads, m).permute(0, 2, 1, 3)
    return out.bool() if is_bool else out.contiguous()


# --- the source map of the last forward ---------------------------------------------------------


class TraceSlot:
    """Per-thread holder of the last forward's source map (``trace_source=True``).

    Not state: ``copy.deepcopy`` and ``pickle`` (``torch.save``, ``timm.utils.ModelEmaV3``)
    give the copy its own empty slot (shared by the modules that shared the original one).
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


def enable_trace(*modules: torch.nn.Module) -> None:
    """Give ``modules`` one shared per-thread slot for the last forward's source map."""
    slot = TraceSlot()
    for module in modules:
        object.__setattr__(module, _TRACE_ATTR, slot)


def store_source(module: torch.nn.Module, tokens: Tokens, num_tokens: int) -> None:
    """Record the source map of a finished forward in the calling thread's slot.

    ``num_tokens`` is the number of tokens that entered the first block; without any merge
    the map is the identity ``(B, N0, N0)``.
    """
    source = tokens.source
    if source is None:
        b = tokens.x.shape[0]
        source = torch.eye(num_tokens, device=tokens.x.device).expand(b, -1, -1)
    vars(module)[_TRACE_ATTR].source = source


def last_source(model: torch.nn.Module) -> Tensor:
    """The source map of the last forward this thread ran on ``model`` (``trace_source=True``).

    Returns:
        ``(B, N_out, N0)`` 0/1 tensor: row ``i`` marks the tokens that entered the first block
        (prefix tokens first, then patches in raster order) merged into output token ``i``.

    The map is kept in a per-thread slot (a :class:`TraceSlot` created by ``apply_patch``):
    a forward in another thread never overwrites the map this thread reads. Replicas made by
    ``nn.DataParallel`` run in worker threads, so their maps stay in those threads' slots; read
    it from a forward on the model itself. The per-forward state (sizes, merged masks, the map
    under construction) never leaves the forward call, whatever the threading.
    """
    slot = vars(model).get(_TRACE_ATTR)
    if slot is None:
        raise ValueError("the model was not patched with trace_source=True")
    source = slot.source
    if source is None:
        raise ValueError("no forward has run on this model in this thread since patching")
    return source
