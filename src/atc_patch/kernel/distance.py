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
    distance 1). The result is always finite. The sanitising pass always runs (an identity on
    finite values): deciding whether it is needed would read a flag on the host.
    """
    x = torch.nan_to_num(metric.to(working_dtype(metric)), nan=0.0, posinf=0.0, neginf=0.0)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.div(x, norm.clamp_min_(torch.finfo(x.dtype).tiny), out=out)


@with_kernel_threads
def cosine_distance(metric: Tensor) -> Tensor:
    """``(B, N, C)`` -> ``(B, N, N)`` cosine distance ``1 - cos``, clamped to ``[0, 2]``.

    Exactly symmetric (``min(d, d^T)``) with an exactly zero diagonal, so that equal
    quantities (``d(a, b) + d(b, b)`` and ``d(a, a) + d(b, a)``, say) compare as equal and
    ties are broken by the methods' rules, not by rounding.
    """
    x = normalize_tokens(metric)
    d = (1.0 - x @ x.transpose(-1, -2)).clamp_(0.0, 2.0)
    d = torch.minimum(d, d.transpose(-1, -2))
    d.diagonal(dim1=-2, dim2=-1).zero_()
    return d


@with_kernel_threads
def negative_cosine_workspace(metric: Tensor, valid: Tensor | None = None) -> Workspace:
    """``(B, N, C)`` -> the :class:`~atc_patch.kernel.atc.Workspace` of ATC, exactly symmetric.

    The unit vectors go into a zero-padded ``(B, W, C)`` buffer and ``baddbmm`` (``alpha =
    -1``) writes ``-cos`` straight into the ``(B, N+1, W)`` working layout: the upper triangle
    only, panel by panel (64 rows on the CPU; one panel elsewhere), each panel's lower part
    then copied from its mirror image (a matmul's two halves may differ in the last bit); the
    scratch row and padding columns are set to ``inf``. ``valid`` ``(B, N)`` (optional):
    tokens that are not real get ``inf`` rows and columns, so they never merge.
    """
    b, n, c = metric.shape
    width = padded_width(n)
    dtype = working_dtype(metric)
    units = scratch("atc.units", (b, width, c), dtype, metric.device)
    units[:, n:].zero_()
    normalize_tokens(metric, out=units[:, :n])
    ws = Workspace.empty(b, n, dtype, metric.device)
    panel = 64 if metric.device.type == "cpu" else max(n, 1)
    for a in range(0, n, panel):
        e = min(a + panel, n)
        ws.d[:, a:e, a:n].baddbmm_(units[:, a:e], units[:, a:n].mT, beta=0, alpha=-1)
        block = ws.d[:, a:e, a:e]
        upper = torch.ones(e - a, e - a, dtype=torch.bool, device=metric.device).triu_()
        block.copy_(torch.where(upper, block, block.mT))
        if e < n:
            ws.d[:, e:n, a:e].copy_(ws.d[:, a:e, e:n].mT)
    if valid is not None:
        pair = valid[:, :, None] & valid[:, None, :]
        ws.d[:, :n, :n].masked_fill_(~pair, float("inf"))
    return ws.finish()
