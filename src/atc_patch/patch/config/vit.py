"""Token reduction in ViT-like encoders (timm, torchvision, transformers): :class:`ViTConfig`.

Example::

    ViTConfig(method="atc", keep_rate=0.7, reduction_loc=(3, 6, 9))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..._validate import as_bool
from ...schedule import Schedule, make_schedule
from .base import PatchConfig, _backend, _linkage

SIZE_MODES = ("keep", "reset")


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
