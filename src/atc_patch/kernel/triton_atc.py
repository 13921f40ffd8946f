"""The fused ATC path: one Triton program per sample runs the whole agglomeration.

Layout of one call (:func:`triton_atc_labels`), whatever ``N``:

1. torch: unit-normalise the free tokens (non-finite entries count as 0, no host check), one
   ``baddbmm`` for ``-cos`` and one ``minimum(d, d^T)`` (an exactly symmetric ``(B, M, M)``
   matrix in a fresh buffer); about eight launches.
2. Triton, grid ``(B,)``: each program keeps, in registers, every cluster's nearest neighbour
   and its distance (``nn``, ``dmin``), alive flags, sizes and each token's cluster. A merge

   * picks the row with the smallest ``dmin`` (``i``) and its neighbour ``j``; the smaller of
     the two absorbs the other, so a cluster lives at its smallest token;
   * writes the Lance-Williams row of ``i ∪ j`` (``min`` / ``max`` / size-weighted mean) as row
     and column ``i`` of the matrix (exactly symmetric), drops ``j``;
   * rescans only the rows whose nearest neighbour was ``i`` or ``j``: for reducible linkages
     a row whose nearest neighbour survived keeps it (its distance to ``i ∪ j`` is at least
     ``min(d(k, i), d(k, j))``, which is at least its ``dmin``).

   This is the sequential "merge the closest pair" algorithm itself, so the ``r`` merges it
   runs are the first ``r`` merges of scipy's dendrogram (for distances without ties) and the
   clusters left are ``cut_tree(n_clusters=M - r)``'s partition; no heights, no cut search.
   Labels are numbered in the order of each cluster's smallest token and written with the
   ``protected`` fixed slots in front.

No host synchronisation and a fixed number of launches per call; ``r`` and ``M`` are kernel
arguments. A merge is ``O(M)`` work (plus ``O(M)`` per rescanned row), so a call is
``O(M^2 + r M)`` per sample, spread over ``B`` programs.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernel runs on CPU
tensors; that is how CI checks it against scipy.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from .distance import working_dtype

LINKAGE_CODES = {"single": 0, "complete": 1, "average": 2}


class TritonUnavailableError(RuntimeError):
    """The fused Triton path cannot run here (no triton; a CPU tensor without the interpreter)."""


@functools.cache
def _kernel() -> Any:
    """Import triton and define the kernel (lazily: ``TRITON_INTERPRET`` is read at definition)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as err:  # pragma: no cover - triton ships with CUDA builds of torch
        raise TritonUnavailableError(
            "backend='triton' needs the triton package (pip install triton)"
        ) from err

    @triton.jit(do_not_specialize=["M", "P", "R"])  # one compile per linkage and block
    def atc_kernel(
        d_ptr,  # (B, M, M) working matrix, overwritten
        dmin_ptr,  # (B, M) scratch
        out_ptr,  # (B, N) int64 labels, N = P + M
        M,
        P,
        R,
        LINK: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        base = d_ptr + b * M * M
        out = out_ptr + b * (M + P)
        idx = tl.arange(0, BLOCK)
        valid = idx < M
        inf = float("inf")

        # Protected tokens keep slots 0 .. P-1.
        for p0 in range(0, P, BLOCK):
            tl.store(out + p0 + idx, (p0 + idx).to(tl.int64), mask=p0 + idx < P)

        # Initial scan, ROWS rows at a time: minima to ``dmin_ptr``, their columns to the
        # label buffer (free until the end), then into registers.
        rows = tl.arange(0, ROWS)
        for r0 in range(0, M, ROWS):
            k = r0 + rows
            tile = tl.load(
                base + k[:, None] * M + idx[None, :],
                mask=(k[:, None] < M) & valid[None, :] & (k[:, None] != idx[None, :]),
                other=inf,
            )
            tl.store(dmin_ptr + b * M + k, tl.min(tile, axis=1), mask=k < M)
            a = tl.argmin(tile, axis=1, tie_break_left=True)
            tl.store(out + P + k, a.to(tl.int64), mask=k < M)
        tl.debug_barrier()
        dmin = tl.load(dmin_ptr + b * M + idx, mask=valid, other=inf)
        nn = tl.load(out + P + idx, mask=valid, other=0).to(tl.int32)
        dmin = tl.where(valid, dmin, inf)

        alive = valid
        size = tl.where(valid, 1.0, 0.0).to(d_ptr.dtype.element_ty)
        lab = idx
        for _ in range(0, R):
            i0 = tl.argmin(dmin, axis=0, tie_break_left=True).to(tl.int32)
            j0 = tl.sum(tl.where(idx == i0, nn, 0), axis=0)
            i = tl.minimum(i0, j0)
            j = tl.maximum(i0, j0)
            row_i = tl.load(base + i * M + idx, mask=valid, other=inf)
            row_j = tl.load(base + j * M + idx, mask=valid, other=inf)
            if LINK == 0:
                new = tl.minimum(row_i, row_j)
            elif LINK == 1:
                new = tl.maximum(row_i, row_j)
            else:
                s_i = tl.sum(tl.where(idx == i, size, 0.0), axis=0)
                s_j = tl.sum(tl.where(idx == j, size, 0.0), axis=0)
                total = s_i + s_j
                new = (s_i / total) * row_i + (s_j / total) * row_j
                size = tl.where(idx == i, total, size)
            alive = alive & (idx != j)
            new = tl.where(alive & (idx != i), new, inf)
            tl.store(base + i * M + idx, new, mask=valid)
            tl.store(base + idx * M + i, new, mask=valid)
            lab = tl.where(lab == j, i, lab)
            v_i = tl.min(new, axis=0)
            a_i = tl.argmin(new, axis=0, tie_break_left=True).to(tl.int32)
            need = alive & ((nn == i) | (nn == j)) & (idx != i)
            dmin = tl.where(idx == j, inf, tl.where(idx == i, v_i, dmin))
            nn = tl.where(idx == i, a_i, nn)
            tl.debug_barrier()  # the stores above are visible to every thread's rescan loads
            count = tl.sum(need.to(tl.int32), axis=0)
            while count > 0:
                k = tl.min(tl.where(need, idx, BLOCK), axis=0)
                row = tl.load(base + k * M + idx, mask=alive & (idx != k), other=inf)
                v_k = tl.min(row, axis=0)
                a_k = tl.argmin(row, axis=0, tie_break_left=True).to(tl.int32)
                dmin = tl.where(idx == k, v_k, dmin)
                nn = tl.where(idx == k, a_k, nn)
                need = need & (idx != k)
                count -= 1

        # Slots in the order of each cluster's smallest token (its representative).
        root = (lab == idx) & valid
        slot = tl.cumsum(root.to(tl.int64), axis=0) - 1
        tl.store(out + P + idx, slot, mask=valid)
        tl.debug_barrier()
        final = tl.load(out + P + lab, mask=valid, other=0)
        tl.debug_barrier()
        tl.store(out + P + idx, final + P, mask=valid)

    interpreted = type(atc_kernel).__name__ == "InterpretedFunction"
    return atc_kernel, triton.next_power_of_2, interpreted


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the fused path can run on ``device``; the reason when it cannot."""
    try:
        _, _, interpreted = _kernel()
    except TritonUnavailableError as err:
        return False, str(err)
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return True, ""
    if device.type == "cpu":
        return False, (
            "backend='triton' runs on CUDA tensors, or on the CPU under Triton's interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported); use backend='torch' or 'auto'"
        )
    return False, f"backend='triton' does not run on {device.type} tensors; use 'torch' or 'auto'"


def symmetric_neg_cosine(free: Tensor) -> Tensor:
    """``(B, M, C)`` -> ``(B, M, M)`` ``-cos``, exactly symmetric, in the working dtype.

    Non-finite entries count as 0 and zero vectors stay zero (cosine distance 1 to every
    token), as :func:`~atc_patch.kernel.distance.normalize_tokens`, but with no host check.
    """
    x = torch.nan_to_num(free.to(working_dtype(free)), nan=0.0, posinf=0.0, neginf=0.0)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    units = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
    d = torch.bmm(units, units.transpose(1, 2)).neg_()
    return torch.minimum(d, d.transpose(1, 2))


def triton_atc_labels(metric: Tensor, r: int, linkage: str, protected: int) -> Tensor:
    """ATC labels ``(B, N)`` int64 of ``metric`` ``(B, N, C)``, fused (see the module doc).

    ``0 <= r <= N - protected - 1`` (``r = 0`` gives the identity); the first ``protected``
    tokens keep slots ``0 .. protected-1``, the others get slots numbered in the order of
    their cluster's smallest token. Raises :class:`TritonUnavailableError` where it cannot run.
    """
    ok, why = triton_available(metric.device)
    if not ok:
        raise TritonUnavailableError(why)
    kernel, next_pow2, _ = _kernel()
    b, n, _ = metric.shape
    m = n - protected
    out = torch.empty(b, n, device=metric.device, dtype=torch.long)
    if b == 0:
        return out
    if m < 2 or r <= 0:
        return torch.arange(n, device=metric.device).expand(b, n).clone()
    with torch.no_grad():
        d = symmetric_neg_cosine(metric[:, protected:])
        block = max(16, next_pow2(m))
        rows = max(1, min(16, 4096 // block))
        kernel[(b,)](
            d,
            torch.empty(b, m, device=d.device, dtype=d.dtype),
            out,
            m,
            protected,
            min(int(r), m - 1),
            LINK=LINKAGE_CODES[linkage],
            BLOCK=block,
            ROWS=rows,
            num_warps=4 if block <= 1024 else 8,
        )
    return out


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set in this process's environment."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
