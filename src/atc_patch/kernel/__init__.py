"""The shared token-clustering kernel: ``cluster_tokens(metric, r, method=...) -> MergePlan``.

Every model patch calls this one function; it never imports timm, diffusers or mmdet.

Methods:
    ``"atc"``       agglomerative clustering (single / complete / average linkage), exact
    ``"tome"``      ToMe bipartite soft matching
    ``"tome_sd"``   ToMe-SD random bipartite matching over an ``h x w`` (or ``t x h x w``) grid
    ``"kmedoids"``  K-Medoids on cosine distance
    ``"dpcknn"``    DPC-KNN clustering (TCFormer)

Example::

    plan = cluster_tokens(keys, r=2048, grid=(64, 64), tile=(16, 16))  # ATC in 16 x 16 tiles
    x = plan.merge(x)  # (B, 4096, C) -> (B, 2048, C)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .atc import LINKAGES
from .bipartite import (
    bipartite_plan,
    bipartite_random_grid_plan,
    bipartite_rows,
    random_grid_cap,
)
from .centers import dpcknn_labels, kmedoids_labels
from .checks import METHODS, Call, check_call
from .distance import cosine_distance
from .ops import BACKENDS, atc_labels, atc_labels_impl, resolve_backend
from .plan import MergePlan
from .scratch import call_scope, release_workspace
from .tiles import Rows, build_rows, row_cap, tile_sizes

__all__ = [
    "BACKENDS",
    "LINKAGES",
    "METHODS",
    "MergePlan",
    "cluster_tokens",
    "max_reduction",
    "release_workspace",
]


def max_reduction(
    method: str,
    num_tokens: int,
    protected: int = 0,
    *,
    grid: tuple[int, ...] | None = None,
    tile: tuple[int, ...] | None = None,
    masked: bool = False,
) -> int:
    """The largest ``r`` ``method`` can remove from ``num_tokens`` tokens in one step.

    With ``tile`` (and ``grid``), the sum of every tile's cap; with ``masked=True`` (a
    ``mask`` will be passed), what can be removed whatever the mask says (one slot per tile
    is kept for the padding tokens). See :mod:`~atc_patch.kernel.tiles`.
    """
    m = num_tokens - protected
    if tile is None and not masked:
        if method == "tome":
            # A = unprotected tokens at even absolute positions (ToMe's a = x[..., ::2, :]).
            first_a = protected + protected % 2
            return max(min((num_tokens - first_a + 1) // 2, m // 2), 0)
        return max(m - 1, 0)
    sizes = tile_sizes(tuple(grid), tuple(tile)) if tile is not None else (m,)
    return sum(row_cap(method, size, masked) for size in sizes)


def cluster_tokens(
    metric: Tensor,
    r: int,
    method: str = "atc",
    linkage: str | None = None,
    protected: int = 0,
    *,
    mask: Tensor | None = None,
    grid: tuple[int, ...] | None = None,
    tile: tuple[int, ...] | None = None,
    h: int | None = None,
    w: int | None = None,
    sx: int | None = None,
    sy: int | None = None,
    st: int | None = None,
    no_rand: bool = False,
    generator: torch.Generator | None = None,
    pick: Tensor | None = None,
    k: int | None = None,
    iters: int | None = None,
    backend: str = "auto",
) -> MergePlan:
    """Plan the removal of ``r`` tokens from ``metric`` by merging similar tokens.

    Args:
        metric: ``(B, N, C)`` features compared by cosine distance (e.g. attention keys).
        r: tokens to remove; clamped to what ``method`` can remove (see :func:`max_reduction`).
            Any integral number (an int, a numpy integer, ``6.0``, or a 0-d integer tensor,
            whose value is read on the host: a synchronisation on a GPU).
        method: one of :data:`METHODS`.
        linkage: ``"atc"`` only, one of :data:`LINKAGES` (default ``"average"``).
        protected: the first ``protected`` tokens (class/distillation/register tokens) never
            merge and keep output slots ``0 .. protected-1`` in order.
        mask: ``(B, N)`` bool (or integer, nonzero = real), ``True`` for real tokens, ``False``
            for padding: a padding token never merges with a real one; real tokens receive
            the merges first, padding tokens only the rest, among themselves; the real
            tokens' partition does not depend on the padding tokens' values. Not with
            ``"tome_sd"``. Ignored for protected tokens. See :mod:`~atc_patch.kernel.tiles`.
        grid: the ``N - protected`` tokens after the protected ones as a ``(h, w)`` or
            ``(t, h, w)`` grid in raster order (needed by ``tile`` and by ``"tome_sd"``).
        tile: ``(th, tw)`` / ``(tt, th, tw)`` in grid units: cluster inside each tile (ragged
            edge tiles allowed), with ``r`` split over tiles by a rule that depends on shapes
            only. ``None``: the whole grid. Not with ``"tome_sd"`` (local already).
        h: ``"tome_sd"`` only: ``grid=(h, w)`` in two arguments.
        w: ``"tome_sd"`` only: see ``h``.
        sx: ``"tome_sd"`` only: the width of the window holding one destination (default 2).
        sy: ``"tome_sd"`` only: the window's height (default 2).
        st: ``"tome_sd"`` with a 3-D grid only: the window's frames (default 1).
        no_rand: ``"tome_sd"`` only: the window's first token as destination, not a random one.
        generator: ``"tome_sd"`` only: the ``torch.Generator`` drawing the destinations.
        pick: ``"tome_sd"`` only, instead of drawing: the destination of each window, an
            integer tensor with one entry per whole window (``(t // st, h // sy, w // sx)``
            values in ``[0, st * sy * sx)``, row-major position in the window), e.g. derived on
            the device from a seed (no host synchronisation).
        k: ``"dpcknn"`` only: neighbours used for the density (default 5).
        iters: ``"kmedoids"`` only: assignment/update iterations (default 10).
        backend: ``"atc"`` only: ``"auto"`` (the fused Triton kernel on CUDA when the rows it
            clusters, tiles included, have at most 1024 free tokens; the torch rounds
            otherwise), ``"torch"`` or ``"triton"`` (forced; on the CPU only under
            ``TRITON_INTERPRET=1``, else a
            :class:`~atc_patch.kernel.triton_atc.TritonUnavailableError`, a ``RuntimeError``).

    Returns:
        A :class:`MergePlan` with ``labels`` ``(B, N)`` and ``num_out = N - r`` (``r`` after
        the clamp; it never depends on the data). On the ``meta`` device the labels are an
        uninitialised ``meta`` tensor of that shape.

    Raises:
        ValueError: a bad argument, naming it and what is accepted (:mod:`.checks`).

    Bad entries: NaN/inf feature values count as 0 and all-zero tokens have cosine distance 1
    to every token (see :func:`~atc_patch.kernel.distance.normalize_tokens`); labels stay valid.
    Half-precision metrics are clustered in float32.
    """
    opts = {"mask": mask, "grid": grid, "tile": tile, "h": h, "w": w, "sx": sx, "sy": sy}
    opts |= {"st": st, "no_rand": no_rand, "generator": generator, "pick": pick}
    opts |= {"k": k, "iters": iters}
    call = check_call(metric, r, method, protected, linkage=linkage, backend=backend, **opts)
    b, n, _ = metric.shape
    r = min(call.r, _cap(call, n))
    if r == 0:
        return MergePlan.identity(b, n, metric.device)
    if metric.is_meta:  # token counts never depend on the data
        return MergePlan(torch.empty(b, n, dtype=torch.long, device="meta"), n - r)
    with call_scope():
        if method == "tome_sd":
            return bipartite_random_grid_plan(
                metric, r, call.grid, call.window, call.no_rand, call.generator, call.pick
            )
        if call.tile is None and call.mask is None:
            return _plain(metric, r, call)
        grid = call.grid if call.grid is not None else (n - call.protected,)
        rows = build_rows(metric, r, method, call.protected, grid, call.tile, call.mask)
        return MergePlan(rows.write(_row_labels(rows, call), n), n - r, validate=False)


def _cap(call: Call, n: int) -> int:
    """The most ``call`` can remove from ``n`` tokens (shapes only)."""
    if call.method == "tome_sd":
        return random_grid_cap(n, call.grid, call.window)
    if call.mask is None and call.tile is None:
        return max_reduction(call.method, n, call.protected)
    grid = call.grid if call.tile is not None else None
    return max_reduction(
        call.method, n, call.protected, grid=grid, tile=call.tile, masked=call.mask is not None
    )


def _plain(metric: Tensor, r: int, call: Call) -> MergePlan:
    """A call without tiles and mask: one row per sample, the protected tokens in front."""
    b, n, _ = metric.shape
    p = call.protected
    if call.method == "tome":
        return bipartite_plan(metric, r, p)
    free = metric[:, p:]
    if call.method == "atc":
        r_rows = torch.full((b,), r, device=metric.device, dtype=torch.long)
        labels = _atc(free, None, r_rows, call)
    else:
        labels = _centres(free, n - p - r, None, None, call)
    if p:
        fixed = torch.arange(p, device=labels.device).expand(b, p)
        labels = torch.cat([fixed, labels + p], dim=1)
    return MergePlan(labels, n - r, validate=False)  # valid by construction


def _row_labels(rows: Rows, call: Call) -> Tensor:
    """Local labels ``(R, L)`` of the rows of a tiled or masked call."""
    if call.method == "atc":
        return _atc(rows.x, rows.valid, rows.r, call)
    if call.method == "tome":
        return bipartite_rows(rows.x, rows.valid, rows.r)
    return _centres(rows.x, rows.clusters, rows.valid, rows.max_clusters, call)


def _atc(x: Tensor, valid: Tensor | None, r: Tensor, call: Call) -> Tensor:
    backend = resolve_backend(call.backend, x.device, x.shape[1])
    if torch.compiler.is_compiling():  # an opaque op with a fake impl: fullgraph-safe
        return atc_labels(x.detach(), valid, r, call.linkage, backend)
    return atc_labels_impl(x, valid, r, call.linkage, backend)


def _centres(
    x: Tensor, clusters: Any, valid: Tensor | None, max_clusters: int | None, call: Call
) -> Tensor:
    with torch.no_grad():
        dist = cosine_distance(x)
        if call.method == "kmedoids":
            return kmedoids_labels(dist, clusters, call.iters, valid, max_clusters)
        return dpcknn_labels(dist, clusters, call.k, valid, max_clusters)
