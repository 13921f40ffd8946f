"""Reduction schedules shared by every model family.

A schedule answers one question: how many tokens does block ``l`` remove, given the number of
blocks and the number of (non-protected) patch tokens that enter the first block? Keeping it
here means timm, torchvision, diffusers and mmdet patches all read ``r``/``keep_rate`` the same
way.

Three ways to state it:

* ``r=int`` with ``r_schedule="constant"``: ``r`` tokens removed in every block (ToMe).
* ``r=int`` with ``r_schedule="decrease"``: ToMe's ``parse_r(num_blocks, (r, -1.0))``, the
  schedule of the ATC off-the-shelf study. It decreases linearly from ``2r`` in the first block
  to ``0`` in the last: ``r_l = int(2r + l * (0 - 2r) / (L - 1))`` for ``l = 0 .. L-1`` (the
  same total as the constant schedule, up to ``int`` truncation).
* ``r=[r_0, r_1, ...]``: one value per block (a shorter list is padded with zeros, as ToMe does).
* ``keep_rate=k`` with ``reduction_loc=(i_0, i_1, ...)``: the ATC DeiT setting. After the
  ``j``-th reduction location the number of non-protected tokens kept is
  ``int(num_patches * k ** (j + 1))``; all other blocks remove nothing.

The kernel clamps a block's ``r`` to what its method can remove from the tokens actually left
(ToMe removes at most half of the unprotected tokens in one step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

R_SCHEDULES = ("constant", "decrease")


@dataclass(frozen=True)
class Schedule:
    """A validated reduction schedule. Build it with :func:`make_schedule`."""

    r: int | tuple[int, ...] | None = None
    r_schedule: str = "constant"
    keep_rate: float | None = None
    reduction_loc: tuple[int, ...] | None = None

    def per_block(self, num_blocks: int, num_patches: int) -> list[int]:
        """Tokens removed by each of ``num_blocks`` blocks, ``num_patches`` unprotected tokens in.

        The counts are what the schedule asks for. They are not clamped here: the kernel clamps
        each block to what its method can remove from the tokens actually left (ToMe at most
        half, every method leaves at least one unprotected token), so a block that removed
        less than asked does not make later blocks remove less too.
        """
        if self.keep_rate is not None:
            wanted = [0] * num_blocks
            kept = num_patches
            for j, loc in enumerate(self.reduction_loc or ()):
                if loc >= num_blocks:
                    raise ValueError(
                        f"reduction_loc {loc} is out of range for a model with {num_blocks} blocks"
                    )
                target = int(num_patches * self.keep_rate ** (j + 1))
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

    def is_identity(self) -> bool:
        """True when the schedule removes nothing for any model (r=0 or keep_rate=1)."""
        if self.keep_rate is not None:
            return self.keep_rate >= 1.0 or not self.reduction_loc
        if isinstance(self.r, tuple):
            return all(v == 0 for v in self.r)
        return not self.r


def _tome_parse_r(num_blocks: int, r: int, inflect: float) -> list[int]:
    """ToMe's ``parse_r`` for ``(r, inflect)``: a linear ramp with the same mean ``r``."""
    if num_blocks == 1:
        return [r]
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_blocks - 1)
    return [int(min_val + step * i) for i in range(num_blocks)]


def make_schedule(
    r: int | Sequence[int] | None = None,
    r_schedule: str = "constant",
    keep_rate: float | None = None,
    reduction_loc: Sequence[int] | None = None,
) -> Schedule:
    """Validate user arguments and return a :class:`Schedule`.

    Raises ``ValueError`` naming the valid choices for anything it cannot use, including
    arguments that would otherwise be silently ignored (``reduction_loc`` without ``keep_rate``,
    ``r`` together with ``keep_rate``, ``r_schedule`` with a per-block list).
    """
    if r_schedule not in R_SCHEDULES:
        raise ValueError(f"r_schedule must be one of {R_SCHEDULES}, got {r_schedule!r}")
    if keep_rate is not None:
        if r is not None:
            raise ValueError("give either r (tokens removed per block) or keep_rate, not both")
        if r_schedule != "constant":
            raise ValueError("r_schedule applies to r, not to keep_rate/reduction_loc")
        if not 0.0 < float(keep_rate) <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
        if reduction_loc is None:
            raise ValueError("keep_rate needs reduction_loc, e.g. reduction_loc=(3, 6, 9)")
        locs = tuple(int(v) for v in reduction_loc)
        if any(v < 0 for v in locs) or list(locs) != sorted(set(locs)):
            raise ValueError(
                f"reduction_loc must be increasing, distinct block indices >= 0, got {locs}"
            )
        return Schedule(keep_rate=float(keep_rate), reduction_loc=locs)
    if reduction_loc is not None:
        raise ValueError("reduction_loc is only used together with keep_rate")
    if r is None:
        r = 0
    if isinstance(r, (list, tuple)):
        if r_schedule != "constant":
            raise ValueError("r_schedule applies to an int r, not to a per-block list")
        values = tuple(int(v) for v in r)
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0 in every block, got {list(values)}")
        return Schedule(r=values)
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be an int or a list of ints, got {r!r}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    return Schedule(r=r, r_schedule=r_schedule)
