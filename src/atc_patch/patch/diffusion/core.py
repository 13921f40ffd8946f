"""The per-call state of a patched diffusion model, its plans, seeding and checkpoint replay.

One :class:`Call` per forward call of a patched root (a UNet or a diffusion transformer): made
by the root's forward pre-hook, held in a context variable (private to the thread and asyncio
task, so concurrent calls and replicas never share one) and dropped by its forward hook. The
running block (:class:`Active`: its spec, input tokens and plan, planned on first use) lives on
the call. Nothing that changes per call is stored on a module::

    enter_call(root, Call(grid, timestep))      # the family's root pre-hook
    active = active_block(index)                # in a sublayer of block ``index``
    plan = block_plan(active)                   # None: run unmerged

With ``plan_scope="resolution"`` or ``reuse_steps > 1`` a plan is looked up before it is made
(:mod:`.reuse`: one per token resolution per call, kept for ``reuse_steps`` calls); with
``tile`` the kernel clusters inside local tiles of the block's token grid.

``tome_sd``'s destinations and ``metric_dim``'s projection are drawn by :mod:`.draws`.
"""

from __future__ import annotations

import contextvars
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...kernel import cluster_tokens, max_reduction
from ...kernel.plan import MergePlan
from ..config import DiffusionConfig
from . import reuse
from .draws import metric_projection, picks

CKPT_ATTR = "_gradient_checkpointing_func"  # diffusers' per-module checkpoint function
# (tokens, latent stride) -> (h, w), or (t, h, w) for a video's frames x height x width
Grid = Callable[[int, int], tuple[int, ...]]


@dataclass(frozen=True)
class BlockSpec:
    """One patched block, fixed at patch time (bound into its hooks).

    Attributes:
        config: the patch's settings.
        index: the block's position in its family's block list (matches sublayers to their
            block; seeds ``tome_sd``'s draws).
        spans: ``(sublayer attribute, Span)`` pairs of the sublayers that follow the plan.
        downsample: the block's latent stride (UNets; its grid is the call's latent grid / d).
        text: where the block's text length comes from, for sublayers, position tables and
            masks that put the text first (:class:`~.merge.Span` ``after_text``): ``(position,
            name)`` of a block argument holding the text tokens (Flux), ``"call"`` (the call's
            :attr:`Call.text`, for blocks whose text is already in their input), or ``None``.
        joint_input: the block's ``hidden_states`` input is ``[text, image stream, ...]`` (Flux2
            and Chroma single-stream blocks), not the image stream.
        store: the root's :class:`~.reuse.PlanStore` (``reuse_steps > 1``; set by ``patch``).
    """

    config: DiffusionConfig
    index: int
    spans: tuple[tuple[str, Any], ...]
    downsample: int = 1
    text: tuple[int, str] | str | None = None
    joint_input: bool = False
    store: Any = field(default=None, compare=False)


class CallVar:
    """A context variable that also works while ``torch.compile`` traces, which cannot set
    one: then the value lives in a plain attribute, set and reset as traced side effects."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[Any] = contextvars.ContextVar(name, default=None)
        self._traced: Any = None

    def get(self) -> Any:
        return self._traced if torch.compiler.is_compiling() else self._var.get()

    def set(self, value: Any) -> Any:
        if torch.compiler.is_compiling():
            token, self._traced = (self._traced,), value
            return token
        return self._var.set(value)

    def reset(self, token: Any) -> None:
        if isinstance(token, tuple):
            self._traced = token[0]
        else:
            self._var.reset(token)


_CALL = CallVar("atc_patch_diffusion_call")


@dataclass(eq=False)
class Call:
    """One forward call of a patched root.

    Attributes:
        grid: ``grid(n, d) -> (h, w)`` (an image) or ``(t, h, w)`` (a video), the raster token
            grid of ``n`` tokens at latent stride ``d``; ``None`` when unknown (a block called
            on its own).
        timestep: the call's timestep (tensor or number), or ``None``.
        text: the call's text tokens, for blocks whose text length is not an argument
            (:attr:`BlockSpec.text` ``"call"``); ``None`` when unknown.
        skip: image-stream tokens in front of the generated image's (prepended reference
            images, a video's conditioning first frame); they never merge.
        count: the generated image's tokens; ``None``: every image-stream token from ``skip``
            on (what follows them, e.g. appended reference images or padding, never merges).
        key: ``tome_sd``'s random key of the call, ``(1,)`` int64, made on first use.
        drawn: ``tome_sd``'s destinations drawn from a user generator, per block index.
        active: the running block.
        standalone: made by a block called outside its root's forward.
        plans: the plans this call looked up (:mod:`.reuse`), by key.
        counted: whether the root's plan store has counted this call.
    """

    grid: Grid | None
    timestep: Any
    text: int | None = None
    skip: int = 0
    count: int | None = None
    key: Tensor | None = None
    drawn: dict[int, Tensor] = field(default_factory=dict)
    active: Active | None = None
    standalone: bool = False
    token: Any = field(default=None, repr=False)
    plans: dict[tuple, MergePlan | None] = field(default_factory=dict)
    counted: bool = False

    def grid_of(self, n: int, downsample: int) -> tuple[int, ...]:
        if self.grid is not None:
            return self.grid(n, downsample)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"method='tome_sd': cannot infer the token grid of {n} tokens: the block was "
                "called outside its model's forward"
            )
        return side, side


@dataclass(eq=False)
class Active:
    """The running block: its spec, its image tokens ``x`` ``(B, N, C)`` (the plan's metric),
    its ``text`` length and the call's ``skip``, and its plan once made."""

    spec: BlockSpec
    x: Tensor
    text: int
    skip: int
    call: Call
    plan: MergePlan | None = None
    planned: bool = False
    once_done: bool = False  # a Span(once=True) sublayer has run in this block call

    def start(self, after_text: bool) -> int:
        """Where the image tokens begin in a sequence that starts with the image stream, or
        (``after_text``) with the block's text."""
        return (self.text if after_text else 0) + self.skip


def check_grid_options(config: DiffusionConfig, video: bool, what: str) -> None:
    """Reject the 3-D options on a model with an image's ``(h, w)`` token grid (``st``, a
    3-D ``tile``) and a 2-D ``tile`` on a video's ``(t, h, w)`` grid."""
    tile = config.tile
    if not video and config.st is not None:
        raise ValueError(
            f"st={config.st} sets how many frames a tome_sd window spans on a video "
            f"transformer's frames x height x width grid; {what} has an image's (h, w) token "
            "grid: leave st unset and use sx/sy"
        )
    if tile is not None and len(tile) != (3 if video else 2):
        want = "(tt, th, tw): frames, height, width" if video else "(th, tw)"
        raise ValueError(
            f"tile={tile} does not fit {what}'s {'(t, h, w)' if video else '(h, w)'} token "
            f"grid: give {want}"
        )


def enter_call(root: nn.Module, call: Call) -> None:
    """Start ``call`` (a family's root forward pre-hook calls this)."""
    call.token = _CALL.set(call)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        wrap_checkpointing(root)


def exit_call(root: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """The root's forward hook (``always_call``): end the call."""
    call = _CALL.get()
    if call is not None and call.token is not None and not call.standalone:
        _CALL.reset(call.token)


def enter_block(spec: BlockSpec, block: nn.Module, args: tuple, kwargs: dict) -> None:
    """A patched block's forward pre-hook: make it the running block of its call."""
    call = _CALL.get()
    if call is None:  # called on its own: a call of its own
        call = Call(None, None, standalone=True)
        call.token = _CALL.set(call)
    x, text = image_tokens(spec, call, args, kwargs)
    call.active = Active(spec, x, text, call.skip, call)


def image_tokens(spec: BlockSpec, call: Call, args: tuple, kwargs: dict) -> tuple[Tensor, int]:
    """The block's image tokens ``(B, N, C)`` in its ``hidden_states`` input, and its text
    length (0 without text): the input is ``[text (joint_input), skip tokens, N image tokens,
    ...]``."""
    x = args[0] if args else kwargs["hidden_states"]
    text = 0
    if isinstance(spec.text, tuple):
        pos, name = spec.text
        text = int((args[pos] if len(args) > pos else kwargs[name]).shape[1])
    elif spec.text == "call":
        if call.text is None:
            raise ValueError(
                f"token merging: block {spec.index} takes its text length from its model's "
                "call; run the model, not the block on its own"
            )
        text = call.text
    begin = (text if spec.joint_input else 0) + call.skip
    end = x.shape[1] if call.count is None else begin + call.count
    if begin == 0 and end == x.shape[1]:
        return x, text
    return x[:, begin:end], text


def exit_block(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """A patched block's forward hook (``always_call``)."""
    call = _CALL.get()
    if call is not None:
        call.active = None
        if call.standalone:
            _CALL.reset(call.token)


def active_block(index: int) -> Active | None:
    """The running block if it is block ``index`` of its root, else ``None``."""
    call = _CALL.get()
    active = None if call is None else call.active
    return active if active is not None and active.spec.index == index else None


def block_plan(active: Active) -> MergePlan | None:
    """The running block's plan (made on first use, or found in :mod:`.reuse`'s stores),
    ``None`` to run unmerged."""
    if not active.planned:
        cfg = active.spec.config
        make = functools.partial(_plan, active.call, active.spec, active.x)
        if cfg.plan_scope == "block" and cfg.reuse_steps == 1:
            active.plan = make()
        else:
            active.plan = reuse.lookup(active.call, active.spec, active.x, make)
        active.planned = True
    return active.plan


def _plan(call: Call, spec: BlockSpec, x: Tensor) -> MergePlan | None:
    """The plan for image tokens ``x`` ``(B, N, C)``; ``None`` when nothing merges (``r = 0``,
    an empty batch, or a ``tome_sd`` grid smaller than one window, which warns)."""
    cfg = spec.config
    b, n, c = x.shape
    r = int(n * cfg.ratio)
    if r <= 0 or b == 0:
        return None
    metric = x.detach()
    if cfg.metric_dim is not None and cfg.metric_dim < c:
        metric = metric @ metric_projection(c, cfg.metric_dim, metric)
    if cfg.method == "tome_sd":
        grid = call.grid_of(n, spec.downsample)
        window = (cfg.st or 1, cfg.sy, cfg.sx)[3 - len(grid) :]
        shape = _window_text(window)
        windows = tuple(g // s for g, s in zip(grid, window, strict=True))
        if 0 in windows:
            _warn(
                f"method='tome_sd': a block at downsample {spec.downsample} has a "
                f"{'x'.join(map(str, grid))} token grid, smaller than one {shape} window, so it "
                "merges nothing (use smaller sx/sy/st, larger latents or a smaller max_downsample)"
            )
            return None
        cap = n - math.prod(windows)
        _warn_capped(cfg, r, n, cap, f"ToMe-SD keeps one destination per {shape} window")
        # tomesd: an odd batch cannot be a CFG pair, and shared random draws give artifacts.
        rand = cfg.use_rand and b % 2 == 0
        pick = picks(call, cfg, spec.index, windows, x.device) if rand else None
        st = cfg.st if len(grid) == 3 else None
        plan = cluster_tokens(
            metric, r, "tome_sd", grid=grid, sx=cfg.sx, sy=cfg.sy, st=st, no_rand=not rand,
            pick=pick,
        )  # fmt: skip
    else:
        tiles = {}
        if cfg.tile is not None:
            tiles = {"grid": _tile_grid(call, spec, n), "tile": cfg.tile}
            cap = max_reduction(cfg.method, n, **tiles)
            shape = "x".join(map(str, cfg.tile))
            _warn_capped(cfg, r, n, cap, f"each {shape} tile keeps a token")
        elif cfg.method == "tome":
            cap = max_reduction("tome", n)
            _warn_capped(cfg, r, n, cap, "ToMe merges one half of the tokens into the other")
        options = {"linkage": cfg.linkage, "backend": cfg.backend} if cfg.method == "atc" else {}
        plan = cluster_tokens(metric, r, cfg.method, **options, **tiles)
    return None if plan.is_identity else plan


def _window_text(window: tuple[int, ...]) -> str:
    """``"sy x sx = 2x2"`` / ``"st x sy x sx = 1x2x2"``."""
    names = ("st", "sy", "sx")[3 - len(window) :]
    return " x ".join(names) + " = " + "x".join(map(str, window))


def _tile_grid(call: Call, spec: BlockSpec, n: int) -> tuple[int, ...]:
    """The ``(h, w)`` / ``(t, h, w)`` token grid that ``tile`` cuts (the family's, as
    ``tome_sd``'s); ``tile`` must have one size per grid axis."""
    try:
        grid = call.grid_of(n, spec.downsample)
    except ValueError as err:
        raise ValueError(
            f"tile={spec.config.tile} clusters inside tiles of the token grid, which cannot be "
            f"found here ({err}); use tile=None"
        ) from None
    if len(grid) != len(spec.config.tile):
        want = (
            "(tt, th, tw) for a video's frames x height x width" if len(grid) == 3 else "(th, tw)"
        )
        raise ValueError(
            f"tile={spec.config.tile} does not fit this call's {len(grid)}-D token grid "
            f"{grid}: give {want}"
        )
    return grid


def _warn(message: str) -> None:
    if not torch.compiler.is_compiling():
        warnings.warn(message, stacklevel=5)


def _warn_capped(cfg: DiffusionConfig, r: int, n: int, cap: int, why: str) -> None:
    """An unreachable ``ratio`` warns (once per message, Python's default) with what is kept."""
    if r > cap:
        _warn(
            f"method={cfg.method!r}: ratio={cfg.ratio} asks for {r} of a block's {n} tokens, but "
            f"at most {cap} can be removed ({why}); the block removes {cap} and keeps {n - cap}"
        )


# --------------------------------------------------------------------------------------------
# Gradient checkpointing: a recomputed block runs within the call it belongs to
# --------------------------------------------------------------------------------------------
class CheckpointInCall:
    """Wraps a module's ``_gradient_checkpointing_func(module, *args)`` (what every diffusers
    model calls on a block when checkpointing): ``module`` is handed on as a callable that runs
    it within the current call, also when the function calls it again in ``backward()``."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        call = _CALL.get()
        if call is None:
            return self.func(module, *args, **kwargs)
        return self.func(_InCall(module, call), *args, **kwargs)


class _InCall:
    """``module`` as a checkpoint function sees it: ``__call__`` runs it within ``call``."""

    def __init__(self, module: Any, call: Call) -> None:
        self.module = module
        self.call = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _CALL.get() is self.call:
            return self.module(*args, **kwargs)
        token = _CALL.set(self.call)
        try:
            return self.module(*args, **kwargs)
        finally:
            _CALL.reset(token)

    def __getattr__(self, name: str) -> Any:  # anything else a checkpoint function reads
        return getattr(self.__dict__["module"], name)


def wrap_checkpointing(root: nn.Module) -> None:
    """Wrap (once) every ``_gradient_checkpointing_func`` under ``root``; run at the start of
    each gradient-enabled call, so it also covers checkpointing enabled after patching."""
    for m in root.modules():
        func = vars(m).get(CKPT_ATTR)
        if func is not None and not isinstance(func, CheckpointInCall):
            object.__setattr__(m, CKPT_ATTR, CheckpointInCall(func))


def unwrap_checkpointing(root: nn.Module) -> None:
    """Undo :func:`wrap_checkpointing` under ``root``."""
    for m in root.modules():
        func = vars(m).get(CKPT_ATTR)
        if isinstance(func, CheckpointInCall):
            object.__setattr__(m, CKPT_ATTR, func.func)
