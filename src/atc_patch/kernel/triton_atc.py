"""The fused ATC path: one Triton program per row runs the whole agglomeration.

A row is a sample's free tokens or one tile of them (:mod:`~atc_patch.kernel.tiles`). A call
(:func:`triton_atc_labels`) is about seven torch launches (unit-normalise, one ``bmm`` for
``-cos``, an exactly symmetric ``(R, L, L)`` matrix) and one Triton launch with grid ``(R,)``:
each program runs the sequential "merge the closest pair" algorithm on its row (nearest
neighbours kept in registers, Lance-Williams updates, rescans of the rows whose neighbour
merged), so its ``r`` merges are the first ``r`` of scipy's dendrogram. Labels are numbered in
the order of each cluster's smallest token (``-1`` for entries that are not real tokens). No
host synchronisation, a fixed number of launches, ``O(L^2 + r L)`` work per row. Under
``TRITON_INTERPRET=1`` (set before triton is imported) it runs on CPU tensors, which is how CI
checks it against scipy. Details: docs/kernel.md ("The fused GPU path (Triton)")::

    labels = triton_atc_labels(x, valid, r, "average")   # x (R, L, C) -> (R, L)
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from .distance import normalize_tokens

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

    @triton.jit(do_not_specialize=["M"])  # one compile per linkage, block and mask flag
    def atc_kernel(
        d_ptr,  # (R, M, M) working matrix, overwritten
        dmin_ptr,  # (R, M) scratch
        out_ptr,  # (R, M) int64 labels
        r_ptr,  # (R,) int64 merges per row
        valid_ptr,  # (R, M) bool real entries (read if HAS_VALID)
        M,
        LINK: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        HAS_VALID: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        base = d_ptr + b * M * M
        out = out_ptr + b * M
        idx = tl.arange(0, BLOCK)
        valid = idx < M
        if HAS_VALID:
            valid = valid & (tl.load(valid_ptr + b * M + idx, mask=idx < M, other=0) != 0)
        inf = float("inf")

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
            tl.store(out + k, a.to(tl.int64), mask=k < M)
        tl.debug_barrier()
        dmin = tl.load(dmin_ptr + b * M + idx, mask=idx < M, other=inf)
        nn = tl.load(out + idx, mask=idx < M, other=0).to(tl.int32)
        dmin = tl.where(valid, dmin, inf)

        alive = valid
        size = tl.where(valid, 1.0, 0.0).to(d_ptr.dtype.element_ty)
        lab = idx
        merges = tl.load(r_ptr + b).to(tl.int32)
        for _ in range(0, merges):
            i0 = tl.argmin(dmin, axis=0, tie_break_left=True).to(tl.int32)
            j0 = tl.sum(tl.where(idx == i0, nn, 0), axis=0)
            i = tl.minimum(i0, j0)
            j = tl.maximum(i0, j0)
            row_i = tl.load(base + i * M + idx, mask=idx < M, other=inf)
            row_j = tl.load(base + j * M + idx, mask=idx < M, other=inf)
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
            tl.store(base + i * M + idx, new, mask=idx < M)
            tl.store(base + idx * M + i, new, mask=idx < M)
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
        tl.store(out + idx, slot, mask=idx < M)
        tl.debug_barrier()
        final = tl.load(out + lab, mask=idx < M, other=0)
        tl.debug_barrier()
        tl.store(out + idx, tl.where(valid, final, -1), mask=idx < M)

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


def symmetric_neg_cosine(x: Tensor) -> Tensor:
    """``(R, L, C)`` -> ``(R, L, L)`` ``-cos``, exactly symmetric, in the working dtype.

    Non-finite entries count as 0 and zero vectors stay zero (cosine distance 1 to every
    token), as :func:`~atc_patch.kernel.distance.normalize_tokens`, with no host check.
    """
    units = normalize_tokens(x)
    d = torch.baddbmm(units.new_empty(()), units, units.mT, beta=0, alpha=-1)  # (beta=0: unread)
    return torch.minimum(d, d.mT)


def triton_atc_labels(x: Tensor, valid: Tensor | None, r: Tensor, linkage: str) -> Tensor:
    """ATC labels ``(R, L)`` int64 of the rows ``x`` ``(R, L, C)``, fused (see the module doc).

    ``valid`` ``(R, L)`` bool marks the real tokens of each row (``None``: all); ``r`` ``(R,)``
    int64 merges per row, ``0 <= r <= real tokens - 1``. Real tokens get slots numbered in
    the order of their cluster's smallest token, the other entries ``-1``. Raises
    :class:`TritonUnavailableError` where it cannot run.
    """
    ok, why = triton_available(x.device)
    if not ok:
        raise TritonUnavailableError(why)
    kernel, next_pow2, _ = _kernel()
    rows, length, _ = x.shape
    if rows == 0 or length < 2:
        labels = torch.arange(length, device=x.device).expand(rows, length).clone()
        return labels if valid is None else labels.masked_fill_(~valid, -1)
    out = torch.empty(rows, length, device=x.device, dtype=torch.long)
    with torch.no_grad():
        d = symmetric_neg_cosine(x)
        block = max(16, next_pow2(length))
        kernel[(rows,)](
            d,
            torch.empty(rows, length, device=d.device, dtype=d.dtype),
            out,
            r,
            out if valid is None else valid,
            length,
            LINK=LINKAGE_CODES[linkage],
            BLOCK=block,
            ROWS=max(1, min(16, 4096 // block)),
            HAS_VALID=valid is not None,
            num_warps=4 if block <= 1024 else 8,
        )
    return out


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set in this process's environment."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
