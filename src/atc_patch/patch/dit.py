"""Token reduction for diffusers diffusion transformers: Flux, SD3, PixArt and DiT.

``apply_patch(pipe_or_transformer, method=..., ratio=...)`` on a ``FluxTransformer2DModel``,
``SD3Transformer2DModel``, ``PixArtTransformer2DModel`` or ``DiTTransformer2DModel`` (or a
pipeline holding one as ``.transformer``). Every patched block computes one merge plan from its
image tokens ``(B, N, C)`` (``r = int(N * ratio)`` removed) and runs attention (optionally the
MLP, and PixArt's cross-attention queries) on the ``N - r`` merged image tokens; outputs are
unmerged before the residual add (ToMe-SD's recipe, the step shared in :mod:`._merge_around`).

Text tokens never merge: Flux's and SD3's ``encoder_hidden_states`` stream enters the joint
attention as it is, and in a Flux single-stream block the text part of the joint sequence is
passed through (the plan covers the image part only). PixArt's and DiT's text/class enter
through cross-attention keys and the adaLN conditioning, which are never merged.

Rotary embeddings (Flux): the ``(cos, sin)`` tables follow the plan (cluster means; the merged
token is rotated as "rotate each member, then merge" gives when members share a key), and the
joint attention runs once per batch element with its own table (see :mod:`._merge_around`).

Blocks: by default every transformer block (Flux: the double- then the single-stream ones).
A DiT works at one token resolution, so unlike a UNet, where attention at the highest
resolution dominates, every block pays the same quadratic attention on the same ``N`` tokens.
``blocks=[i, ...]`` picks blocks by their index in execution order; an empty pick raises.

``tome_sd``'s windows lie on the real image-token grid: ``(H / p, W / p)`` latent patches for
SD3/PixArt/DiT, and for Flux the grid of packed 2x2 latent patches read from ``img_ids``
(row/column ids must form a raster grid). Its random destinations come from a generator seeded
by ``(seed, timestep, block index)``: the same run draws the same ones, every block and step
draws new ones, and a gradient-checkpointing recomputation redraws exactly the same (the call's
state is kept on the block input, so recomputation outside the forward call still finds it).

The attention path is left alone: processors (custom ones too, set before or after patching)
and diffusers' attention-backend dispatch run unchanged, on fewer tokens.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import sys
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import CROSS_FAMILY_HINTS, as_bool, as_float, as_int, as_int_list, check_options
from ..kernel import LINKAGES, cluster_tokens
from ..kernel.plan import MergePlan
from ._common import (
    PatchInfo,
    clear_patch_info,
    get_patch_info,
    restore_tree,
    set_patch_info,
    swap_class,
)
from ._merge_around import ActiveMerge, MergeAroundMixin, Span, merging

FAMILY = "dit"
METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")
MODELS = (
    "FluxTransformer2DModel",
    "SD3Transformer2DModel",
    "PixArtTransformer2DModel",
    "DiTTransformer2DModel",
)
OPTIONS = (
    "ratio",
    "linkage",
    "blocks",
    "sx",
    "sy",
    "use_rand",
    "merge_attn",
    "merge_crossattn",
    "merge_mlp",
    "seed",
    "metric_dim",
)
TOME_SD_ONLY = ("sx", "sy", "use_rand", "seed")  # rejected by the other methods
_NONE_IS_DEFAULT = ("linkage", "seed", "blocks", "metric_dim")
_HINTS = {
    **CROSS_FAMILY_HINTS["diffusion"],
    "max_downsample": "a diffusion transformer has one token resolution; pick blocks with "
    "blocks=[...] (indices in execution order)",
    "reduction_loc": "diffusion transformers pick blocks with blocks=[...], not reduction_loc",
    "generator": "diffusion transformers seed tome_sd's draws with seed= (per step and block)",
}

_CFG_ATTR = "_atc_dit_cfg"  # on a patched block: its _BlockConfig
_HOOKS_ATTR = "_atc_dit_hooks"  # on a patched transformer: the per-call hook handles
_STASH_ATTR = "_atc_dit_call"  # on a block input tensor: the call it belongs to (checkpointing)


@dataclass(frozen=True)
class Settings:
    """What :func:`apply` was given (after defaults are resolved); stored in the PatchInfo."""

    ratio: float = 0.5
    linkage: str | None = None
    blocks: tuple[int, ...] | None = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int | None = None
    metric_dim: int | None = None


@dataclass(frozen=True)
class _BlockConfig:
    """Immutable per-block configuration: method, settings, index and the sublayer table."""

    method: str
    settings: Settings
    index: int  # position in execution order (seeds tome_sd's draws)
    spans: tuple[tuple[str, Span], ...]  # (sublayer attribute, how it follows the plan)
    text_prefix: bool  # Flux single-stream: the sublayers see [text, image]


# --------------------------------------------------------------------------------------------
# The per-family table: which blocks, which sublayers, where the token grid comes from
# --------------------------------------------------------------------------------------------
def _flux_double_spans(s: Settings) -> dict[str, Span]:
    out = {}
    if s.merge_attn:  # outputs: (image, text) or (image, text, ip-adapter image)
        out["attn"] = Span(outputs=(0, 2), mask="reject", rotary=True)
    if s.merge_mlp:
        out["ff"] = Span()
    return out


def _flux_single_spans(s: Settings) -> dict[str, Span]:
    # attn and proj_mlp read the same normed tokens; proj_out(cat(attn, mlp)) is per token, so
    # with both merged the unmerge moves after proj_out (same result, proj_out on fewer tokens).
    if s.merge_attn and s.merge_mlp:
        return {
            "attn": Span(unmerge_out=False, mask="reject", rotary=True),
            "proj_mlp": Span(unmerge_out=False),
            "proj_out": Span(merge_in=False),
        }
    if s.merge_attn:
        return {"attn": Span(mask="reject", rotary=True)}
    return {"proj_mlp": Span()} if s.merge_mlp else {}


def _joint_spans(s: Settings) -> dict[str, Span]:  # SD3 JointTransformerBlock
    out = {}
    if s.merge_attn:
        out["attn"] = Span(outputs=(0,), mask="reject")
        out["attn2"] = Span(mask="keys")  # SD3.5 dual attention: image-only self-attention
    if s.merge_mlp:
        out["ff"] = Span()
    return out


def _basic_spans(s: Settings) -> dict[str, Span]:  # PixArt / DiT BasicTransformerBlock
    out = {}
    if s.merge_attn:
        out["attn1"] = Span(mask="keys")
    if s.merge_crossattn:
        out["attn2"] = Span(mask="pass")  # queries merged; the text keys are not
    if s.merge_mlp:
        out["ff"] = Span()
    return out


def _flux_grid(bound: inspect.BoundArguments) -> Any:
    ids = bound.arguments.get("img_ids")
    return lambda n: _raster_grid(ids, n)


def _latent_grid(bound: inspect.BoundArguments, patch: int) -> Any:
    x = bound.arguments["hidden_states"]
    hw = (int(x.shape[-2]) // patch, int(x.shape[-1]) // patch)
    return lambda n: _checked_grid(hw, n)


def _blocks_flux(model: nn.Module) -> list[tuple[nn.Module, Any, bool]]:
    return [(b, _flux_double_spans, False) for b in model.transformer_blocks] + [
        (b, _flux_single_spans, True) for b in model.single_transformer_blocks
    ]


def _blocks_sd3(model: nn.Module) -> list[tuple[nn.Module, Any, bool]]:
    return [(b, _joint_spans, False) for b in model.transformer_blocks]


def _blocks_basic(model: nn.Module) -> list[tuple[nn.Module, Any, bool]]:
    return [(b, _basic_spans, False) for b in model.transformer_blocks]


def _family_of(model: nn.Module) -> str:
    for name in MODELS:
        if any(c.__name__ == name for c in type(model).__mro__):
            return name
    raise TypeError(f"not a supported diffusion transformer: {type(model).__name__}")


_BLOCKS = {
    "FluxTransformer2DModel": _blocks_flux,
    "SD3Transformer2DModel": _blocks_sd3,
    "PixArtTransformer2DModel": _blocks_basic,
    "DiTTransformer2DModel": _blocks_basic,
}


# --------------------------------------------------------------------------------------------
# Per-call state
# --------------------------------------------------------------------------------------------
class _DiTCall:
    """State of one transformer call: how to find its token grid, and its timestep."""

    def __init__(self, grid_fn: Any, timestep: Any) -> None:
        self._grid_fn = grid_fn
        self._grid: dict[int, tuple[int, int]] = {}
        self._timestep = timestep
        self._t: int | None = None
        self.token: contextvars.Token | None = None

    def grid(self, n: int) -> tuple[int, int]:
        """The ``(h, w)`` grid of the call's ``n`` image tokens (computed once)."""
        if n not in self._grid:
            self._grid[n] = self._grid_fn(n)
        return self._grid[n]

    def generator(self, seed: int, index: int) -> torch.Generator:
        """A CPU generator seeded by ``(seed, timestep, block index)``."""
        if self._t is None:
            t = self._timestep
            t = float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t or 0.0)
            self._t = int(round(t * 1000))
        s = (seed * 1_000_003 + self._t) * 1_000_033 + index
        return torch.Generator().manual_seed(s % (2**63))


_CALL: contextvars.ContextVar[_DiTCall | None] = contextvars.ContextVar(
    "atc_patch_dit_call", default=None
)
# Detached copies (reentrant checkpointing) share storage with the stashed input: find the call
# by data pointer while that input is alive.
_BY_PTR: dict[tuple[str, int], tuple[weakref.ref, _DiTCall]] = {}


def _stash(x: Tensor, call: _DiTCall) -> None:
    if getattr(x, _STASH_ATTR, None) is call:
        return
    setattr(x, _STASH_ATTR, call)
    key = (str(x.device), x.data_ptr())

    def forget(ref: weakref.ref, key: tuple[str, int] = key) -> None:
        if _BY_PTR.get(key, (None,))[0] is ref:  # not a newer tensor's entry at that address
            del _BY_PTR[key]

    _BY_PTR[key] = (weakref.ref(x, forget), call)


def _recall(x: Tensor) -> _DiTCall | None:
    call = getattr(x, _STASH_ATTR, None)
    if call is not None:
        return call
    entry = _BY_PTR.get((str(x.device), x.data_ptr()))
    if entry is not None and entry[0]() is not None and entry[0]().shape == x.shape:
        return entry[1]
    return None


_SIGNATURES: dict[type, inspect.Signature] = {}


def _pre_hook(family: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
    cls = type(module)
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(module.forward)
    bound = sig.bind_partial(*args, **kwargs)
    if family == "FluxTransformer2DModel":
        grid_fn = _flux_grid(bound)
    else:
        grid_fn = _latent_grid(bound, int(module.config.patch_size))
    call = _DiTCall(grid_fn, bound.arguments.get("timestep"))
    call.token = _CALL.set(call)


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    call = _CALL.get()
    if call is not None and call.token is not None:
        _CALL.reset(call.token)
        call.token = None


def _checked_grid(hw: tuple[int, int], n: int) -> tuple[int, int]:
    if hw[0] * hw[1] != n:
        raise ValueError(
            f"method='tome_sd': the {n} image tokens of a block are not the {hw[0]}x{hw[1]} "
            "grid of this call's latents"
        )
    return hw


def _raster_grid(ids: Tensor | None, n: int) -> tuple[int, int]:
    """``(h, w)`` from Flux ``img_ids`` ``(N, 3)`` (or ``(1, N, 3)``) if they are a raster grid."""
    if ids is not None and ids.dim() == 3:
        ids = ids[0]
    if ids is None or ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 3:
        raise ValueError(
            f"method='tome_sd' needs img_ids (N, 3) for the {n} image tokens to find their grid"
        )
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    rows, cols = rows - rows.min(), cols - cols.min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    raster = torch.arange(n, device=ids.device)
    if h * w != n or not torch.equal(rows * w + cols, raster):
        raise ValueError(
            "method='tome_sd': img_ids are not one raster grid of image tokens (e.g. extra "
            "reference-image tokens); use another method, which needs no grid"
        )
    return h, w


# --------------------------------------------------------------------------------------------
# The block mixin
# --------------------------------------------------------------------------------------------
class _DiTBlock:
    """Mixin for a transformer block: plan its image tokens, then run diffusers' forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cfg: _BlockConfig = getattr(self, _CFG_ATTR)
        x = args[0] if args else kwargs["hidden_states"]
        plan = _block_plan(cfg, x)
        if plan is None:
            return super().forward(*args, **kwargs)
        prefix = 0
        if cfg.text_prefix:
            text = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            prefix = int(text.shape[1])
        spans = {id(getattr(self, name)): span for name, span in cfg.spans}
        with merging(ActiveMerge(plan, spans, prefix)):
            return super().forward(*args, **kwargs)


def _block_plan(cfg: _BlockConfig, x: Tensor) -> MergePlan | None:
    """The merge plan for image tokens ``x`` ``(B, N, C)``, or ``None`` to run unchanged."""
    b, n, _ = x.shape
    s = cfg.settings
    r = int(n * s.ratio)
    if r <= 0:
        return None
    metric = x.detach()
    if s.metric_dim is not None and s.metric_dim < metric.shape[-1]:
        metric = metric @ metric_projection(metric.shape[-1], s.metric_dim, metric)
    if cfg.method != "tome_sd":
        plan = cluster_tokens(metric, r, cfg.method, linkage=s.linkage)
    else:
        call = _CALL.get()
        if call is None:
            call = _recall(x)
        else:  # for a gradient-checkpoint recomputation, which runs outside this call
            _stash(x, call)
        if call is None:
            raise ValueError(
                "method='tome_sd': block called outside its transformer's forward, so its "
                "token grid is unknown"
            )
        h, w = call.grid(n)
        # tomesd: an odd batch cannot be a CFG pair; shared random draws give artifacts.
        use_rand = s.use_rand and b % 2 == 0
        gen = call.generator(s.seed or 0, cfg.index) if use_rand else None
        plan = cluster_tokens(
            metric, r, "tome_sd", h=h, w=w, sx=s.sx, sy=s.sy, no_rand=not use_rand, generator=gen
        )
    return None if plan.is_identity else plan


_PROJECTIONS: dict[tuple[int, int, str, torch.dtype], Tensor] = {}


def metric_projection(c: int, d: int, like: Tensor) -> Tensor:
    """The fixed ``(c, d)`` Gaussian projection of ``metric_dim=d`` (seed 0, scaled by
    ``1 / sqrt(d)``): cosine similarities of projected tokens estimate those of the tokens
    (Johnson-Lindenstrauss), at ``c / d`` times less distance-matrix work."""
    key = (c, d, str(like.device), like.dtype)
    p = _PROJECTIONS.get(key)
    if p is None:
        g = torch.Generator().manual_seed(0)
        p = (torch.randn(c, d, generator=g) / math.sqrt(d)).to(like.device, like.dtype)
        _PROJECTIONS[key] = p
    return p


# --------------------------------------------------------------------------------------------
# Finding the transformer
# --------------------------------------------------------------------------------------------
def _transformer_of(model: Any) -> nn.Module | None:
    if "diffusers" not in sys.modules:
        return None
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in MODELS)
    m = getattr(model, "transformer", model)
    return m if isinstance(m, classes) else None


def matches(model: Any) -> bool:
    """One of :data:`MODELS`, or a pipeline whose ``.transformer`` is one."""
    return _transformer_of(model) is not None


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` in execution order (what ``blocks=`` indexes)."""
    return [b for b, _, _ in _BLOCKS[_family_of(model)](model)]


# --------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------
def apply(model: Any, method: str = "atc", **options: Any) -> PatchInfo:
    """Patch a diffusion transformer (or ``pipe.transformer``) in place for token reduction.

    Args:
        model: one of :data:`MODELS`, or a pipeline holding it as ``.transformer``.
        method: ``"atc"``, ``"tome_sd"``, ``"tome"``, ``"kmedoids"`` or ``"dpcknn"``.
        ratio: fraction of a block's image tokens removed, ``0 <= ratio < 1`` (default 0.5);
            ``ratio=0`` leaves outputs bit-identical.
        linkage: ``"atc"`` only: ``"single"``, ``"complete"`` or ``"average"`` (default).
        blocks: indices (execution order, see :func:`transformer_blocks`) of the blocks to
            patch; default every block.
        sx, sy, use_rand, seed: ``"tome_sd"`` only: one destination per ``sy x sx`` window of
            the image-token grid, drawn at random (``use_rand``; off for odd batches) from a
            generator seeded by ``(seed, timestep, block)``; default seed: taken (without
            advancing it) from the global torch RNG at patch time.
        merge_attn: attention runs on merged image tokens (default True).
        merge_mlp: the MLP too (Flux single-stream: ``proj_mlp`` and ``proj_out``).
        merge_crossattn: PixArt only: cross-attention queries too (text keys never merge).
        metric_dim: cluster on the image tokens projected to this many channels by a fixed
            Gaussian projection (:func:`metric_projection`) instead of all ``C`` (default
            ``None``: the tokens themselves). The clustering is then exact on the projected
            tokens; at Flux's ``C = 3072``, ``metric_dim=128`` cuts ATC's distance matrix 24x.

    Raises:
        TypeError: ``model`` is not a supported transformer or pipeline.
        ValueError: an unknown option or value, or a selection that merges nothing.
    """
    transformer = _transformer_of(model)
    if transformer is None:
        raise TypeError(f"expected one of {MODELS} or a pipeline with .transformer")
    family = _family_of(transformer)
    settings = _validated(method, family, options)
    if _HOOKS_ATTR in vars(transformer):
        remove(transformer)
    table = _BLOCKS[family](transformer)
    chosen = settings.blocks if settings.blocks is not None else tuple(range(len(table)))
    for i in chosen:
        if not 0 <= i < len(table):
            raise ValueError(f"blocks: index {i} out of range; this model has {len(table)} blocks")
    picked = []
    for i in chosen:
        block, spans_of, text_prefix = table[i]
        spans = {
            name: span
            for name, span in spans_of(settings).items()
            if getattr(block, name, None) is not None
        }
        if spans:
            picked.append((i, block, spans, text_prefix))
    if not picked:
        raise ValueError(
            f"blocks={list(chosen)} with merge_attn={settings.merge_attn}, merge_mlp="
            f"{settings.merge_mlp}: no sublayer of the selected blocks runs on merged tokens"
        )
    for i, block, spans, text_prefix in picked:
        cfg = _BlockConfig(method, settings, i, tuple(spans.items()), text_prefix)
        object.__setattr__(block, _CFG_ATTR, cfg)
        swap_class(block, _DiTBlock)
        for name in spans:
            swap_class(getattr(block, name), MergeAroundMixin)
    hooks = (
        transformer.register_forward_pre_hook(
            functools.partial(_pre_hook, family), with_kwargs=True
        ),
        transformer.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
    )
    object.__setattr__(transformer, _HOOKS_ATTR, hooks)
    info = PatchInfo(FAMILY, method, dict(asdict(settings), model=family, num_blocks=len(picked)))
    set_patch_info(transformer, info)  # on the transformer only: see find_patch_info
    return info


def find_patch_info(model: Any) -> PatchInfo | None:
    """The patch record of ``model``'s transformer (``model`` or ``pipe.transformer``), or
    ``None``. The record lives on the transformer only, so a pipeline and its transformer agree
    whichever of the two was patched, and a patched transformer pickles (no pipeline reference).
    """
    transformer = _transformer_of(model)
    return None if transformer is None else get_patch_info(transformer)


def remove(model: Any) -> None:
    """Undo :func:`apply` on the transformer or pipeline: original classes, no hooks, no records."""
    transformer = _transformer_of(model)
    if transformer is not None:
        restore_tree(transformer, _CFG_ATTR)
        for handle in vars(transformer).pop(_HOOKS_ATTR, ()):
            handle.remove()
        clear_patch_info(transformer)
    clear_patch_info(model)


def _validated(method: str, family: str, options: dict[str, Any]) -> Settings:
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS} for diffusion transformers, got {method!r}"
        )
    # None means "the default" for these, as in the UNet family: same as leaving them out.
    options = {k: v for k, v in options.items() if not (v is None and k in _NONE_IS_DEFAULT)}
    valid = [
        k
        for k in OPTIONS
        if (k not in TOME_SD_ONLY or method == "tome_sd") and (k != "linkage" or method == "atc")
    ]
    hints = {k: f"{k} is a method='tome_sd' option" for k in TOME_SD_ONLY if method != "tome_sd"}
    if method != "atc":
        hints["linkage"] = "linkage is a method='atc' option"
    check_options(f"diffusers {family} with method={method!r}", options, valid, {**_HINTS, **hints})
    o = dict(options)
    ratio = as_float("ratio", o.get("ratio", 0.5))
    if not 0 <= ratio < 1 or math.isnan(ratio):
        raise ValueError(f"ratio is the fraction of tokens removed, in [0, 1); got {ratio}")
    linkage = o.get("linkage")
    if linkage is not None and method != "atc":
        raise ValueError(f"linkage applies to method='atc' only, not {method!r}")
    if method == "atc":
        linkage = linkage or "average"
        if linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    blocks = o.get("blocks")
    if blocks is not None:
        blocks = as_int_list("blocks", blocks, minimum=0)
        if not blocks:
            raise ValueError("blocks=[] selects no block; pass None for every block")
    merge_crossattn = as_bool("merge_crossattn", o.get("merge_crossattn", False))
    if merge_crossattn and family != "PixArtTransformer2DModel":
        raise ValueError(
            f"merge_crossattn applies to PixArt (cross-attention to text), not {family}: its "
            "text enters through joint attention (merge_attn) or adaLN conditioning"
        )
    metric_dim = o.get("metric_dim")
    metric_dim = None if metric_dim is None else as_int("metric_dim", metric_dim, minimum=1)
    seed = o.get("seed")
    seed = None if seed is None else as_int("seed", seed)
    if seed is None and method == "tome_sd":
        fork = torch.Generator().set_state(torch.get_rng_state())
        seed = int(torch.randint(2**62, (1,), generator=fork))
    return Settings(
        ratio=ratio,
        linkage=linkage,
        blocks=blocks,
        sx=as_int("sx", o.get("sx", 2), minimum=1),
        sy=as_int("sy", o.get("sy", 2), minimum=1),
        use_rand=as_bool("use_rand", o.get("use_rand", True)),
        merge_attn=as_bool("merge_attn", o.get("merge_attn", True)),
        merge_crossattn=merge_crossattn,
        merge_mlp=as_bool("merge_mlp", o.get("merge_mlp", False)),
        seed=seed,
        metric_dim=metric_dim,
    )
