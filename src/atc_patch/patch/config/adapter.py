"""Token reduction in the mmdet ViT-Adapter backbone: :class:`AdapterConfig`.

Example::

    AdapterConfig(method="atc", reduction_ratio=0.7, reduction_loc=(3, 6, 9))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..._validate import as_bool, as_float
from ...schedule import KEEP_RATE_MODES, make_schedule
from .base import PatchConfig, _linkage


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
