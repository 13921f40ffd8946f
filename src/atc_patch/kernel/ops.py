"""ATC clustering as a PyTorch custom op (``torch.ops.atc_patch.atc_labels``).

The op's output shape ``(B, N)`` int64 depends only on the input's shape, so its fake (meta)
implementation lets ``torch.compile`` trace a patched model with ``fullgraph=True``: the
clustering's data-dependent control flow stays inside the op, and the graph around it is
fixed. :func:`~atc_patch.kernel.cluster_tokens` calls the op while compiling and the
implementation directly in eager mode (no dispatcher overhead there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .atc import agglomerative_labels_ws
from .distance import negative_cosine_workspace

BACKENDS = ("auto", "torch", "triton")

#: ``backend="auto"`` uses the fused Triton path on CUDA for at most this many free tokens.
AUTO_TRITON_MAX_TOKENS = 1024


def resolve_backend(backend: str, device: torch.device, free_tokens: int) -> str:
    """``"torch"`` or ``"triton"`` for a call on ``device`` with ``free_tokens`` unprotected
    tokens. ``"auto"``: Triton on CUDA up to :data:`AUTO_TRITON_MAX_TOKENS`, torch otherwise."""
    if backend == "auto":
        use = device.type == "cuda" and free_tokens <= AUTO_TRITON_MAX_TOKENS
        return "triton" if use else "torch"
    return backend


def atc_labels_impl(metric: Tensor, r: int, linkage: str, protected: int, backend: str) -> Tensor:
    """ATC labels ``(B, N)`` int64 of ``metric`` ``(B, N, C)`` (``r`` already clamped, >= 1).

    ``backend`` is ``"torch"`` or ``"triton"`` (resolved); the protected tokens keep slots
    ``0 .. protected-1``.
    """
    with torch.no_grad():
        if backend == "triton":
            from .triton_atc import triton_atc_labels

            return triton_atc_labels(metric, r, linkage, protected)
        b, n, _ = metric.shape
        labels = agglomerative_labels_ws(
            negative_cosine_workspace(metric[:, protected:]), r, linkage
        )
        if protected:
            fixed = torch.arange(protected, device=labels.device).expand(b, protected)
            labels = torch.cat([fixed, labels + protected], dim=1)
        return labels


@torch.library.custom_op("atc_patch::atc_labels", mutates_args=())
def atc_labels(metric: Tensor, r: int, linkage: str, protected: int, backend: str) -> Tensor:
    """Custom-op form of :func:`atc_labels_impl` (``metric`` is not differentiated)."""
    return atc_labels_impl(metric, r, linkage, protected, backend)


@atc_labels.register_fake
def _atc_labels_fake(metric: Tensor, r: int, linkage: str, protected: int, backend: str) -> Tensor:
    return metric.new_empty(metric.shape[:2], dtype=torch.long)
