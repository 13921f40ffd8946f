"""ATC clustering as a PyTorch custom op (``torch.ops.atc_patch.atc_labels``).

The op clusters rows (a sample's free tokens, or a tile of them; see
:mod:`~atc_patch.kernel.tiles`): ``x`` ``(R, L, C)``, optionally which entries are real tokens
(``valid`` ``(R, L)``) and ``r`` ``(R,)`` merges per row. Its output, local labels ``(R, L)``
int64, has a shape that depends only on the input's shape, so its fake (meta) implementation
lets ``torch.compile`` trace a patched model with ``fullgraph=True``: the clustering's
data-dependent control flow stays inside the op, and the graph around it is fixed.
:func:`~atc_patch.kernel.cluster_tokens` calls the op while compiling and the implementation
directly in eager mode (no dispatcher overhead there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .atc import agglomerative_labels_ws
from .distance import negative_cosine_workspace

BACKENDS = ("auto", "torch", "triton")

#: ``backend="auto"`` uses the fused Triton path on CUDA for rows of at most this many tokens.
AUTO_TRITON_MAX_TOKENS = 1024


def resolve_backend(backend: str, device: torch.device, row_tokens: int) -> str:
    """``"torch"`` or ``"triton"`` for rows of ``row_tokens`` free tokens (a tile's, or the
    sample's unprotected tokens) on ``device``. ``"auto"``: Triton on CUDA up to
    :data:`AUTO_TRITON_MAX_TOKENS`, torch otherwise."""
    if backend == "auto":
        use = device.type == "cuda" and row_tokens <= AUTO_TRITON_MAX_TOKENS
        return "triton" if use else "torch"
    return backend


def atc_labels_impl(
    x: Tensor, valid: Tensor | None, r: Tensor, linkage: str, backend: str
) -> Tensor:
    """ATC labels ``(R, L)`` int64 of the rows ``x`` ``(R, L, C)``.

    ``valid`` ``(R, L)`` bool (``None``: every entry is a token); ``r`` ``(R,)`` int64, at
    most each row's real tokens minus one; ``backend`` ``"torch"`` or ``"triton"``
    (resolved). Real tokens get slots in the order of their cluster's smallest token, other
    entries ``-1``.
    """
    with torch.no_grad():
        if backend == "triton":
            from .triton_atc import triton_atc_labels

            return triton_atc_labels(x, valid, r, linkage)
        return agglomerative_labels_ws(negative_cosine_workspace(x, valid), r, linkage, None, valid)


@torch.library.custom_op("atc_patch::atc_labels", mutates_args=())
def atc_labels(x: Tensor, valid: Tensor | None, r: Tensor, linkage: str, backend: str) -> Tensor:
    """Custom-op form of :func:`atc_labels_impl` (``x`` is not differentiated)."""
    return atc_labels_impl(x, valid, r, linkage, backend)


@atc_labels.register_fake
def _atc_labels_fake(
    x: Tensor, valid: Tensor | None, r: Tensor, linkage: str, backend: str
) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=torch.long)
