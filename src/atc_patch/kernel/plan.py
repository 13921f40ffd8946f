"""The merge plan: who merges with whom, applied to every tensor that must follow it."""

from __future__ import annotations

import operator

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

    def __init__(self, labels: Tensor, num_out: int, *, validate: bool | None = None) -> None:
        """Args:
            labels: ``(B, N)`` integer tensor (any integer dtype; kept as int64), the output slot
                of every token, in ``[0, num_out)`` with every slot used.
            num_out: the number of output slots, ``0 <= num_out <= N`` (``0`` only if ``N == 0``).
            validate: check the label *values* (range and every slot used). ``None`` (default):
                for CPU labels only, so no host synchronisation is added on a GPU, and not
                while ``torch.compile`` traces; ``True``: on any device (one synchronisation);
                ``False``: never (labels known to be valid).
                Shape, dtype and ``num_out`` are always checked (no synchronisation).

        Raises:
            ValueError: labels that are not a ``(B, N)`` integer tensor, a bad ``num_out``, or
                (when validated) labels outside ``[0, num_out)`` or an unused slot.
        """
        if not isinstance(labels, Tensor) or labels.dim() != 2:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a (B, N) integer tensor, got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a (B, N) integer tensor, got dtype {labels.dtype}")
        try:
            if isinstance(num_out, bool):
                raise TypeError
            num_out = operator.index(num_out)
        except TypeError:
            raise ValueError(f"num_out must be an int, got {num_out!r}") from None
        n = labels.shape[1]
        if not 0 <= num_out <= n or (num_out == 0 and n > 0):
            raise ValueError(f"num_out must be in [1, N] (N = {n} tokens), got {num_out}")
        self.labels = labels if labels.dtype == torch.long else labels.long()
        self.num_out = int(num_out)
        self._identity = False  # set only by MergePlan.identity()
        # Not while torch.compile traces (None): the check is data-dependent control flow.
        default = labels.device.type == "cpu" and not torch.compiler.is_compiling()
        if validate or (validate is None and default):
            self._check_labels()

    def _check_labels(self) -> None:
        """Raise ``ValueError`` unless every label is in ``[0, num_out)`` and every slot used."""
        labels, k = self.labels, self.num_out
        if labels.numel() == 0:
            return
        lo, hi = torch.aminmax(labels)
        if lo < 0 or hi >= k:
            raise ValueError(
                f"labels must be in [0, num_out) = [0, {k}), got values in [{int(lo)}, {int(hi)}]"
            )
        used = torch.zeros(labels.shape[0], k, device=labels.device, dtype=torch.bool)
        if not bool(used.scatter_(1, labels, True).all()):
            raise ValueError(f"every one of the num_out = {k} slots must hold at least one token")

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
        plan = cls(labels, num_tokens, validate=False)
        plan._identity = True
        return plan

    def _check(self, x: Tensor, name: str = "x", layout: str = "(B, N, C)") -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[:2] != self.labels.shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must be a {layout} tensor with (B, N) = {tuple(self.labels.shape)}, "
                f"got {shape}"
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
            size: ``(B, N, 1)`` number of original tokens behind each token, positive (ones if
                ``None``); any real dtype.

        Returns:
            ``(x, size)``: ``(B, num_out, C)`` weighted means in ``x.dtype`` and
            ``(B, num_out, 1)`` summed sizes in float32, or float64 when ``x`` or ``size`` is
            float64 (never in half precision: bf16 cannot count past 256 exactly, and the sizes
            feed the ``log(size)`` bias of proportional attention).

        Raises:
            ValueError: ``x`` not ``(B, N, C)`` for this plan; ``size`` not a ``(B, N, 1)``
                real tensor; on the CPU, a size that is not positive (checked only there, so
                that no host synchronisation is added on a GPU; zero sizes would give NaN).
        """
        self._check(x)
        wide = x.dtype == torch.float64 or (
            isinstance(size, Tensor) and size.dtype == torch.float64
        )
        size_dtype = torch.float64 if wide else torch.float32
        size = self._check_size(x, size, size_dtype)
        if self.is_identity:
            return x, size
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        total = self.merge(size, mode="sum")
        out = self.merge(work * size.to(work.dtype), mode="sum") / total.to(work.dtype)
        return out.to(x.dtype), total

    def _check_size(self, x: Tensor, size: Tensor | None, dtype: torch.dtype) -> Tensor:
        """``size`` as a ``dtype`` ``(B, N, 1)`` tensor (ones if ``None``), validated."""
        b, n = self.labels.shape
        if size is None:
            return torch.ones(b, n, 1, device=x.device, dtype=dtype)
        if not isinstance(size, Tensor) or size.shape != (b, n, 1):
            shape = tuple(size.shape) if isinstance(size, Tensor) else type(size).__name__
            raise ValueError(
                f"size must be a (B, N, 1) tensor with (B, N) = {(b, n)} (tokens behind each "
                f"token), got {shape}"
            )
        if size.dtype == torch.bool or size.is_complex():
            raise ValueError(f"size must be a real (B, N, 1) tensor, got dtype {size.dtype}")
        checked = size.device.type == "cpu" and not torch.compiler.is_compiling()  # as labels
        if checked and size.numel() and not bool((size > 0).all()):
            raise ValueError("size must be positive (tokens behind each token); got a value <= 0")
        return size.to(dtype)

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
        self._check(source, "source", "(B, N, N0)")
        return self.merge(source, mode="amax")

    def sizes(self) -> Tensor:
        """``(B, num_out)`` number of input tokens in each output slot."""
        ones = torch.ones(self.labels.shape, device=self.labels.device)
        out = ones.new_zeros(self.labels.shape[0], self.num_out)
        return out.scatter_add(1, self.labels, ones)

    def __repr__(self) -> str:
        b, n = self.labels.shape
        return f"MergePlan(batch={b}, num_in={n}, num_out={self.num_out})"
