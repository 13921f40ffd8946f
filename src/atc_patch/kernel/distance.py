"""Cosine distances between tokens, with a defined behaviour for bad entries."""

from __future__ import annotations

import torch
from torch import Tensor


def working_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype (fp16, bf16, fp32) is clustered in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize_tokens(metric: Tensor) -> Tensor:
    """Unit-normalise ``(B, N, C)`` token vectors in the working dtype.

    Non-finite entries (NaN, +-inf) are replaced by 0 before normalising, and a vector whose
    norm is 0 stays the zero vector, so its cosine similarity to every token is 0 (cosine
    distance 1). The result is always finite.
    """
    x = torch.nan_to_num(metric.to(working_dtype(metric)), nan=0.0, posinf=0.0, neginf=0.0)
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), x)


def cosine_distance(metric: Tensor) -> Tensor:
    """``(B, N, C)`` -> ``(B, N, N)`` cosine distance ``1 - cos``, clamped to ``[0, 2]``."""
    x = normalize_tokens(metric)
    return (1.0 - x @ x.transpose(-1, -2)).clamp_(0.0, 2.0)


def negative_cosine(metric: Tensor) -> Tensor:
    """``(B, N, C)`` -> ``(B, N, N)`` ``-cos``: cosine distance minus 1, in a single matmul.

    Hierarchical clustering with single, complete or average linkage gives the same
    dendrogram (heights shifted by 1) for any increasing affine map of the distances, so ATC
    clusters on this and saves a pass over the ``N x N`` matrix.
    """
    x = normalize_tokens(metric)
    return x @ (-x).transpose(-1, -2)


def negative_cosine_padded(metric: Tensor) -> Tensor:
    """``(B, N, C)`` -> ``(B, N+1, N+1)``: :func:`negative_cosine` plus an ``inf`` last row/column.

    The padded layout is what :func:`~atc_patch.kernel.atc.agglomerative_labels_padded` works
    in; building it here writes the matrix once.
    """
    x = normalize_tokens(metric)
    x = torch.nn.functional.pad(x, (0, 0, 0, 1))
    d = x @ (-x).transpose(-1, -2)
    d[:, -1, :] = float("inf")
    d[:, :, -1] = float("inf")
    return d
