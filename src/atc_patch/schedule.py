"""Reduction schedules of the ViT-like families: how many tokens block ``l`` removes.

* ``r=int``, ``r_schedule="constant"``: ``r`` tokens in every block (ToMe).
* ``r=int``, ``r_schedule="decrease"``: ToMe's ``parse_r(num_blocks, (r, -1.0))``, the ATC
  off-the-shelf study's schedule: ``r_l = int(2r + l * (0 - 2r) / (L - 1))``.
* ``r=[r_0, r_1, ...]``: one value per block (a shorter list is padded with zeros).
* ``keep_rate=k``, ``reduction_loc=(i_0, i_1, ...)``: the ATC DeiT setting; the target after
  the ``j``-th location is ``int(num_patches * k ** (j + 1))`` unprotected tokens.

When a method cannot remove what a location asks (ToMe: at most half the unprotected tokens,
:func:`atc_patch.kernel.max_reduction`), ``keep_rate_mode="target"`` (default) aims every
later location at its own target and warns once per input size; ``"reference"`` removes the
schedule's fixed differences, as the ATC reference code does. A family's forward asks
:meth:`Schedule.steps` once per forward and turns each :class:`Step` into an ``r`` with
:func:`step_r` from the tokens that actually enter the block::

    s = make_schedule(keep_rate=0.7, reduction_loc=(3, 6, 9))
    s.per_block(12, 196)   # [0, 0, 0, 59, 0, 0, 41, 0, 0, 29, 0, 0]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._validate import as_float, as_int, as_int_list
from .kernel import max_reduction

R_SCHEDULES = ("constant", "decrease")
KEEP_RATE_MODES = ("target", "reference")


@dataclass(frozen=True)
class Step:
    """What one block is asked to do.

    Attributes:
        remove: tokens to remove (the schedule's fixed count for this block).
        keep: non-protected tokens to keep after the block (its target), or ``None`` when
            the block just removes ``remove`` tokens.
    """

    remove: int = 0
    keep: int | None = None


def step_r(step: Step, num_tokens: int, method: str, protected: int = 0) -> int:
    """Tokens a block removes when ``num_tokens`` tokens (``protected`` included) enter it.

    With a target (``step.keep``) the block removes what reaches it, otherwise
    ``step.remove``; either is clamped to ``max_reduction(method, num_tokens, protected)``.
    """
    free = num_tokens - protected
    want = step.remove if step.keep is None else free - step.keep
    return max(0, min(want, max_reduction(method, num_tokens, protected)))


def simulate(steps: Sequence[Step], num_tokens: int, method: str, protected: int = 0) -> list[int]:
    """The ``r`` of every block when ``num_tokens`` tokens enter the first one.

    The kernel returns exactly ``N - r`` tokens for the ``r`` it is given, so this is what a
    forward does, computed from token counts alone (for checks, warnings and docs).
    """
    rs = []
    for step in steps:
        r = step_r(step, num_tokens, method, protected)
        rs.append(r)
        num_tokens -= r
    return rs


@dataclass(frozen=True)
class Schedule:
    """A validated reduction schedule: how many tokens each block removes. Build it with
    :func:`make_schedule`, which raises ``ValueError`` for bad arguments.

    Attributes:
        r: tokens removed per block (an int), or one value per block (a tuple); or ``None``.
        r_schedule: ``"constant"`` or ``"decrease"`` (ToMe's ``parse_r`` ramp) for an int ``r``.
        keep_rate: fraction of the unprotected tokens kept after each ``reduction_loc``.
        reduction_loc: the block indices that reduce with ``keep_rate``.
        keep_rate_mode: ``"target"`` (each location aims at ``keep_rate ** (j + 1)`` of the
            tokens, whatever earlier blocks managed) or ``"reference"`` (the reference code's
            fixed deltas).
    """

    r: int | tuple[int, ...] | None = None
    r_schedule: str = "constant"
    keep_rate: float | None = None
    reduction_loc: tuple[int, ...] | None = None
    keep_rate_mode: str = "target"
    _warned: set = field(default_factory=set, compare=False, repr=False)

    def per_block(self, num_blocks: int, num_patches: int) -> list[int]:
        """Tokens each of ``num_blocks`` blocks is asked to remove, ``num_patches`` unprotected
        tokens in, when every block before it removed what it was asked (the fixed deltas).

        The counts are not clamped; see :meth:`steps` for what a forward does.

        Raises:
            ValueError: for a ``reduction_loc`` or an ``r`` list past the last block.
        """
        if self.keep_rate is not None:
            wanted = [0] * num_blocks
            kept = num_patches
            for loc, target in zip(self.reduction_loc or (), self._targets(num_patches)):
                if loc >= num_blocks:
                    raise ValueError(
                        f"reduction_loc {loc} is out of range for a model with {num_blocks} blocks"
                    )
                wanted[loc] = max(kept - target, 0)
                kept -= wanted[loc]
        elif isinstance(self.r, tuple):
            if len(self.r) > num_blocks:
                raise ValueError(
                    f"r has {len(self.r)} entries but the model has {num_blocks} blocks"
                )
            wanted = list(self.r) + [0] * (num_blocks - len(self.r))
        elif self.r_schedule == "decrease":
            wanted = _tome_parse_r(num_blocks, int(self.r or 0), inflect=-1.0)
        else:
            wanted = [int(self.r or 0)] * num_blocks
        return [max(0, w) for w in wanted]

    def targets(self, num_blocks: int, num_patches: int) -> list[int | None]:
        """Per block, the non-protected tokens the schedule wants left after it (``None`` for
        blocks that are not reduction locations and for ``r`` schedules)."""
        out: list[int | None] = [None] * num_blocks
        if self.keep_rate is not None:
            self.per_block(num_blocks, num_patches)  # range checks
            for loc, target in zip(self.reduction_loc or (), self._targets(num_patches)):
                out[loc] = target
        return out

    def steps(self, num_blocks: int, num_patches: int) -> list[Step]:
        """The :class:`Step` of every block (targets in ``keep_rate_mode="target"``)."""
        removes = self.per_block(num_blocks, num_patches)
        if self.keep_rate is None or self.keep_rate_mode == "reference":
            return [Step(remove=r) for r in removes]
        targets = self.targets(num_blocks, num_patches)
        return [Step(remove=r, keep=t) for r, t in zip(removes, targets)]

    def check_reachable(
        self, num_blocks: int, num_tokens: int, method: str, protected: int, what: str = "model"
    ) -> list[int]:
        """The ``r`` of every block for ``num_tokens`` input tokens; warns (once per
        ``num_tokens``) when a ``keep_rate`` target is missed because ``method`` cannot remove
        enough tokens in one step."""
        free = max(num_tokens - protected, 0)
        steps = self.steps(num_blocks, free)
        rs = simulate(steps, num_tokens, method, protected)
        if self.keep_rate is None or (method, num_tokens) in self._warned:
            return rs
        targets = self.targets(num_blocks, free)
        kept, asked, got = free, [], []
        for r, target in zip(rs, targets):
            kept -= r
            if target is not None:
                asked.append(target)
                got.append(kept)
        if got != asked:
            self._warned.add((method, num_tokens))
            warn_unreachable(
                method,
                f"keep_rate={self.keep_rate:g} at reduction_loc={self.reduction_loc}",
                asked,
                got,
                free,
                self.keep_rate_mode,
                what,
            )
        return rs

    def is_identity(self) -> bool:
        """True when the schedule removes nothing for any model (r=0 or keep_rate=1)."""
        if self.keep_rate is not None:
            return self.keep_rate >= 1.0 or not self.reduction_loc
        if isinstance(self.r, tuple):
            return all(v == 0 for v in self.r)
        return not self.r

    def settings(self) -> dict[str, Any]:
        """The values in use, as plain Python values (for ``patch_settings``)."""
        return {
            "r": list(self.r) if isinstance(self.r, tuple) else self.r,
            "r_schedule": self.r_schedule,
            "keep_rate": self.keep_rate,
            "reduction_loc": self.reduction_loc,
            "keep_rate_mode": self.keep_rate_mode,
        }

    def _targets(self, num_patches: int) -> list[int]:
        k = self.keep_rate or 1.0
        return [int(num_patches * k ** (j + 1)) for j in range(len(self.reduction_loc or ()))]


def warn_unreachable(
    method: str,
    asked_by: str,
    targets: Sequence[int],
    kept: Sequence[int],
    num_in: int,
    mode: str,
    what: str = "model",
) -> None:
    """Warn that ``method`` keeps ``kept`` tokens where the schedule's ``targets`` asked fewer."""
    if method == "tome":
        cap = " (ToMe removes at most half of the unprotected tokens per block)"
    else:
        cap = " (every method keeps at least one unprotected token)"
    warnings.warn(
        f"{method} cannot reach the token targets of {asked_by} on this {what}{cap}: of "
        f"{num_in} tokens it keeps {'/'.join(map(str, kept))} after the reduction locations "
        f"where {'/'.join(map(str, targets))} were asked (keep_rate_mode={mode!r})",
        UserWarning,
        stacklevel=3,
    )


def _tome_parse_r(num_blocks: int, r: int, inflect: float) -> list[int]:
    """ToMe's ``parse_r`` for ``(r, inflect)``: a linear ramp with the same mean ``r``."""
    if num_blocks == 1:
        return [r]
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_blocks - 1)
    return [int(min_val + step * i) for i in range(num_blocks)]


def _is_list(value: Any) -> bool:
    return (
        isinstance(value, Iterable)
        and not isinstance(value, (str, bytes))
        and getattr(value, "ndim", 1) != 0
    )


def make_schedule(
    r: int | Sequence[int] | None = None,
    r_schedule: str = "constant",
    keep_rate: float | None = None,
    reduction_loc: int | Sequence[int] | None = None,
    keep_rate_mode: str = "target",
    *,
    required: bool = False,
) -> Schedule:
    """Validate user arguments and return a :class:`Schedule`.

    Integral numbers of any numeric type are accepted for ``r`` and ``reduction_loc``
    (``4.0``, ``numpy.int64(4)``); a single int is accepted for ``reduction_loc``.

    Args:
        required: raise when neither ``r`` nor ``keep_rate`` is given (instead of an empty
            schedule); the ViT patches use it so that a patch never silently does nothing.

    Raises:
        ValueError: naming the valid choices for anything it cannot use, including
            arguments that would otherwise be silently ignored (``reduction_loc`` without
            ``keep_rate``, ``r`` together with ``keep_rate``, ``r_schedule`` with a per-block
            list), non-integral numbers, strings and bools.
    """
    if r_schedule not in R_SCHEDULES:
        raise ValueError(f"r_schedule must be one of {R_SCHEDULES}, got {r_schedule!r}")
    if keep_rate_mode not in KEEP_RATE_MODES:
        raise ValueError(f"keep_rate_mode must be one of {KEEP_RATE_MODES}, got {keep_rate_mode!r}")
    if keep_rate is not None:
        if r is not None:
            raise ValueError("give either r (tokens removed per block) or keep_rate, not both")
        if r_schedule != "constant":
            raise ValueError("r_schedule applies to r, not to keep_rate/reduction_loc")
        rate = as_float("keep_rate", keep_rate)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
        if reduction_loc is None:
            raise ValueError("keep_rate needs reduction_loc, e.g. reduction_loc=(3, 6, 9)")
        locs = as_int_list("reduction_loc", reduction_loc)
        if any(v < 0 for v in locs) or list(locs) != sorted(set(locs)):
            raise ValueError(
                f"reduction_loc must be increasing, distinct block indices >= 0, got {locs}"
            )
        return Schedule(keep_rate=rate, reduction_loc=locs, keep_rate_mode=keep_rate_mode)
    if reduction_loc is not None:
        raise ValueError("reduction_loc is only used together with keep_rate")
    if keep_rate_mode != "target":
        raise ValueError("keep_rate_mode applies to keep_rate/reduction_loc, not to r")
    if r is None:
        if required:
            raise ValueError(
                "say how many tokens to remove: r=... (tokens removed per block, e.g. r=16, "
                "or a list with one value per block) or keep_rate=... with reduction_loc=... "
                "(e.g. keep_rate=0.7, reduction_loc=(3, 6, 9)); r=0 reduces nothing"
            )
        r = 0
    if _is_list(r):
        if r_schedule != "constant":
            raise ValueError("r_schedule applies to an int r, not to a per-block list")
        values = as_int_list("r", r)
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0 in every block, got {list(values)}")
        return Schedule(r=values)
    value = as_int("r", r)
    if value < 0:
        raise ValueError(f"r must be >= 0, got {value}")
    return Schedule(r=value, r_schedule=r_schedule)
