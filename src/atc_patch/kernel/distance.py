"""Cosine distances between tokens, with a defined behaviour for bad entries."""

from __future__ import annotations

import torch
from torch import Tensor

from .atc import Workspace, padded_width
from .scratch import scratch
from .threads import with_kernel_threads


def working_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype (fp16, bf16, fp32) is clustered in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize_tokens(metric: Tensor, out: Tensor | None = None) -> Tensor:
    """Unit-normalise ``(B, N, C)`` token vectors in the working dtype (into ``out`` if given).

    Non-finite entries (NaN, +-inf) are replaced by 0 before normalising, and a vector whose
    norm is 0 stays the zero vector, so its cosine similarity to every token is 0 (cosine
    distance 1). The result is always finite. (The sanitising pass runs only when some norm is
    not finite, which a non-finite entry always causes.)

    Raises:
        ValueError: ``metric`` is a ``meta`` tensor: clustering needs its values.
    """
    if metric.is_meta:
        raise ValueError(
            "cluster_tokens needs the metric's values, got a 'meta' tensor: the partition depends "
            "on the data. Pass a CPU or CUDA tensor (under torch.compile / export the kernel's "
            "registered op, where available, gives the output shapes without values)."
        )
    x = metric.to(working_dtype(metric))
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    # (Under torch.compile the sanitising pass always runs: no host check inside a graph.)
    if torch.compiler.is_compiling() or not bool(torch.isfinite(norm).all()):
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.div(x, norm.clamp_min_(torch.finfo(x.dtype).tiny), out=out)


@with_kernel_threads
def cosine_distance(metric: Tensor) -> Tensor:
    """``(B, N, C)`` -> ``(B, N, N)`` cosine distance ``1 - cos``, clamped to ``[0, 2]``."""
    x = normalize_tokens(metric)
    return (1.0 - x @ x.transpose(-1, -2)).clamp_(0.0, 2.0)


@with_kernel_threads
def negative_cosine_workspace(metric: Tensor) -> Workspace:
    """``(B, N, C)`` -> the :class:`~atc_patch.kernel.atc.Workspace` of ATC, built by one matmul.

    The unit vectors go into a zero-padded ``(B, W, C)`` buffer and one ``baddbmm`` (``alpha =
    -1``) writes ``-cos`` straight into the ``(B, N+1, W)`` working layout; the scratch row and
    padding columns (zero products) are then set to ``inf``.
    """
    b, n, c = metric.shape
    width = padded_width(n)
    dtype = working_dtype(metric)
    units = scratch("atc.units", (b, width, c), dtype, metric.device)
    units[:, n:].zero_()
    normalize_tokens(metric, out=units[:, :n])
    ws = Workspace.empty(b, n, dtype, metric.device)
    ws.d.baddbmm_(units[:, : n + 1], units.transpose(1, 2), beta=0, alpha=-1)
    return ws.finish()
