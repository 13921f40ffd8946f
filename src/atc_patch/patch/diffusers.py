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
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..kernel import BACKENDS, LINKAGES, cluster_tokens
from ..kernel.plan import MergePlan
from ._common import PatchInfo, clear_patch_info, restore_class, set_patch_info, swap_class

FAMILY = "diffusers"
METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")

_CFG_ATTR = "_atc_diffusers_cfg"  # on a patched BasicTransformerBlock: its _BlockConfig
_HOOKS_ATTR = "_atc_diffusers_hooks"  # on a patched UNet: the latent-size hook handles
_OWNER_ATTR = "_atc_diffusers_owner"  # on a patched UNet: weakref to the pipeline patched


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What :func:`apply` was given (after defaults are resolved); stored in the PatchInfo."""

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
class _UNetCall:
    """State of one UNet forward call: its latent size and, lazily, its random generator."""

    def __init__(self, latent_hw: tuple[int, int], timestep: Any) -> None:
        self.latent_hw = latent_hw
        self._timestep = timestep
        self._generator: torch.Generator | None = None
        self.draws: list[
            int
        ] = []  # under torch.compile: the draws so far (see _tome_sd_call_labels)
        self.token: contextvars.Token | None = None

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator seeded from ``(seed, timestep)``: every denoising step draws new
        destinations, and the same run draws the same ones. Made once per call, on first use."""
        if self._generator is None:
            self._generator = _call_generator(seed, self._timestep)
        return self._generator


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


def _compiled_tome_sd_plan(call: _UNetCall, x: Tensor, r: int, s: Settings, h: int, w: int):
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


_UNET_CALL = _CallVar("atc_patch_unet_call")  # holds a _UNetCall or None
_ACTIVE = _CallVar("atc_patch_active_merge")  # holds an _ActiveMerge or None


def _unet_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    call = _UNetCall((int(sample.shape[-2]), int(sample.shape[-1])), timestep)
    call.token = _UNET_CALL.set(call)


def _unet_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    call = _UNET_CALL.get()
    if call is not None and call.token is not None:
        _UNET_CALL.reset(call.token)


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
    """The merge plan for block input ``x`` ``(B, N, C)``, or ``None`` to run unchanged."""
    b, n, _ = x.shape
    r = int(n * cfg.settings.ratio)
    if r <= 0:
        return None
    s = cfg.settings
    if cfg.method != "tome_sd":
        atc = cfg.method == "atc"
        return cluster_tokens(
            x,
            r,
            cfg.method,
            linkage=s.linkage if atc else None,
            backend=s.backend if atc else "auto",
        )
    call = _UNET_CALL.get()
    h, w = _block_grid(call, cfg.downsample, n)
    # tomesd: with an odd batch the prompted and unprompted halves of a CFG batch cannot both
    # be present, and shared random destinations give artifacts, so randomness is turned off.
    use_rand = s.use_rand and b % 2 == 0
    gen = None
    if use_rand:
        if cfg.generator is not None:
            gen = cfg.generator
        elif call is not None:
            if torch.compiler.is_compiling():  # no torch.Generator inside a compiled graph
                return _compiled_tome_sd_plan(call, x, r, s, h, w)
            gen = call.generator(s.seed if s.seed is not None else 0)
    return cluster_tokens(
        x, r, "tome_sd", h=h, w=w, sx=s.sx, sy=s.sy, no_rand=not use_rand, generator=gen
    )


def _block_grid(call: _UNetCall | None, downsample: int, n: int) -> tuple[int, int]:
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
def apply(
    model: Any,
    method: str = "atc",
    *,
    ratio: float = 0.5,
    linkage: str | None = None,
    max_downsample: int | None = None,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> PatchInfo:
    """Patch a ``UNet2DConditionModel`` (or ``pipe.unet``) in place for token reduction.

    Args:
        model: the UNet, or a pipeline holding it as ``.unet``.
        method: ``"atc"``, ``"tome_sd"``, ``"tome"``, ``"kmedoids"`` or ``"dpcknn"``.
        ratio: fraction of a block's tokens removed, ``0 <= ratio < 1``; ``r = int(N * ratio)``.
            ``ratio=0`` leaves outputs bit-identical.
        linkage: ``"atc"`` only: ``"single"``, ``"complete"`` or ``"average"`` (default).
        max_downsample: patch blocks whose latent stride is at most this; ``None`` = the
            highest-resolution level that has attention (1 on SD 1.x/2.x, 2 on SDXL).
        sx, sy, use_rand: ``"tome_sd"`` only, as in tomesd: one destination per ``sy x sx``
            window, drawn at random (``use_rand``, turned off for odd batches) or top-left.
        merge_attn, merge_crossattn, merge_mlp: which sublayers run on merged tokens.
        seed: ``"tome_sd"`` randomness: call ``t`` of the UNet draws from a generator seeded
            by ``(seed, t)``, so runs are reproducible and calls are independent. Default: a
            seed taken (without advancing it) from the global torch RNG at patch time.
        generator: instead of ``seed``, draw from this generator (advanced by every call; re-seed
            it to reproduce a run; shared by concurrent calls, unlike ``seed``).
        backend: ``"atc"``'s kernel, one of :data:`~atc_patch.kernel.BACKENDS` (see
            :func:`~atc_patch.cluster_tokens`).
    """
    unet = _unet_of(model)
    if unet is None:
        raise TypeError("expected a diffusers UNet2DConditionModel or a pipeline with .unet")
    settings = _validated_settings(
        method,
        Settings(
            ratio=ratio,
            linkage=linkage,
            max_downsample=max_downsample,
            sx=sx,
            sy=sy,
            use_rand=use_rand,
            merge_attn=merge_attn,
            merge_crossattn=merge_crossattn,
            merge_mlp=merge_mlp,
            seed=seed,
            backend=backend,
        ),
        generator,
    )
    if backend not in BACKENDS or (backend == "triton" and method != "atc"):
        raise ValueError(
            f"backend must be one of {BACKENDS} ('triton': method='atc'), got {backend!r}"
        )
    if _is_patched(unet):
        remove(unet)
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
        cfg = _BlockConfig(method, settings, d, generator)
        object.__setattr__(block, _CFG_ATTR, cfg)
        swap_class(block, _TokenMergeBlock)
        for name, on in (("attn1", merge_attn), ("attn2", merge_crossattn), ("ff", merge_mlp)):
            sub = getattr(block, name, None)
            if on and sub is not None:
                swap_class(sub, _MergeAround)
    hooks = (
        unet.register_forward_pre_hook(_unet_pre_hook, with_kwargs=True),
        unet.register_forward_hook(_unet_post_hook, with_kwargs=True, always_call=True),
    )
    object.__setattr__(unet, _HOOKS_ATTR, hooks)
    info = PatchInfo(FAMILY, method, dict(asdict(settings), num_blocks=len(chosen)))
    set_patch_info(unet, info)
    if model is not unet:
        set_patch_info(model, info)
        object.__setattr__(unet, _OWNER_ATTR, weakref.ref(model))
    return info


def remove(model: Any) -> None:
    """Undo :func:`apply` on the UNet or pipeline: original classes, no hooks, no records."""
    unet = _unet_of(model)
    if unet is not None:
        for module in unet.modules():
            restore_class(module)
            if _CFG_ATTR in vars(module):
                object.__delattr__(module, _CFG_ATTR)
        for handle in vars(unet).pop(_HOOKS_ATTR, ()):
            handle.remove()
        owner = vars(unet).pop(_OWNER_ATTR, None)
        if owner is not None and owner() is not None:  # remove_patch(pipe.unet) after
            clear_patch_info(owner())  # apply_patch(pipe): the pipeline is unpatched too
        clear_patch_info(unet)
    clear_patch_info(model)


def _is_patched(unet: nn.Module) -> bool:
    return _HOOKS_ATTR in vars(unet)


def _replace(settings: Settings, **changes: Any) -> Settings:
    return Settings(**dict(asdict(settings), **changes))


def _validated_settings(method: str, s: Settings, generator: torch.Generator | None) -> Settings:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} for diffusers, got {method!r}")
    if isinstance(s.ratio, bool) or not isinstance(s.ratio, (int, float)):
        raise ValueError(f"ratio must be a float in [0, 1), got {s.ratio!r}")
    if not 0 <= s.ratio < 1:
        raise ValueError(f"ratio is the fraction of tokens removed, in [0, 1); got {s.ratio}")
    if s.linkage is not None and method != "atc":
        raise ValueError(f"linkage applies to method='atc' only, not {method!r}")
    if method == "atc" and s.linkage is None:
        s = _replace(s, linkage="average")
    if s.linkage is not None and s.linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {s.linkage!r}")
    if s.max_downsample is not None and (
        isinstance(s.max_downsample, bool)
        or not isinstance(s.max_downsample, int)
        or s.max_downsample < 1
    ):
        raise ValueError(f"max_downsample must be an int >= 1 or None, got {s.max_downsample!r}")
    for name in ("sx", "sy"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not (s.merge_attn or s.merge_crossattn or s.merge_mlp):
        raise ValueError("merge_attn, merge_crossattn and merge_mlp are all False: nothing merges")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if s.seed is None and method == "tome_sd":
        fork = torch.Generator().set_state(torch.get_rng_state())
        s = _replace(s, seed=int(torch.randint(2**62, (1,), generator=fork)))
    elif s.seed is not None and (isinstance(s.seed, bool) or not isinstance(s.seed, int)):
        raise ValueError(f"seed must be an int, got {s.seed!r}")
    if generator is not None and method != "tome_sd":
        warnings.warn(f"generator is only used by method='tome_sd', not {method!r}", stacklevel=3)
    return s
