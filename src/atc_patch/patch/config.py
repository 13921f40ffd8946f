"""Typed patch settings: one validated config class per kind of model, and the patch record.

``apply_patch(model, method, **options)`` builds the config of the model's kind from its
keyword options; a config can also be built, printed, compared and passed directly::

    from atc_patch import ViTConfig, DiffusionConfig, apply_patch
    cfg = ViTConfig(method="atc", linkage="average", keep_rate=0.7, reduction_loc=(3, 6, 9))
    apply_patch(vit, config=cfg)              # == apply_patch(vit, "atc", linkage=..., ...)
    apply_patch(pipe, config=DiffusionConfig(method="tome_sd", ratio=0.5))

* :class:`ViTConfig`: ViT-like encoders (timm, torchvision, transformers).
* :class:`DiffusionConfig`: diffusion models (diffusers UNets and diffusion transformers).
* :class:`AdapterConfig`: the mmdet ViT-Adapter backbone.

Every config validates on construction (a ``ValueError`` naming the valid choices); options of
another method or kind are rejected with a hint (:data:`HINTS`), alternative spellings are
resolved once (:data:`ALIASES`). Model-dependent checks (a block index past the last block, an
option the model class has no use for) are made by the family before it touches the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._validate import as_bool, as_float, as_int, as_int_list, check_options
from ..kernel import BACKENDS, LINKAGES
from ..schedule import KEEP_RATE_MODES, Schedule, make_schedule

# Alternative spellings of an option, per kind: {given name: the config's field}.
ALIASES: dict[str, dict[str, str]] = {
    "vit": {"proportional_attn": "prop_attn"},
    "diffusion": {},
    "adapter": {"prop_attn": "proportional_attn"},
}

# Options of one kind that users bring to another: what to pass instead.
HINTS: dict[str, dict[str, str]] = {
    "vit": {
        "ratio": "a ViT is reduced by r (tokens removed per block) or keep_rate with "
        "reduction_loc; ratio is the diffusion models' option",
        "max_downsample": "max_downsample is a diffusion-model option",
        "blocks": "a ViT chooses blocks with keep_rate and reduction_loc",
        **{
            k: "sx/sy/st/use_rand/seed/generator belong to method='tome_sd' on diffusion models"
            for k in ("sx", "sy", "st", "use_rand", "seed", "generator")
        },
        "reduction_ratio": "reduction_ratio is the ViT-Adapter's option; a ViT takes keep_rate "
        "(with reduction_loc) or r",
        **{
            k: "tile/plan_scope/reuse_steps/merge are diffusion-model options"
            for k in ("tile", "plan_scope", "reuse_steps", "merge")
        },
    },
    "diffusion": {
        "r": "diffusion models take ratio (the fraction of each block's tokens removed), not r",
        "keep_rate": "diffusion models take ratio (the fraction of each block's tokens removed)",
        "reduction_loc": "diffusion models choose blocks with max_downsample (UNets) or "
        "blocks=[...] (diffusion transformers), not reduction_loc",
        "r_schedule": "diffusion models take one ratio for every patched block",
        "prop_attn": "proportional attention is a ViT option (diffusion patches unmerge after "
        "attention)",
        "trace_source": "trace_source is a ViT option",
    },
    "adapter": {
        "keep_rate": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept at each "
        "reduction_loc), not keep_rate",
        "r": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept at each "
        "reduction_loc), not r",
        "r_schedule": "a ViTAdapter reduces at reduction_loc by reduction_ratio",
        "trace_source": "a ViTAdapter has no trace_source; its features are unmerged to the grid",
        "ratio": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept)",
    },
}


SIZE_MODES = ("keep", "reset")
PLAN_SCOPES = ("block", "resolution")
MERGE_MODES = ("tokens", "kv")


def _linkage(method: str, linkage: Any) -> str | None:
    """ATC's linkage (default ``"average"``); ``None`` for other methods, which reject one."""
    if method != "atc":
        if linkage is not None:
            raise ValueError(f"linkage applies to method='atc' only, not to {method!r}")
        return None
    linkage = "average" if linkage is None else linkage
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    return linkage


def _backend(method: str, backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and method != "atc":
        raise ValueError(f"backend='triton' applies to method='atc' only, not to {method!r}")
    return backend


def _method(kind: str, methods: tuple[str, ...], method: Any) -> str:
    if not isinstance(method, str) or method not in methods:
        raise ValueError(f"method must be one of {methods} for {kind}, got {method!r}")
    return method


@dataclass(frozen=True)
class PatchConfig:
    """What every config has: the kernel ``method`` and the kind of model it is for."""

    KIND: ClassVar[str] = ""
    WHAT: ClassVar[str] = ""  # for messages: "a ViT", "diffusion models", ...
    METHODS: ClassVar[tuple[str, ...]] = ()
    # Per method, the options it takes besides the common ones (None = every field).
    METHOD_ONLY: ClassVar[dict[str, tuple[str, ...]]] = {}

    method: str = "atc"

    @classmethod
    def options(cls, method: str) -> tuple[str, ...]:
        """The option names ``method`` accepts (keyword options of ``apply_patch``)."""
        own = {k for opts in cls.METHOD_ONLY.values() for k in opts}
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "method"]
        return tuple(n for n in names if n not in own or n in cls.METHOD_ONLY.get(method, ()))

    @classmethod
    def from_options(
        cls,
        method: str,
        options: Mapping[str, Any],
        where: str = "",
        unused: Mapping[str, str] | None = None,
    ) -> Any:
        """The config for ``apply_patch(model, method, **options)``.

        Aliases (:data:`ALIASES`) are resolved, ``None`` means "the default" for every
        option, and unknown options, options of another method and the options in ``unused``
        (``{name: hint}``, those the model's family has no use for) raise ``ValueError`` with
        the valid names and a hint (:data:`HINTS`).
        """
        unused = unused or {}
        method = _method(cls.WHAT, cls.METHODS, method)
        given = dict(options)
        for alias, name in ALIASES[cls.KIND].items():
            if alias in given:
                if name in given:
                    raise ValueError(f"give {name} or {alias} (the same option), not both")
                given[name] = given.pop(alias)
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in given.items() if v is not None or k not in fields}  # default
        hints = {**HINTS[cls.KIND], **unused}
        for other, names in cls.METHOD_ONLY.items():
            for name in names:
                if name not in cls.METHOD_ONLY.get(method, ()):
                    hints.setdefault(name, f"{name} applies to method={other!r} only")
        valid = [k for k in cls.options(method) if k not in unused]
        check_options(f"{where or cls.WHAT} with method={method!r}", given, valid, hints)
        return cls(method=method, **given)

    def check_unused(self, unused: Mapping[str, str], where: str = "") -> None:
        """Raise ``ValueError`` if an option in ``unused`` (``{name: hint}``) is not at its
        default (for a config built by the user and passed as ``config=``)."""
        for f in dataclasses.fields(self):
            if f.name in unused and f.init and getattr(self, f.name) != f.default:
                raise ValueError(
                    f"{f.name}={getattr(self, f.name)!r} has no use for {where or self.WHAT}: "
                    f"{unused[f.name]}"
                )

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def settings(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The values in use for :func:`~atc_patch.patch_settings`: the options ``method``
        accepts (defaults filled in), except ``exclude``."""
        return {n: getattr(self, n) for n in self.options(self.method) if n not in exclude}

    def _check_method_only(self) -> str:
        """Validate ``method`` and reject another method's option set to a non-default value
        (it would be ignored); returns ``method``."""
        method = _method(self.WHAT, self.METHODS, self.method)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for other, names in self.METHOD_ONLY.items():
            for name in names:
                mine = name in self.METHOD_ONLY.get(method, ())
                if not mine and getattr(self, name) not in (None, defaults[name]):
                    raise ValueError(f"{name} applies to method={other!r} only, not to {method!r}")
        return method

    def _set(self, **values: Any) -> None:  # for __post_init__ of a frozen dataclass
        for name, value in values.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class ViTConfig(PatchConfig):
    """Token reduction in a ViT-like encoder: merge between attention and MLP, ToMe style.

    Attributes:
        method: ``"atc"``, ``"tome"``, ``"kmedoids"`` or ``"dpcknn"``.
        r: tokens removed per block (an int, or one value per block); or
        keep_rate: fraction of the unprotected tokens kept after each of ``reduction_loc``
            (the ATC paper's setting), see :mod:`atc_patch.schedule`.
        r_schedule, reduction_loc, keep_rate_mode: see :func:`~atc_patch.make_schedule`.
        linkage: ATC only: ``"single"``, ``"complete"`` or ``"average"`` (default).
        prop_attn: proportional attention, ``log(size)`` added to the attention logits.
        size_mode: ``"keep"`` (token sizes add up over the blocks, so a merged token is the
            mean of the input patches behind it) or ``"reset"`` (sizes restart at 1 after
            every block, so each merge is the plain mean of the tokens it merges: the ATC
            reference DeiT without proportional attention; needs ``prop_attn=False``).
        trace_source: keep the source map of the last forward (:func:`atc_patch.last_source`).
        backend: ATC only: the kernel backend, one of :data:`~atc_patch.kernel.BACKENDS`.
        unmerge: transformers encoders only: ``last_hidden_state`` with one token per input
            token (each a copy of its cluster).
        schedule: the validated :class:`~atc_patch.Schedule` (derived, not an option).
    """

    KIND: ClassVar[str] = "vit"
    WHAT: ClassVar[str] = "a ViT"
    METHODS: ClassVar[tuple[str, ...]] = ("atc", "tome", "kmedoids", "dpcknn")
    METHOD_ONLY: ClassVar[dict[str, tuple[str, ...]]] = {"atc": ("linkage",)}

    r: int | tuple[int, ...] | None = None
    r_schedule: str = "constant"
    keep_rate: float | None = None
    reduction_loc: tuple[int, ...] | None = None
    keep_rate_mode: str = "target"
    linkage: str | None = None
    prop_attn: bool = True
    size_mode: str = "keep"
    trace_source: bool = False
    backend: str = "auto"
    unmerge: bool = False
    schedule: Schedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        method = self._check_method_only()
        schedule = make_schedule(
            r=self.r,
            r_schedule=self.r_schedule,
            keep_rate=self.keep_rate,
            reduction_loc=self.reduction_loc,
            keep_rate_mode=self.keep_rate_mode,
            required=True,
        )
        plain = schedule.settings()
        prop_attn = as_bool("prop_attn", self.prop_attn)
        if self.size_mode not in SIZE_MODES:
            raise ValueError(f"size_mode must be one of {SIZE_MODES}, got {self.size_mode!r}")
        if self.size_mode == "reset" and prop_attn:
            raise ValueError(
                "size_mode='reset' drops the token sizes after every block, so proportional "
                "attention would have none to use: pass prop_attn=False with it"
            )
        self._set(
            r=schedule.r,
            keep_rate=plain["keep_rate"],
            reduction_loc=plain["reduction_loc"],
            linkage=_linkage(method, self.linkage),
            prop_attn=prop_attn,
            trace_source=as_bool("trace_source", self.trace_source),
            backend=_backend(method, self.backend),
            unmerge=as_bool("unmerge", self.unmerge),
            schedule=schedule,
        )

    def settings(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        return {**super().settings(exclude), **self.schedule.settings()}


@dataclass(frozen=True)
class DiffusionConfig(PatchConfig):
    """Token reduction in a diffusion model: sublayers run on merged tokens, ToMe-SD style.

    Attributes:
        method: ``"atc"``, ``"tome_sd"``, ``"tome"``, ``"kmedoids"`` or ``"dpcknn"``.
        ratio: fraction of a block's (image) tokens removed, ``0 <= ratio < 1``;
            ``r = int(N * ratio)``; ``0`` leaves outputs bit-identical.
        merge_attn, merge_crossattn, merge_mlp: which sublayers run on merged tokens.
        max_downsample: UNets only: patch the blocks whose latent stride is at most this
            (``None``: the highest-resolution level that has attention).
        blocks: diffusion transformers only: indices of the blocks to patch, in execution
            order (``None``: every block).
        metric_dim: cluster on tokens projected to this many channels by a fixed Gaussian
            projection (``None``: the tokens themselves).
        linkage: ATC only: ``"single"``, ``"complete"`` or ``"average"`` (default).
        backend: ATC only: the kernel backend, one of :data:`~atc_patch.kernel.BACKENDS`.
        sx, sy, use_rand: ToMe-SD only: one destination per ``sy x sx`` window, drawn at
            random (``use_rand``) or top-left.
        st: ToMe-SD on video transformers only: the window's frames (``st x sy x sx`` windows
            on the ``frames x height x width`` token grid); ``None``: 1 (one frame).
        seed: ToMe-SD only: seeds the random draws per call (default: drawn, without
            advancing it, from the global torch RNG when the config is made).
        generator: ToMe-SD only, instead of ``seed``: draw from this ``torch.Generator``.
        tile: ``(th, tw)`` in token-grid units (video transformers: ``(tt, th, tw)``, frames
            first): cluster inside local tiles (ragged edge tiles allowed; ``r`` split over
            tiles by shape, see :mod:`atc_patch.kernel.tiles`); ``None``: the whole image.
            Not with ``tome_sd``, local already.
        plan_scope: ``"block"`` (a plan per patched block) or ``"resolution"`` (one plan per
            token resolution per model call, made at the first patched block of it).
        reuse_steps: keep the plans for this many consecutive model calls (denoising steps;
            a batch-size or resolution change starts afresh); ``1``: every call.
        merge: ``"tokens"`` (sublayers run on merged tokens, outputs unmerged) or ``"kv"``
            (self- and joint attention keep every query; their image keys and values become
            the cluster means, each merged key's logit gets ``+ log(size)``); ``merge_mlp``
            and ``merge_crossattn`` keep merging tokens.
    """

    KIND: ClassVar[str] = "diffusion"
    WHAT: ClassVar[str] = "diffusion models"
    METHODS: ClassVar[tuple[str, ...]] = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")
    METHOD_ONLY: ClassVar[dict[str, tuple[str, ...]]] = {
        "atc": ("linkage", "backend"),
        "tome_sd": ("sx", "sy", "st", "use_rand", "seed", "generator"),
    }

    ratio: float = 0.5
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    max_downsample: int | None = None
    blocks: tuple[int, ...] | None = None
    metric_dim: int | None = None
    linkage: str | None = None
    backend: str = "auto"
    sx: int = 2
    sy: int = 2
    st: int | None = None
    use_rand: bool = True
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, compare=False)
    tile: tuple[int, ...] | None = None
    plan_scope: str = "block"
    reuse_steps: int = 1
    merge: str = "tokens"

    def __post_init__(self) -> None:
        method = self._check_method_only()
        ratio = as_float("ratio", self.ratio)
        if not 0 <= ratio < 1 or math.isnan(ratio):
            raise ValueError(f"ratio is the fraction of tokens removed, in [0, 1); got {ratio}")
        flags = {
            k: as_bool(k, getattr(self, k)) for k in ("merge_attn", "merge_crossattn", "merge_mlp")
        }
        if not any(flags.values()):
            raise ValueError(
                "merge_attn, merge_crossattn and merge_mlp are all False: nothing merges"
            )
        blocks = self.blocks
        if blocks is not None:
            blocks = as_int_list("blocks", blocks, minimum=0)
            if not blocks:
                raise ValueError("blocks=[] selects no block; pass None for every block")
            if len(set(blocks)) != len(blocks):
                raise ValueError(f"blocks lists a block twice: {list(blocks)}")
        self._set(
            ratio=ratio,
            **flags,
            max_downsample=_optional_int("max_downsample", self.max_downsample, 1),
            blocks=blocks,
            metric_dim=_optional_int("metric_dim", self.metric_dim, 1),
            linkage=_linkage(method, self.linkage),
            backend=_backend(method, self.backend),
            sx=as_int("sx", self.sx, minimum=1),
            sy=as_int("sy", self.sy, minimum=1),
            st=_optional_int("st", self.st, 1),
            use_rand=as_bool("use_rand", self.use_rand),
        )
        self._gpu_options(method)
        if method != "tome_sd":
            return
        if self.sx * self.sy * (self.st or 1) == 1:
            raise ValueError(
                "method='tome_sd' with sx=sy=1 merges nothing: every token is the destination "
                "of its own 1x1 window (st=1: one frame). Use windows of at least 2 tokens (the "
                "default 2x2)."
            )
        gen = self.generator
        if gen is not None and not isinstance(gen, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(gen).__name__}")
        if self.seed is not None and gen is not None:
            raise ValueError("give seed or generator, not both (both set tome_sd's random draws)")
        seed = _optional_int("seed", self.seed, None)
        if seed is None and gen is None and self.use_rand:
            fork = torch.Generator().set_state(torch.get_rng_state())  # not advanced
            seed = int(torch.randint(2**62, (1,), generator=fork))
        self._set(seed=seed)

    def _gpu_options(self, method: str) -> None:
        """Validate ``tile``, ``plan_scope``, ``reuse_steps`` and ``merge``."""
        tile = self.tile
        if tile is not None:
            tile = as_int_list("tile", tile, minimum=1)
            if len(tile) not in (2, 3):
                raise ValueError(
                    "tile must be (th, tw) in token-grid units, or (tt, th, tw) for a video "
                    f"transformer's frames x height x width, got {self.tile!r}"
                )
            if method == "tome_sd":
                raise ValueError(
                    "tile does not apply to method='tome_sd': it is local already (one "
                    "destination per sy x sx window); use sx/sy, or tile with another method"
                )
        if self.plan_scope not in PLAN_SCOPES:
            raise ValueError(f"plan_scope must be one of {PLAN_SCOPES}, got {self.plan_scope!r}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if self.merge == "kv" and not self.merge_attn:
            raise ValueError(
                "merge='kv' merges the keys and values of the attention that merge_attn "
                "selects; it needs merge_attn=True"
            )
        self._set(tile=tile, reuse_steps=as_int("reuse_steps", self.reuse_steps, minimum=1))


def _optional_int(name: str, value: Any, minimum: int | None) -> int | None:
    return None if value is None else as_int(name, value, minimum=minimum)


@dataclass(frozen=True)
class AdapterConfig(PatchConfig):
    """Token reduction in the mmdet ViT-Adapter backbone (``atc_patch.mmdet.ViTAdapter``).

    Attributes:
        method: ``"atc"`` or ``"tome"``.
        reduction_ratio: per reduction location, the fraction of the current tokens kept
            (one value for all, or one per location); required. Reductions compound.
        reduction_loc: increasing, distinct block indices that reduce (default ``(3, 6, 9)``).
        linkage: ATC only: ``"single"``, ``"complete"`` or ``"average"`` (default).
        proportional_attn: add ``log(size)`` to the attention logits of merged tokens.
        keep_rate_mode: ``"target"`` or ``"reference"`` (see :mod:`atc_patch.schedule`).
    """

    KIND: ClassVar[str] = "adapter"
    WHAT: ClassVar[str] = "a ViTAdapter"
    METHODS: ClassVar[tuple[str, ...]] = ("atc", "tome")
    METHOD_ONLY: ClassVar[dict[str, tuple[str, ...]]] = {"atc": ("linkage",)}

    reduction_ratio: float | tuple[float, ...] | None = None
    reduction_loc: tuple[int, ...] = (3, 6, 9)
    linkage: str | None = None
    proportional_attn: bool = True
    keep_rate_mode: str = "target"

    def __post_init__(self) -> None:
        method = self._check_method_only()
        if self.keep_rate_mode not in KEEP_RATE_MODES:
            raise ValueError(
                f"keep_rate_mode must be one of {KEEP_RATE_MODES}, got {self.keep_rate_mode!r}"
            )
        if self.reduction_loc is None:
            raise ValueError("reduction_loc must be a list of block indices, got None")
        # The location rule is the schedule's (increasing, distinct, >= 0).
        locs = make_schedule(keep_rate=1.0, reduction_loc=self.reduction_loc).reduction_loc
        self._set(
            reduction_loc=locs,
            reduction_ratio=_ratios(self.reduction_ratio, len(locs)),
            linkage=_linkage(method, self.linkage),
            proportional_attn=as_bool("proportional_attn", self.proportional_attn),
        )

    def check_depth(self, depth: int) -> None:
        """Raise ``ValueError`` if a reduction location is past the last of ``depth`` blocks."""
        if self.reduction_loc and self.reduction_loc[-1] >= depth:
            raise ValueError(
                f"reduction_loc must be block indices in [0, {depth}), got "
                f"{list(self.reduction_loc)}"
            )


def _ratios(ratio: Any, num_locs: int) -> tuple[float, ...]:
    if ratio is None:
        raise ValueError(
            "reduction_ratio is required: the fraction of tokens kept at each reduction_loc, "
            "e.g. 0.7"
        )
    many = not isinstance(ratio, (str, bytes)) and (
        isinstance(ratio, (list, tuple)) or getattr(ratio, "ndim", 0) >= 1
    )
    values = [
        as_float(f"reduction_ratio[{i}]" if many else "reduction_ratio", v)
        for i, v in enumerate(list(ratio) if many else [ratio])
    ]
    if len(values) == 1:
        values = values * num_locs
    if len(values) != num_locs:
        raise ValueError(
            f"reduction_ratio has {len(values)} values for {num_locs} reduction_loc entries; "
            "give one value or one per location"
        )
    if any(not 0.0 < v <= 1.0 for v in values):
        raise ValueError(f"reduction_ratio values must be in (0, 1], got {values}")
    return tuple(values)


CONFIGS: dict[str, type[PatchConfig]] = {
    c.KIND: c for c in (ViTConfig, DiffusionConfig, AdapterConfig)
}


@dataclass(frozen=True)
class PatchInfo:
    """The record of a patch, kept on the patched root module only.

    Attributes:
        family: the family that patched it (``"timm"``, ``"unet"``, ...).
        config: the validated config in use.
        details: what the family reports beside the config (e.g. ``num_blocks``).
        state: per-patch objects the family keeps (e.g. the ``trace_source`` slot); never
            reported, not compared.
        unused: the config's options the family has no use for (left out of ``settings``).
    """

    family: str
    config: PatchConfig
    details: Mapping[str, Any] = field(default_factory=dict)
    state: Any = field(default=None, compare=False, repr=False)

    @property
    def method(self) -> str:
        return self.config.method

    unused: tuple[str, ...] = ()

    @property
    def settings(self) -> dict[str, Any]:
        """The config's values in use (without the options the family has no use for) plus
        the family's details."""
        return {**self.config.settings(self.unused), **self.details}
