"""Token reduction settings and per-forward token bookkeeping for the ViT-Adapter.

Two small pieces, both free of mmcv/mmdet so they read (and test) on their own:

* :class:`Reduction`: validated settings (``method``, ``linkage``, ``reduction_loc``,
  ``reduction_ratio``, ``proportional_attn``, ``keep_rate_mode``) that turn a block's attention
  keys into a :class:`~atc_patch.kernel.plan.MergePlan` at the reduction locations.
  ``reduction_ratio`` is the fraction of the tokens kept at a location, and reductions
  compound: ``0.7`` at blocks 3, 6, 9 keeps 70 %, 49 % and 34.3 % of the grid. The *targets*
  are ``T_j = max(1, int(ratio_j * T_{j-1}))`` from ``T_0 = h * w`` (``int(ratio * T)``
  clusters, as the ATC reference code). When a method cannot reach a target (ToMe removes at
  most half of the tokens in one step), ``keep_rate_mode`` says what the next locations do, as
  for the ViT patches (:mod:`atc_patch.schedule`): ``"target"`` (default) aims at their
  targets from the tokens actually left, and a missed target is reported by a warning (once
  per input size); ``"reference"`` keeps ``int(ratio * T)`` of the ``T`` tokens each location
  actually gets, as the reference code does.
* :class:`TokenGrid`: the composite plan from the full ``h x w`` patch grid to the current
  (reduced) tokens, built up during one forward pass. It unmerges tokens to the grid wherever the
  adapter needs spatial features and merges grid features back onto the current clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..kernel import cluster_tokens
from ..kernel.plan import MergePlan
from ..patch.config import AdapterConfig
from ..schedule import Step, step_r, warn_unreachable

METHODS = AdapterConfig.METHODS
"""Token reduction methods the ViT-Adapter supports (``None`` means no reduction)."""


@dataclass(frozen=True)
class Reduction:
    """Where and how the ViT blocks of a ViT-Adapter reduce their tokens.

    Attributes:
        method: ``"atc"`` (agglomerative clustering) or ``"tome"`` (bipartite soft matching).
        linkage: ATC linkage (``"single"``, ``"complete"``, ``"average"``); ``None`` for ToMe.
        reduction_loc: indices of the blocks that reduce (after their attention, before the MLP).
        reduction_ratio: per location, the fraction of the current tokens that is kept.
        proportional_attn: add ``log(size)`` to the attention logits of merged tokens (ToMe).
        keep_rate_mode: ``"target"`` or ``"reference"``, see the module docstring.
    """

    method: str
    linkage: str | None
    reduction_loc: tuple[int, ...]
    reduction_ratio: tuple[float, ...]
    proportional_attn: bool = True
    keep_rate_mode: str = "target"
    _warned: set = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: AdapterConfig) -> Reduction:
        """The reduction a validated :class:`~atc_patch.AdapterConfig` describes."""
        return cls(
            config.method,
            config.linkage,
            config.reduction_loc,
            config.reduction_ratio,
            config.proportional_attn,
            config.keep_rate_mode,
        )

    def keep_ratio(self, block: int) -> float | None:
        """The keep ratio of ``block``, or ``None`` when the block does not reduce."""
        if block in self.reduction_loc:
            return self.reduction_ratio[self.reduction_loc.index(block)]
        return None

    def num_kept(self, block: int, num_tokens: int) -> int:
        """Tokens ``block`` keeps of ``num_tokens`` by its own ratio: ``max(1, int(ratio * T))``
        (``num_tokens`` for a block that does not reduce)."""
        ratio = self.keep_ratio(block)
        return num_tokens if ratio is None else max(1, int(ratio * num_tokens))

    def targets(self, num_patches: int) -> dict[int, int]:
        """``{block: tokens to keep}`` for every reduction location, ``num_patches`` grid cells:
        ``T_j = max(1, int(ratio_j * T_{j-1}))`` from ``T_0 = num_patches``."""
        out, t = {}, num_patches
        for block in self.reduction_loc:
            t = self.num_kept(block, t)
            out[block] = t
        return out

    def step(self, block: int, num_patches: int | None, num_tokens: int) -> Step:
        """What ``block`` is asked when ``num_tokens`` tokens enter it (``num_patches`` grid
        cells; ``None``: unknown, the block then keeps ``int(ratio * T)`` of its own tokens)."""
        if self.keep_ratio(block) is None:
            return Step()
        if self.keep_rate_mode == "reference" or num_patches is None:
            return Step(keep=self.num_kept(block, num_tokens))
        return Step(keep=self.targets(num_patches)[block])

    def plan(self, block: int, metric: Tensor, num_patches: int | None = None) -> MergePlan | None:
        """The merge plan of ``block`` for its keys ``metric`` ``(B, T, C)``, or ``None``.

        ``num_patches`` (``h * w`` of this forward) sets the targets of ``keep_rate_mode=
        "target"``. ``None`` is returned for blocks that do not reduce and for plans that keep
        every token, so a ratio of 1.0 runs exactly the code path of an unreduced model.
        """
        if self.keep_ratio(block) is None:
            return None
        num_tokens = metric.shape[1]
        if num_patches is not None and block == self.reduction_loc[0]:
            self.check_reachable(num_patches)
        r = step_r(self.step(block, num_patches, num_tokens), num_tokens, self.method)
        plan = cluster_tokens(metric, r, method=self.method, linkage=self.linkage)
        return None if plan.is_identity else plan

    def check_reachable(self, num_patches: int) -> None:
        """Warn (once per ``num_patches``) when the method misses a target on this grid."""
        if num_patches in self._warned:
            return
        targets = self.targets(num_patches)
        counts = expected_token_counts(self, max(self.reduction_loc) + 2, num_patches)
        kept = [counts[block + 1] for block in self.reduction_loc]
        if kept != list(targets.values()):
            self._warned.add(num_patches)
            warn_unreachable(
                self.method,
                f"reduction_ratio={list(self.reduction_ratio)} at reduction_loc="
                f"{list(self.reduction_loc)}",
                list(targets.values()),
                kept,
                num_patches,
                self.keep_rate_mode,
                "ViTAdapter",
            )

    def settings(self) -> dict[str, Any]:
        """The values in use, as plain Python values (for ``patch_settings``)."""
        return {
            "linkage": self.linkage,
            "reduction_loc": self.reduction_loc,
            "reduction_ratio": self.reduction_ratio,
            "proportional_attn": self.proportional_attn,
            "keep_rate_mode": self.keep_rate_mode,
        }


def make_reduction(
    method: str | None = None,
    linkage: str | None = None,
    reduction_loc: Sequence[int] | None = (3, 6, 9),
    reduction_ratio: float | Sequence[float] | None = None,
    proportional_attn: bool = True,
    depth: int = 12,
    keep_rate_mode: str = "target",
) -> Reduction | None:
    """Validate backbone settings (through :class:`~atc_patch.AdapterConfig`) and return a
    :class:`Reduction`, or ``None`` for no reduction.

    Args:
        method: ``None`` (no reduction) or one of :data:`METHODS`.
        linkage, reduction_loc, reduction_ratio, proportional_attn, keep_rate_mode: the
            fields of :class:`~atc_patch.AdapterConfig`.
        depth: number of ViT blocks (``reduction_loc`` must lie in ``[0, depth)``).

    Raises:
        ValueError: naming the valid choices, for any value that cannot be used, including
            reduction options given while ``method`` is ``None`` (they would be ignored).
    """
    if method is None:
        if linkage is not None or reduction_ratio is not None:
            raise ValueError(
                "linkage/reduction_ratio are set but method is None (no reduction); "
                f"set method to one of {METHODS}"
            )
        return None
    config = AdapterConfig(
        method=method,
        linkage=linkage,
        reduction_loc=reduction_loc,
        reduction_ratio=reduction_ratio,
        proportional_attn=proportional_attn,
        keep_rate_mode=keep_rate_mode,
    )
    config.check_depth(depth)
    return Reduction.from_config(config)


class TokenGrid:
    """The current tokens of one forward pass, as clusters of the full patch grid.

    Starts as the identity (every grid cell is its own token). After each reduction the block's
    plan is composed in, so :attr:`plan` always maps the ``N0 = h * w`` grid cells to the ``T``
    current tokens. Lives in the forward call only (no state on the module).
    """

    def __init__(self) -> None:
        self.plan: MergePlan | None = None
        self.steps: list[MergePlan] = []

    @property
    def reduced(self) -> bool:
        return self.plan is not None

    def compose(self, plan: MergePlan) -> None:
        """Follow a block's plan ``(B, T)`` -> ``T'`` tokens."""
        self.steps.append(plan)
        if self.plan is None:
            self.plan = plan
        else:
            labels = plan.labels.gather(1, self.plan.labels)
            self.plan = MergePlan(labels, plan.num_out)

    def to_grid(self, x: Tensor) -> Tensor:
        """Unmerge ``(B, T, C)`` tokens to the grid ``(B, N0, C)`` (each cell gets its cluster)."""
        return x if self.plan is None else self.plan.unmerge(x)

    def from_grid(self, x: Tensor, weighted: bool = True) -> Tensor:
        """Merge grid features ``(B, N0, C)`` onto the ``(B, T, C)`` tokens: the mean of each
        token's grid cells; ``weighted=False``: merged again step by step, each step the plain
        mean of the tokens it merges (the reference without proportional attention, whose
        merges forget token sizes)."""
        if self.plan is None:
            return x
        if weighted:
            return self.plan.merge(x, mode="mean")
        for plan in self.steps:
            x = plan.merge(x, mode="mean")
        return x

    def sizes(self) -> Tensor | None:
        """``(B, T, 1)`` grid cells behind each current token, or ``None`` before any reduction."""
        return None if self.plan is None else self.plan.sizes().unsqueeze(-1)

    def num_tokens(self, grid_size: int) -> int:
        return grid_size if self.plan is None else self.plan.num_out


def expected_token_counts(reduction: Reduction | None, depth: int, num_patches: int) -> list[int]:
    """Tokens entering each of ``depth`` blocks for ``num_patches`` grid cells (for tests/docs).

    What a forward does: each location aims at its target (or, with ``keep_rate_mode=
    "reference"``, keeps ``int(ratio * T)`` of its ``T`` tokens), clamped to what the method
    can remove in one step (ToMe at most half).
    """
    if reduction is None:
        return [num_patches] * depth
    counts, t = [], num_patches
    for block in range(depth):
        counts.append(t)
        t -= step_r(reduction.step(block, num_patches, t), t, reduction.method)
    return counts


__all__ = [
    "METHODS",
    "Reduction",
    "TokenGrid",
    "expected_token_counts",
    "make_reduction",
]
