"""Token reduction for diffusers Stable Diffusion UNets (SD 1.x / 2.x / XL), ToMe-SD style.

Every patched ``BasicTransformerBlock`` computes one merge plan from its input tokens
``(B, N, C)`` (``N = h * w``, the block's latent grid) and runs self-attention (optionally also
cross-attention and the MLP) on the ``N - r`` merged tokens, ``r = int(N * ratio)``; the output
is unmerged back to ``N`` tokens before the residual add, as in "Token Merging for Fast Stable
Diffusion" (Bolya & Hoffman, 2023). The plan comes from the shared kernel
(:func:`atc_patch.cluster_tokens`): ``"atc"`` (agglomerative clustering), ``"tome_sd"`` (ToMe-SD's
2-D random bipartite matching), ``"tome"``, ``"kmedoids"`` or ``"dpcknn"``.

How the patch touches the model, and nothing else:

* the block's class gets a mixin whose ``forward(hidden_states, *args, **kwargs)`` computes the
  plan and calls diffusers' own ``forward`` with every argument untouched, so the block keeps
  working whatever arguments diffusers adds;
* ``attn1`` (and ``attn2`` / ``ff`` if asked) get a mixin that merges their input and unmerges
  their output. Attention *processors* are not touched: SDPA, IP-Adapter or any custom
  processor keep running, on fewer query tokens;
* the UNet gets a forward pre-hook / hook pair that records the latent size ``(H, W)`` of the
  call (the block grid is ``(ceil(H / d), ceil(W / d))`` at downsample ``d``).

Per-call state (latent size, the call's random generator, the running block's plan) lives in
:mod:`contextvars` variables that are set on entry and reset on exit. Context variables are
private to the thread (and asyncio task) that sets them, so concurrent calls on one model,
e.g. DataParallel replicas or a thread pool, never see each other's state. What is stored on
the modules is configuration only, fixed at patch time.

Gradient checkpointing (``unet.enable_gradient_checkpointing()``) recomputes a block during
``backward()``, outside the UNet call, where the context variables are unset. So while the
UNet runs with gradients, each module's ``_gradient_checkpointing_func`` is wrapped
(:class:`CheckpointWithCallState`): a patched block is checkpointed together with a snapshot of
the call state it starts with (:meth:`UNetCall.snapshot`), and its recomputation runs under
that snapshot: the same latent grid and the same random draws as the first pass.

Which blocks: those whose downsample factor (2 ** number of downsamplers before them) is at
most ``max_downsample``. The default, ``max_downsample=None``, means the highest-resolution
level that has attention: downsample 1 on SD 1.x/2.x (as tomesd's default), 2 on SDXL, whose
first level has no attention (tomesd's default merges nothing there). An explicit value keeps
tomesd's meaning; if it selects no block, :func:`apply` raises instead of doing nothing.
"""

from __future__ import annotations

import contextvars
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import CROSS_FAMILY_HINTS, as_bool, as_float, as_int, check_options
from ..kernel import BACKENDS, LINKAGES, cluster_tokens, max_reduction
from ..kernel.plan import MergePlan
from ._common import (
    PatchInfo,
    clear_patch_info,
    get_patch_info,
    restore_tree,
    set_patch_info,
    swap_class,
)

FAMILY = "diffusers"
METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")

COMMON_OPTIONS = ("ratio", "max_downsample", "merge_attn", "merge_crossattn", "merge_mlp")
TOME_SD_OPTIONS = ("sx", "sy", "use_rand", "seed", "generator")
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "atc": (*COMMON_OPTIONS, "linkage", "backend"),
    "tome_sd": (*COMMON_OPTIONS, *TOME_SD_OPTIONS),
    "tome": COMMON_OPTIONS,
    "kmedoids": COMMON_OPTIONS,
    "dpcknn": COMMON_OPTIONS,
}
# Options whose ``None`` means "the default": passing them as None is the same as leaving them out.
_NONE_IS_DEFAULT = ("linkage", "max_downsample", "seed", "generator")

_CFG_ATTR = "_atc_diffusers_cfg"  # on a patched BasicTransformerBlock: its _BlockConfig
_HOOKS_ATTR = "_atc_diffusers_hooks"  # on a patched UNet: the latent-size hook handles
_CKPT_ATTR = "_gradient_checkpointing_func"  # diffusers' per-module checkpoint function
_CKPT_OWNERS_ATTR = "_atc_diffusers_ckpt_owners"  # on a patched UNet: modules that checkpoint


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What :func:`apply` was given (after defaults are resolved)."""

    ratio: float = 0.5
    linkage: str | None = None
    max_downsample: int | None = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int | None = None
    backend: str = "auto"


@dataclass(frozen=True)
class _BlockConfig:
    """Immutable per-block configuration: the method, its settings and the block's downsample."""

    method: str
    settings: Settings
    downsample: int
    generator: torch.Generator | None  # user-supplied, shared by design (see apply())


# --------------------------------------------------------------------------------------------
# Per-call state (context variables; see the module docstring)
# --------------------------------------------------------------------------------------------
class UNetCall:
    """State of one UNet forward call: its latent size and the generator ``tome_sd`` draws from.

    A replay (:meth:`CallSnapshot.restore`) carries a copy of the user's generator as it was
    when the block started, so a recomputation neither draws other destinations nor advances
    the user's generator.
    """

    def __init__(self, latent_hw: tuple[int, int], timestep: Any) -> None:
        self.latent_hw = latent_hw
        self._timestep = timestep
        self._generator: torch.Generator | None = None
        self._user_copy: torch.Generator | None = None
        # Under torch.compile, where no generator exists: the (high, rows, cols) draws of the
        # blocks so far (see _tome_sd_call_labels).
        self.draws: list[int] = []
        self.token: contextvars.Token | None = None

    def generator(self, cfg: _BlockConfig) -> torch.Generator:
        """The generator block ``cfg`` draws from: the user's ``generator`` if one was given,
        else this call's own CPU generator, seeded from ``(seed, timestep)`` on first use (every
        denoising step draws new destinations, the same run draws the same ones)."""
        if cfg.generator is not None:
            return self._user_copy if self._user_copy is not None else cfg.generator
        if self._generator is None:
            seed = cfg.settings.seed if cfg.settings.seed is not None else 0
            self._generator = _call_generator(seed, self._timestep)
        return self._generator

    def snapshot(self, cfg: _BlockConfig) -> CallSnapshot:
        """What block ``cfg`` sees of this call now, before it runs: the latent size and the
        state of the generator it would draw from."""
        user = None
        if cfg.generator is not None:
            g = self._user_copy if self._user_copy is not None else cfg.generator
            user = (g.device, g.get_state())
        own = None if self._generator is None else self._generator.get_state()
        return CallSnapshot(self.latent_hw, self._timestep, own, user, tuple(self.draws))


@dataclass(frozen=True)
class CallSnapshot:
    """A :class:`UNetCall` frozen at the start of one block, to replay that block."""

    latent_hw: tuple[int, int]
    timestep: Any
    generator_state: Tensor | None  # the call's own generator, if it was made yet
    user_generator: tuple[torch.device, Tensor] | None = None  # (device, state) of the user's
    draws: tuple[int, ...] = ()  # UNetCall.draws (under torch.compile)

    def restore(self) -> UNetCall:
        """A fresh :class:`UNetCall` in this state (each restore draws the same numbers)."""
        call = UNetCall(self.latent_hw, self.timestep)
        if self.generator_state is not None:
            call._generator = torch.Generator().set_state(self.generator_state)
        if self.user_generator is not None:
            device, state = self.user_generator
            call._user_copy = torch.Generator(device=device).set_state(state)
        call.draws = list(self.draws)
        return call


_UNetCall = UNetCall  # former name


def _call_generator(seed: int, timestep: Any) -> torch.Generator:
    """The CPU generator of a UNet call at ``timestep`` (a number or a tensor) for ``seed``."""
    t = float(timestep.reshape(-1)[0]) if isinstance(timestep, Tensor) else float(timestep or 0.0)
    return torch.Generator().manual_seed((seed * 1_000_003 + int(round(t * 1000))) % (2**63))


@torch.library.custom_op("atc_patch::tome_sd_call_labels", mutates_args=())
def _tome_sd_call_labels(
    x: Tensor, timestep: Tensor, seed: int, before: list[int], grid: list[int], r: int
) -> Tensor:
    """ToMe-SD labels ``(B, N)`` of one block under ``torch.compile``, which cannot hold a
    ``torch.Generator``: the call's generator is re-made from ``(seed, timestep)`` and advanced
    past the draws of the blocks before (``before``: ``(high, rows, cols)`` triples), so the
    destinations equal eager mode's. ``grid`` is ``(h, w, sx, sy)``."""
    gen = _call_generator(seed, timestep)
    for high, rows, cols in zip(before[0::3], before[1::3], before[2::3], strict=True):
        torch.randint(high, (rows, cols, 1), generator=gen)
    h, w, sx, sy = grid
    plan = cluster_tokens(x, r, "tome_sd", h=h, w=w, sx=sx, sy=sy, generator=gen)
    return plan.labels.clone()


@_tome_sd_call_labels.register_fake
def _(x: Tensor, timestep: Tensor, seed: int, before: list[int], grid: list[int], r: int):
    return x.new_empty(x.shape[:2], dtype=torch.long)


def _compiled_tome_sd_plan(
    call: UNetCall, x: Tensor, r: int, s: Settings, h: int, w: int
) -> MergePlan:
    """The randomised ToMe-SD plan inside ``torch.compile`` (see :func:`_tome_sd_call_labels`)."""
    hsy, wsx = h // s.sy, w // s.sx
    sources = x.shape[1] - hsy * wsx
    if r <= 0 or hsy == 0 or wsx == 0 or sources == 0:
        return MergePlan.identity(x.shape[0], x.shape[1], x.device)
    t = call._timestep
    t = t if isinstance(t, Tensor) else torch.tensor(float(t or 0.0))
    seed = s.seed if s.seed is not None else 0
    labels = _tome_sd_call_labels(x.detach(), t, seed, list(call.draws), [h, w, s.sx, s.sy], r)
    call.draws.extend((s.sx * s.sy, hsy, wsx))
    return MergePlan(labels, x.shape[1] - min(r, sources))


@dataclass(frozen=True)
class _ActiveMerge:
    """The plan of the block that is running, and the submodules that must follow it."""

    plan: MergePlan
    targets: tuple[nn.Module, ...]


class _CallVar:
    """A context variable (``get`` / ``set`` -> token / ``reset(token)``) that also works
    inside ``torch.compile``, which cannot set context variables: while compiling, the value
    lives in a plain attribute that dynamo traces as a side effect of the compiled call."""

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


_UNET_CALL = _CallVar("atc_patch_unet_call")  # holds a UNetCall or None
_ACTIVE = _CallVar("atc_patch_active_merge")  # holds an _ActiveMerge or None


def _unet_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    call = UNetCall((int(sample.shape[-2]), int(sample.shape[-1])), timestep)
    call.token = _UNET_CALL.set(call)
    if torch.is_grad_enabled():
        wrap_checkpointing(vars(module).get(_CKPT_OWNERS_ATTR, ()))


def _unet_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    call = _UNET_CALL.get()
    if call is not None and call.token is not None:
        _UNET_CALL.reset(call.token)


# --------------------------------------------------------------------------------------------
# Gradient checkpointing: the recomputation sees the call state of the first pass
# --------------------------------------------------------------------------------------------
class CheckpointWithCallState:
    """Wraps a module's ``_gradient_checkpointing_func(block, *args)`` (diffusers calls it on
    each block when ``gradient_checkpointing`` is on). A patched block (one carrying
    ``_CFG_ATTR``) is handed to ``func`` as a :class:`_ReplayingBlock` holding the call state
    it starts with; any other module is passed through unchanged."""

    def __init__(self, func: Any) -> None:
        self.func = func

    def __call__(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        call = _UNET_CALL.get()
        cfg = vars(module).get(_CFG_ATTR) if isinstance(module, nn.Module) else None
        if cfg is None or call is None:
            return self.func(module, *args, **kwargs)
        return self.func(_ReplayingBlock(module, call.snapshot(cfg)), *args, **kwargs)


class _ReplayingBlock:
    """A patched block as a checkpoint function sees it: the first call runs the block inside
    the UNet call (advancing the call's generator as an unchecked run does); every later call
    (the recomputation in ``backward()``) runs it under a restored copy of the snapshot."""

    def __init__(self, block: nn.Module, snapshot: CallSnapshot) -> None:
        self.block = block
        self.snapshot = snapshot
        self.ran = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.ran:
            self.ran = True
            return self.block(*args, **kwargs)
        token = _UNET_CALL.set(self.snapshot.restore())
        try:
            return self.block(*args, **kwargs)
        finally:
            _UNET_CALL.reset(token)

    def __getattr__(self, name: str) -> Any:  # anything else a checkpoint function reads
        return getattr(self.__dict__["block"], name)


def checkpointing_modules(root: nn.Module) -> tuple[nn.Module, ...]:
    """The modules under ``root`` that can checkpoint their children (diffusers gives them a
    ``gradient_checkpointing`` flag at construction)."""
    return tuple(m for m in root.modules() if "gradient_checkpointing" in vars(m))


def wrap_checkpointing(modules: Any) -> None:
    """Wrap (once) the ``_gradient_checkpointing_func`` of each of ``modules`` (an iterable,
    see :func:`checkpointing_modules`) that has gradient checkpointing on. Run on entry of every
    gradient-enabled call, so that it also covers ``enable_gradient_checkpointing()`` called
    after patching."""
    for m in modules:
        func = vars(m).get(_CKPT_ATTR)
        if (
            func is not None
            and getattr(m, "gradient_checkpointing", False)
            and not isinstance(func, CheckpointWithCallState)
        ):
            object.__setattr__(m, _CKPT_ATTR, CheckpointWithCallState(func))


def unwrap_checkpointing(root: nn.Module) -> None:
    """Undo :func:`wrap_checkpointing` under ``root``."""
    for m in root.modules():
        func = vars(m).get(_CKPT_ATTR)
        if isinstance(func, CheckpointWithCallState):
            object.__setattr__(m, _CKPT_ATTR, func.func)


# --------------------------------------------------------------------------------------------
# The mixins
# --------------------------------------------------------------------------------------------
class _TokenMergeBlock:
    """Mixin for ``BasicTransformerBlock``: plan the merge, then run diffusers' forward."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        plan = _block_plan(getattr(self, _CFG_ATTR), hidden_states)
        if plan is None:
            return super().forward(hidden_states, *args, **kwargs)
        cfg = getattr(self, _CFG_ATTR)
        if cfg.settings.merge_mlp:
            _warn_if_chunked(self, hidden_states)
        targets = tuple(
            m
            for m, on in (
                (self.attn1, cfg.settings.merge_attn),
                (getattr(self, "attn2", None), cfg.settings.merge_crossattn),
                (self.ff, cfg.settings.merge_mlp),
            )
            if on and m is not None
        )
        token = _ACTIVE.set(_ActiveMerge(plan, targets))
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)


def _warn_if_chunked(block: nn.Module, hidden_states: Tensor) -> None:
    """diffusers' ``set_chunk_feed_forward`` runs the MLP on chunks of the tokens (or of the
    batch), which cannot follow the block's merge: say so (the MLP runs unmerged)."""
    size, dim = getattr(block, "_chunk_size", None), getattr(block, "_chunk_dim", 0)
    if size is not None and size < hidden_states.shape[dim]:
        warnings.warn(
            "merge_mlp=True with feed-forward chunking (set_chunk_feed_forward): the MLP sees "
            "chunks, not the merged tokens, so it runs unmerged (self-attention still merges)",
            stacklevel=2,
        )


class _MergeAround:
    """Mixin for ``attn1`` / ``attn2`` / ``ff``: merge the input ``(B, N, C)`` to
    ``(B, N - r, C)``, run the module (its processor untouched), unmerge the output to
    ``(B, N, C)``. Outside its block's merge (or with an unexpected shape) it is a no-op.

    In self-attention the keys are the merged tokens too, so a key mask ``attention_mask``
    ``(B, 1, N)`` or ``(B, N)`` (a bias, as diffusers passes it) is merged with them: a merged
    key is as visible as its most visible token (``amax`` of the bias).
    """

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        active = _ACTIVE.get()
        if (
            active is None
            or not any(m is self for m in active.targets)
            or hidden_states.dim() != 3
            or hidden_states.shape[:2] != active.plan.labels.shape
        ):
            return super().forward(hidden_states, *args, **kwargs)
        plan = active.plan
        mask = kwargs.get("attention_mask")
        if mask is not None and kwargs.get("encoder_hidden_states") is None and not args:
            kwargs = dict(kwargs, attention_mask=_merge_key_mask(plan, mask))
        out = super().forward(plan.merge(hidden_states), *args, **kwargs)
        return plan.unmerge(out)


def _merge_key_mask(plan: MergePlan, mask: Tensor) -> Tensor:
    """Merge a self-attention key bias ``(B|1, 1, N)`` / ``(B|1, N)`` over the plan's clusters."""
    if (
        mask.shape[-1] != plan.num_in
        or mask.dim() not in (2, 3)
        or mask.numel() != mask.shape[0] * plan.num_in
    ):
        raise ValueError(
            f"token merging supports a self-attention key mask of shape (B, 1, N) or (B, N) "
            f"with N = {plan.num_in}, got {tuple(mask.shape)}"
        )
    bias = mask.reshape(mask.shape[0], plan.num_in, 1).expand(plan.labels.shape[0], -1, -1)
    merged = plan.merge(bias, mode="amax")  # (B, N - r, 1)
    return merged.reshape(merged.shape[0], *([1] if mask.dim() == 3 else []), plan.num_out)


def _block_plan(cfg: _BlockConfig, x: Tensor) -> MergePlan | None:
    """The merge plan for block input ``x`` ``(B, N, C)``, or ``None`` to run unchanged.

    ``None`` when nothing is removed (``int(N * ratio) == 0``), for an empty batch (``B == 0``:
    the block runs as unpatched) and for a ``tome_sd`` grid smaller than one window (warned).
    """
    b, n, _ = x.shape
    r = int(n * cfg.settings.ratio)
    if r <= 0 or b == 0:
        return None
    options = _method_options(cfg, b, n)
    if options is None:
        return None
    _warn_if_capped(cfg, r, n, options)
    call = _UNET_CALL.get()
    if cfg.method == "tome_sd" and not options["no_rand"] and _draws_compiled(cfg, call):
        return _compiled_tome_sd_plan(call, x, r, cfg.settings, options["h"], options["w"])
    return cluster_tokens(x, r, cfg.method, **options)


def _warn_if_capped(cfg: _BlockConfig, r: int, n: int, options: dict[str, Any]) -> None:
    """ToMe's bipartite split removes at most half the tokens, ToMe-SD's at most all but one
    per window: warn when ``ratio`` asks for more (the kernel removes what it can)."""
    if cfg.method == "tome":
        cap, why = max_reduction("tome", n), "ToMe merges one half of the tokens into the other"
    elif cfg.method == "tome_sd":
        s = cfg.settings
        cap = n - (options["h"] // s.sy) * (options["w"] // s.sx)
        why = f"ToMe-SD keeps one destination per {s.sy}x{s.sx} window"
    else:
        return
    if r > cap:
        warnings.warn(
            f"method={cfg.method!r}: ratio={cfg.settings.ratio} asks for {r} of a block's {n} "
            f"tokens, but at most {cap} can be removed ({why}); the block removes {cap}",
            stacklevel=3,
        )


def _method_options(cfg: _BlockConfig, b: int, n: int) -> dict[str, Any] | None:
    """The method-specific ``cluster_tokens`` arguments for a block input ``(b, n, C)``, or
    ``None`` when the method can merge nothing there."""
    s = cfg.settings
    if cfg.method == "atc":
        return {"linkage": s.linkage, "backend": s.backend}
    if cfg.method != "tome_sd":
        return {}
    call = _UNET_CALL.get()
    h, w = _block_grid(call, cfg.downsample, n)
    if h < s.sy or w < s.sx:
        warnings.warn(
            f"method='tome_sd': a block at downsample {cfg.downsample} has a {h}x{w} token "
            f"grid, smaller than one sy x sx = {s.sy}x{s.sx} window, so it merges nothing "
            "(use smaller sx/sy, larger latents or a smaller max_downsample)",
            stacklevel=2,
        )
        return None
    # tomesd: with an odd batch the prompted and unprompted halves of a CFG batch cannot both
    # be present, and shared random destinations give artifacts, so randomness is turned off.
    use_rand = s.use_rand and b % 2 == 0
    gen = None
    if use_rand:
        if call is None:
            gen = cfg.generator
        elif not _draws_compiled(cfg, call):  # else _compiled_tome_sd_plan draws
            gen = call.generator(cfg)
    return dict(h=h, w=w, sx=s.sx, sy=s.sy, no_rand=not use_rand, generator=gen)


def _draws_compiled(cfg: _BlockConfig, call: UNetCall | None) -> bool:
    """Whether a randomised ``tome_sd`` block draws through the custom op: while compiling
    (no ``torch.Generator`` in a graph), from the call's own generator (no user generator)."""
    return call is not None and cfg.generator is None and torch.compiler.is_compiling()


def _block_grid(call: UNetCall | None, downsample: int, n: int) -> tuple[int, int]:
    """The ``(h, w)`` token grid of a block at ``downsample`` with ``n = h * w`` tokens."""
    if call is not None:
        lat_h, lat_w = call.latent_hw
        for d in (
            downsample,
            max(1, math.ceil(math.sqrt(lat_h * lat_w // n))),
        ):  # 2nd: tomesd's rule
            h, w = -(-lat_h // d), -(-lat_w // d)
            if h * w == n:
                return h, w
    side = math.isqrt(n)
    if side * side == n:
        return side, side
    where = "the latent size is unknown (block called outside the UNet forward)"
    if call is not None:
        where = f"latents are {call.latent_hw[0]}x{call.latent_hw[1]}"
    raise ValueError(f"method='tome_sd': cannot infer the token grid of {n} tokens; {where}")


# --------------------------------------------------------------------------------------------
# Finding the UNet and its blocks
# --------------------------------------------------------------------------------------------
def _unet_of(model: Any) -> nn.Module | None:
    if "diffusers" not in sys.modules:
        return None
    from diffusers import UNet2DConditionModel

    unet = getattr(model, "unet", model)
    return unet if isinstance(unet, UNet2DConditionModel) else None


def matches(model: Any) -> bool:
    """A ``UNet2DConditionModel`` or a pipeline whose ``.unet`` is one."""
    return _unet_of(model) is not None


def find_patch_info(model: Any) -> PatchInfo | None:
    """The patch record of ``model``'s UNet (``model`` itself or ``pipe.unet``), or ``None``.

    The record lives on the UNet only, so a pipeline and its UNet always agree, whichever of
    the two was patched.
    """
    unet = _unet_of(model)
    return None if unet is None else get_patch_info(unet)


def transformer_blocks(unet: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(downsample, block)`` for every ``BasicTransformerBlock`` in the UNet's down, mid and
    up blocks; ``downsample`` is the block's latent stride (1 = full latent resolution)."""
    from diffusers.models.attention import BasicTransformerBlock

    def blocks_in(m: nn.Module | None) -> list[nn.Module]:
        return [] if m is None else [b for b in m.modules() if isinstance(b, BasicTransformerBlock)]

    out: list[tuple[int, nn.Module]] = []
    d = 1
    for down in unet.down_blocks:
        out += [(d, b) for b in blocks_in(down)]
        if getattr(down, "downsamplers", None) is not None:
            d *= 2
    out += [(d, b) for b in blocks_in(unet.mid_block)]
    for up in unet.up_blocks:
        out += [(d, b) for b in blocks_in(up)]
        if getattr(up, "upsamplers", None) is not None:
            d = max(d // 2, 1)
    return out


# --------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------
def apply(model: Any, method: str = "atc", **options: Any) -> PatchInfo:
    """Patch a ``UNet2DConditionModel`` (or ``pipe.unet``) in place for token reduction.

    Args:
        model: the UNet, or a pipeline holding it as ``.unet``.
        method: ``"atc"``, ``"tome_sd"``, ``"tome"``, ``"kmedoids"`` or ``"dpcknn"``.
        **options: (:data:`METHOD_OPTIONS` lists which ones each method takes)

            * ``ratio`` (``0.5``): fraction of a block's tokens removed, ``0 <= ratio < 1``;
              ``r = int(N * ratio)``. ``ratio=0`` leaves outputs bit-identical.
            * ``max_downsample`` (``None``): patch blocks whose latent stride is at most this;
              ``None`` = the highest-resolution level that has attention (1 on SD 1.x/2.x,
              2 on SDXL).
            * ``merge_attn``, ``merge_crossattn``, ``merge_mlp`` (``True, False, False``): which
              sublayers run on merged tokens.
            * ``linkage`` (``"atc"`` only, ``"average"``): ``"single"``, ``"complete"`` or
              ``"average"``.
            * ``backend`` (``"atc"`` only, ``"auto"``): the ATC kernel, one of
              :data:`~atc_patch.kernel.BACKENDS` (see :func:`~atc_patch.cluster_tokens`).
            * ``sx``, ``sy``, ``use_rand`` (``"tome_sd"`` only, ``2, 2, True``), as in tomesd:
              one destination per ``sy x sx`` window (at least 2 tokens), drawn at random
              (``use_rand``, turned off for odd batches) or top-left.
            * ``seed`` (``"tome_sd"`` only, used with ``use_rand``): call ``t`` of the UNet draws
              from a generator seeded by ``(seed, t)``, so runs are reproducible and calls are
              independent. Default: a seed taken (without advancing it) from the global torch
              RNG at patch time.
            * ``generator`` (instead of ``seed``): draw from this ``torch.Generator`` (advanced
              by every call; re-seed it to reproduce a run; shared by concurrent calls).

            ``None`` for ``linkage``, ``max_downsample``, ``seed`` or ``generator`` means the
            default. Integer options take integral numbers of any type (``2.0``,
            ``numpy.int64(2)``); booleans take ``True``/``False`` only.

    Raises:
        TypeError: ``model`` is neither a ``UNet2DConditionModel`` nor a pipeline holding one.
        ValueError: an unknown option (the message lists the valid ones for ``method``, and
            the diffusers equivalent of ViT options such as ``r``/``keep_rate``), an option of
            another method, a bad value, or settings that merge nothing.
    """
    unet = _unet_of(model)
    if unet is None:
        raise TypeError("expected a diffusers UNet2DConditionModel or a pipeline with .unet")
    settings, generator = _validated_settings(method, options)
    if _is_patched(unet):
        remove(unet)
    clear_patch_info(model)  # a record left by an older version on the pipeline
    blocks = transformer_blocks(unet)
    levels = sorted({d for d, _ in blocks})
    if not levels:
        raise ValueError("this UNet has no BasicTransformerBlock: there is nothing to reduce")
    limit = settings.max_downsample if settings.max_downsample is not None else levels[0]
    chosen = [(d, b) for d, b in blocks if d <= limit]
    if not chosen:
        raise ValueError(
            f"max_downsample={limit} selects no transformer block: this UNet has attention at "
            f"downsample {levels} only (SDXL has none at 1). Use max_downsample>={levels[0]} "
            "or None (the highest-resolution level with attention)."
        )
    settings = _replace(settings, max_downsample=limit)
    for d, block in chosen:
        object.__setattr__(block, _CFG_ATTR, _BlockConfig(method, settings, d, generator))
        swap_class(block, _TokenMergeBlock)
        for name, on in (
            ("attn1", settings.merge_attn),
            ("attn2", settings.merge_crossattn),
            ("ff", settings.merge_mlp),
        ):
            sub = getattr(block, name, None)
            if on and sub is not None:
                swap_class(sub, _MergeAround)
    hooks = (
        unet.register_forward_pre_hook(_unet_pre_hook, with_kwargs=True),
        unet.register_forward_hook(_unet_post_hook, with_kwargs=True, always_call=True),
    )
    object.__setattr__(unet, _HOOKS_ATTR, hooks)
    object.__setattr__(unet, _CKPT_OWNERS_ATTR, checkpointing_modules(unet))
    reported = {k: v for k, v in asdict(settings).items() if k in METHOD_OPTIONS[method]}
    if method == "tome_sd":
        reported["generator"] = generator
    info = PatchInfo(FAMILY, method, dict(reported, num_blocks=len(chosen)))
    set_patch_info(unet, info)
    return info


def remove(model: Any) -> None:
    """Undo :func:`apply` on the UNet or pipeline: original classes, no hooks, no records."""
    unet = _unet_of(model)
    if unet is not None:
        restore_tree(unet, _CFG_ATTR)
        unwrap_checkpointing(unet)
        vars(unet).pop(_CKPT_OWNERS_ATTR, None)
        for handle in vars(unet).pop(_HOOKS_ATTR, ()):
            handle.remove()
        clear_patch_info(unet)
    clear_patch_info(model)


def _is_patched(unet: nn.Module) -> bool:
    return _HOOKS_ATTR in vars(unet)


def _replace(settings: Settings, **changes: Any) -> Settings:
    return Settings(**dict(asdict(settings), **changes))


def _hints(method: str) -> dict[str, str]:
    """For the unknown-option message: ViT options' diffusers equivalents, other methods'."""
    hints = dict(CROSS_FAMILY_HINTS["diffusion"])
    if method != "tome_sd":
        hints.update({k: f"{k} applies to method='tome_sd' only" for k in TOME_SD_OPTIONS})
    if method != "atc":
        hints["linkage"] = "linkage applies to method='atc' only"
        hints["backend"] = "backend applies to method='atc' only"
    return hints


def _validated_settings(
    method: Any, options: dict[str, Any]
) -> tuple[Settings, torch.Generator | None]:
    """Check ``options`` for ``method`` and resolve the defaults (see :func:`apply`)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} for diffusers, got {method!r}")
    given = {k: v for k, v in options.items() if not (v is None and k in _NONE_IS_DEFAULT)}
    check_options(
        f"diffusers UNets with method={method!r}", given, METHOD_OPTIONS[method], _hints(method)
    )
    s = Settings()
    values: dict[str, Any] = {}
    if "ratio" in given:
        values["ratio"] = as_float("ratio", given["ratio"])
    ratio = values.get("ratio", s.ratio)
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio is the fraction of tokens removed, in [0, 1); got {ratio}")
    if method == "atc":
        linkage = given.get("linkage", "average")
        if linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
        values["linkage"] = linkage
        backend = given.get("backend", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        values["backend"] = backend
    if "max_downsample" in given:
        values["max_downsample"] = as_int("max_downsample", given["max_downsample"], minimum=1)
    for name in ("sx", "sy"):
        if name in given:
            values[name] = as_int(name, given[name], minimum=1)
    for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
        if name in given:
            values[name] = as_bool(name, given[name])
    s = Settings(**values)
    if not (s.merge_attn or s.merge_crossattn or s.merge_mlp):
        raise ValueError("merge_attn, merge_crossattn and merge_mlp are all False: nothing merges")
    generator = given.get("generator")
    if method != "tome_sd":
        return s, None
    if s.sx * s.sy == 1:
        raise ValueError(
            "method='tome_sd' with sx=sy=1 merges nothing: every token is the destination of "
            "its own 1x1 window. Use windows of at least 2 tokens (tomesd's default sx=sy=2)."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if "seed" in given and generator is not None:
        raise ValueError("give seed or generator, not both (both set tome_sd's random draws)")
    if "seed" in given:
        return _replace(s, seed=as_int("seed", given["seed"])), generator
    if s.use_rand and generator is None:  # a seed from the global RNG, which is not advanced
        fork = torch.Generator().set_state(torch.get_rng_state())
        s = _replace(s, seed=int(torch.randint(2**62, (1,), generator=fork)))
    return s, generator
