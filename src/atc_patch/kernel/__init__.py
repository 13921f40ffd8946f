"""The shared token-clustering kernel: ``cluster_tokens(metric, r, method=...) -> MergePlan``.

Every model patch calls this one function; it never imports timm, diffusers or mmdet.

Methods:
    ``"atc"``       agglomerative clustering (single / complete / average linkage), exact
    ``"tome"``      ToMe bipartite soft matching
    ``"tome_sd"``   ToMe-SD 2-D random bipartite matching over an ``h x w`` grid
    ``"kmedoids"``  K-Medoids on cosine distance
    ``"dpcknn"``    DPC-KNN clustering (TCFormer)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .atc import LINKAGES
from .bipartite import bipartite_plan, bipartite_random2d_plan
from .centers import dpcknn_labels, kmedoids_labels
from .distance import cosine_distance
from .ops import BACKENDS, atc_labels, atc_labels_impl, resolve_backend
from .plan import MergePlan
from .scratch import release_workspace

METHODS = ("atc", "tome", "tome_sd", "kmedoids", "dpcknn")

__all__ = [
    "BACKENDS",
    "LINKAGES",
    "METHODS",
    "MergePlan",
    "cluster_tokens",
    "max_reduction",
    "release_workspace",
]


def max_reduction(method: str, num_tokens: int, protected: int = 0) -> int:
    """The largest ``r`` ``method`` can remove from ``num_tokens`` tokens in one step."""
    m = num_tokens - protected
    if method == "tome":
        # A = unprotected tokens at even absolute positions (ToMe's a = x[..., ::2, :]).
        first_a = protected + protected % 2
        return max(min((num_tokens - first_a + 1) // 2, m // 2), 0)
    return max(m - 1, 0)


def cluster_tokens(
    metric: Tensor,
    r: int,
    method: str = "atc",
    linkage: str | None = None,
    protected: int = 0,
    *,
    h: int | None = None,
    w: int | None = None,
    sx: int = 2,
    sy: int = 2,
    no_rand: bool = False,
    generator: torch.Generator | None = None,
    pick: Tensor | None = None,
    k: int = 5,
    iters: int = 10,
    backend: str = "auto",
) -> MergePlan:
    """Plan the removal of ``r`` tokens from ``metric`` by merging similar tokens.

    Args:
        metric: ``(B, N, C)`` features compared by cosine distance (e.g. attention keys).
        r: tokens to remove; clamped to what ``method`` can remove (see :func:`max_reduction`).
        method: one of :data:`METHODS`.
        linkage: for ``"atc"`` only, one of :data:`LINKAGES` (default ``"average"``).
        protected: the first ``protected`` tokens (class/distillation/register tokens) never
            merge and keep output slots ``0 .. protected-1`` in order.
        h: ``"tome_sd"`` only: the height of the ``h x w`` token grid (``N = h * w``).
        w: ``"tome_sd"`` only: its width.
        sx: ``"tome_sd"`` only: the width of the ``sx x sy`` window holding one destination.
        sy: ``"tome_sd"`` only: the window's height.
        no_rand: ``"tome_sd"`` only: top-left destinations instead of random ones.
        generator: ``"tome_sd"`` only: the ``torch.Generator`` drawing the destinations.
        pick: ``"tome_sd"`` only, instead of drawing: the destination of each window, an
            ``(h // sy, w // sx)`` integer tensor with values in ``[0, sy * sx)`` (row-major
            position in the window), e.g. derived on the device from a seed (no host sync).
        k: ``"dpcknn"`` only, neighbours used for the density.
        iters: ``"kmedoids"`` only, maximum assignment/update iterations.
        backend: ``"atc"`` only (other methods are plain torch): ``"auto"`` (the fused Triton
            kernel on CUDA up to 1024 free tokens, the torch rounds otherwise), ``"torch"`` or
            ``"triton"`` (forced; on the CPU only under ``TRITON_INTERPRET=1``, else a
            :class:`~atc_patch.kernel.triton_atc.TritonUnavailableError`, a ``RuntimeError``).

    Returns:
        A :class:`MergePlan` with ``labels`` ``(B, N)`` and ``num_out = N - r``.

    Bad entries: NaN/inf feature values count as 0 and all-zero tokens have cosine distance 1
    to every token (see :func:`~atc_patch.kernel.distance.normalize_tokens`); labels stay valid.
    Half-precision metrics are clustered in float32.
    """
    _validate(metric, r, method, linkage, protected, k=k, iters=iters)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and method != "atc":
        raise ValueError(f"backend='triton' applies to method='atc' only, not to {method!r}")
    b, n, _ = metric.shape
    r = min(int(r), max_reduction(method, n, protected))
    if method == "tome_sd":
        return bipartite_random2d_plan(
            metric,
            r,
            protected,
            h=h,
            w=w,
            sx=sx,
            sy=sy,
            no_rand=no_rand,
            generator=generator,
            pick=pick,
        )
    if r == 0:
        return MergePlan.identity(b, n, metric.device)
    if method == "tome":
        return bipartite_plan(metric, r, protected)
    if method == "atc":
        linkage = linkage or "average"
        backend = resolve_backend(backend, metric.device, n - protected)
        if torch.compiler.is_compiling():  # an opaque op with a fake impl: fullgraph-safe
            labels = atc_labels(metric.detach(), r, linkage, protected, backend)
        else:
            labels = atc_labels_impl(metric, r, linkage, protected, backend)
        return MergePlan(labels, n - r, validate=False)  # valid by construction
    with torch.no_grad():
        free = metric[:, protected:]
        if method == "kmedoids":
            labels = kmedoids_labels(cosine_distance(free), n - protected - r, iters)
        else:
            labels = dpcknn_labels(cosine_distance(free), n - protected - r, k)
    return _with_protected(labels, protected, n - r)


def _with_protected(labels: Tensor, protected: int, num_out: int) -> MergePlan:
    """Prepend ``protected`` fixed slots to unprotected-token labels ``(B, M)``."""
    if protected:
        fixed = torch.arange(protected, device=labels.device).expand(labels.shape[0], protected)
        labels = torch.cat([fixed, labels + protected], dim=1)
    return MergePlan(labels, num_out, validate=False)  # valid by construction


def _validate(
    metric: Tensor, r: int, method: str, linkage: str | None, protected: int, k: int, iters: int
) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if linkage is not None:
        if method != "atc":
            raise ValueError(f"linkage applies to method='atc' only, not to {method!r}")
        if linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    if not isinstance(metric, Tensor) or metric.dim() != 3:
        shape = tuple(metric.shape) if isinstance(metric, Tensor) else type(metric).__name__
        raise ValueError(f"metric must be a (B, N, C) tensor, got {shape}")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be a floating-point tensor, got {metric.dtype}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be an int, got {r!r}")
    if r < 0:
        raise ValueError(f"r must be >= 0 (tokens removed), got {r}")
    if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0:
        raise ValueError(f"protected must be an int >= 0, got {protected!r}")
    if protected > metric.shape[1]:
        raise ValueError(f"protected={protected} exceeds the {metric.shape[1]} tokens in metric")
    if method == "dpcknn" and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an int >= 1 for dpcknn, got {k!r}")
    if method == "kmedoids" and (not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be an int >= 1 for kmedoids, got {iters!r}")
