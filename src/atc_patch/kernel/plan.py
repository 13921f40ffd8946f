"""The merge plan: who merges with whom, applied to every tensor that must follow it."""

from __future__ import annotations

import torch
from torch import Tensor

MERGE_MODES = ("mean", "sum", "amax")


class MergePlan:
    """A partition of ``N`` input tokens into ``num_out`` output slots, batched over ``B``.

    Attributes:
        labels: ``(B, N)`` int64, the output slot of every input token, in ``[0, num_out)``.
            Every slot is used by at least one token.
        num_out: number of output tokens, ``N - r``.

    One plan is computed per reduction point and applied to hidden states, token sizes, the
    source map and anything else that must follow the same merge.
    """

    def __init__(self, labels: Tensor, num_out: int) -> None:
        if labels.dim() != 2:
            raise ValueError(f"labels must be (B, N), got shape {tuple(labels.shape)}")
        self.labels = labels
        self.num_out = int(num_out)
        self._identity = False  # set only by MergePlan.identity()

    @property
    def num_in(self) -> int:
        return self.labels.shape[1]

    @property
    def is_identity(self) -> bool:
        """True when nothing merges and the order is kept (then merge/unmerge return x as is)."""
        return self._identity

    @classmethod
    def identity(cls, batch: int, num_tokens: int, device: torch.device | str) -> MergePlan:
        """A plan that keeps every token in place."""
        labels = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
        plan = cls(labels, num_tokens)
        plan._identity = True
        return plan

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[:2] != self.labels.shape:
            raise ValueError(
                f"expected a (B, N, C) tensor with (B, N) = {tuple(self.labels.shape)}, "
                f"got shape {tuple(x.shape)}"
            )

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """Reduce ``x`` ``(B, N, C)`` over each cluster to ``(B, num_out, C)``.

        ``mode`` is one of ``"mean"``, ``"sum"``, ``"amax"``. The output keeps ``x.dtype``
        (half-precision inputs are accumulated in float32).
        """
        if mode not in MERGE_MODES:
            raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
        self._check(x)
        if self.is_identity:
            return x
        b, _, c = x.shape
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        index = self.labels.unsqueeze(-1).expand(-1, -1, c)
        out = work.new_zeros(b, self.num_out, c)
        if mode == "sum":
            out = out.scatter_add(1, index, work)
        else:
            out = out.scatter_reduce(1, index, work, reduce=mode, include_self=False)
        return out.to(x.dtype)

    def merge_wavg(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Size-weighted average of each cluster (ToMe's ``merge_wavg``).

        Args:
            x: ``(B, N, C)`` token features.
            size: ``(B, N, 1)`` number of original tokens behind each token (ones if ``None``).

        Returns:
            ``(x, size)``: ``(B, num_out, C)`` weighted means and ``(B, num_out, 1)`` summed sizes.
        """
        self._check(x)
        if size is None:
            size = torch.ones(*x.shape[:2], 1, device=x.device, dtype=x.dtype)
        if self.is_identity:
            return x, size
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        wsize = size.to(work.dtype)
        total = self.merge(wsize, mode="sum")
        out = self.merge(work * wsize, mode="sum") / total
        return out.to(x.dtype), total.to(size.dtype)

    def unmerge(self, x: Tensor) -> Tensor:
        """Broadcast ``(B, num_out, C)`` to ``(B, N, C)``: every token gets its cluster's row."""
        if x.dim() != 3 or x.shape[0] != self.labels.shape[0] or x.shape[1] != self.num_out:
            raise ValueError(
                f"expected a (B, num_out, C) tensor with B={self.labels.shape[0]}, "
                f"num_out={self.num_out}, got shape {tuple(x.shape)}"
            )
        if self.is_identity:
            return x
        return x.gather(1, self.labels.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def merge_source(self, source: Tensor | None = None) -> Tensor:
        """Track which original tokens each output token covers.

        Args:
            source: ``(B, N, N0)`` 0/1 map from current to original tokens (identity if ``None``).

        Returns:
            ``(B, num_out, N0)`` 0/1 map; row sums are the cluster sizes in original tokens.
        """
        b, n = self.labels.shape
        if source is None:
            source = torch.eye(n, device=self.labels.device).expand(b, n, n)
        return self.merge(source, mode="amax")

    def sizes(self) -> Tensor:
        """``(B, num_out)`` number of input tokens in each output slot."""
        ones = torch.ones(self.labels.shape, device=self.labels.device)
        out = ones.new_zeros(self.labels.shape[0], self.num_out)
        return out.scatter_add(1, self.labels, ones)

    def __repr__(self) -> str:
        b, n = self.labels.shape
        return f"MergePlan(batch={b}, num_in={n}, num_out={self.num_out})"
