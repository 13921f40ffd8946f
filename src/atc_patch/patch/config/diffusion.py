"""Token reduction in diffusion models (diffusers UNets and diffusion transformers):
:class:`DiffusionConfig`.

Example::

    DiffusionConfig(method="atc", ratio=0.5, tile=(16, 16), plan_scope="resolution")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..._validate import as_bool, as_float, as_int, as_int_list
from .base import PatchConfig, _backend, _linkage, _optional_int

PLAN_SCOPES = ("block", "resolution")
MERGE_MODES = ("tokens", "kv")


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
