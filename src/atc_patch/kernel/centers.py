"""Centre-based token clustering baselines of the ATC paper: K-Medoids and DPC-KNN.

Both take a ``(B, M, M)`` distance matrix (exactly symmetric, zero diagonal: see
:func:`~atc_patch.kernel.distance.cosine_distance`) and return ``(B, M)`` labels in ``[0, K)``
with every cluster non-empty, numbered in the order of each cluster's smallest token.

Rows may be ragged (tiles, masks: :mod:`~atc_patch.kernel.tiles`): ``valid`` ``(B, M)`` marks
the real tokens of each row and ``num_clusters`` may then be a ``(B,)`` tensor, with
``max_clusters`` a Python bound for the shapes; entries that are not real tokens get ``-1``.

Ties are broken by fixed rules that look at one row only (never at the other rows of the
batch, nor at rounding): K-Medoids compares exact integer costs, DPC-KNN orders equal scores
by token index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .threads import with_kernel_threads

#: K-Medoids sums distances as integers in units of ``2**-29`` (``d <= 2`` fits an int32, and
#: sums of up to ``2**33`` of them an int64): sums are exact whatever their order, so equal
#: costs are equal and the smallest token wins, whatever the batch or the hardware.
_QUANTUM = 2.0**29


def canonical_labels(labels: Tensor, num_clusters: int) -> Tensor:
    """Renumber ``(B, M)`` labels in ``[0, num_clusters]`` so clusters appear in order of their
    smallest token; label ``num_clusters`` (entries that are not tokens) goes last."""
    b, m = labels.shape
    tokens = torch.arange(m, device=labels.device).expand(b, m)
    first = torch.full((b, num_clusters + 1), m, device=labels.device, dtype=torch.long)
    first = first.scatter_reduce(1, labels, tokens, reduce="amin")
    first[:, num_clusters] = m + 1
    rank = torch.empty_like(first).scatter_(
        1,
        first.argsort(dim=1, stable=True),
        torch.arange(num_clusters + 1, device=labels.device).expand(b, -1),
    )
    return rank.gather(1, labels)


def _centre_ok(num_clusters: int | Tensor, k: int, device: torch.device) -> Tensor | None:
    """``(B, k)``: which of the ``k`` centre slots a row uses (``None``: all)."""
    if isinstance(num_clusters, int):
        return None
    return torch.arange(k, device=device) < num_clusters[:, None]


def _assign(dist: Tensor, centres: Tensor, ok: Tensor | None, valid: Tensor | None) -> Tensor:
    """Nearest centre of every token ``(B, M)`` (first centre on ties); each centre is forced
    into its own cluster; unused centres (``ok`` ``(B, K)``) are never chosen, and entries
    that are not tokens (``valid``) get label ``K``."""
    b, k = centres.shape
    m = dist.shape[1]
    to_centre = dist.gather(2, centres[:, None, :].expand(-1, m, -1))  # (B, M, K)
    if ok is not None:
        top = torch.iinfo(dist.dtype).max if not dist.is_floating_point() else float("inf")
        to_centre = to_centre.masked_fill(~ok[:, None, :], top)
    labels = to_centre.argmin(dim=2)
    own = torch.arange(k, device=dist.device).expand(b, k)
    if ok is None and valid is None:
        return labels.scatter(1, centres, own)
    if valid is not None:
        labels = labels.masked_fill(~valid, k)
    at = centres if ok is None else torch.where(ok, centres, m)  # unused: a sink column
    sink = torch.full((b, 1), k, device=dist.device, dtype=torch.long)
    return torch.cat([labels, sink], dim=1).scatter_(1, at, own)[:, :m]


@with_kernel_threads
def kmedoids_labels(
    dist: Tensor,
    num_clusters: int | Tensor,
    iters: int,
    valid: Tensor | None = None,
    max_clusters: int | None = None,
) -> Tensor:
    """K-Medoids (alternating assignment / medoid update) on ``dist`` ``(B, M, M)``.

    Initialisation is deterministic: the most central token first, then farthest-point
    sampling over the tokens not chosen yet. Each update moves a medoid to the member with the
    smallest summed distance to its cluster, the smallest such token on ties. Distances are
    compared as integers (:data:`_QUANTUM`), so ties are exact. ``iters`` rounds run without
    host synchronisation (a converged state is a fixed point).
    """
    b, m, _ = dist.shape
    k = num_clusters if isinstance(num_clusters, int) else int(max_clusters)
    device = dist.device
    q = (dist * _QUANTUM).round_().to(torch.int32)
    ok = _centre_ok(num_clusters, k, device)
    if valid is not None:  # other entries: never a centre, nothing added to any sum
        q.masked_fill_(~valid[:, None, :], 0)
    total = q.sum(dim=2, dtype=torch.int64)
    if valid is not None:
        total.masked_fill_(~valid, torch.iinfo(torch.int64).max)
    first = total.argmin(dim=1, keepdim=True)
    centres = [first]
    nearest = q.gather(1, first[:, :, None].expand(-1, 1, m)).squeeze(1).long()  # (B, M)
    nearest = nearest.scatter(1, first, -1)  # a chosen token is never chosen again
    if valid is not None:
        nearest.masked_fill_(~valid, -1)
    for _ in range(k - 1):
        nxt = nearest.argmax(dim=1, keepdim=True)
        centres.append(nxt)
        to_new = q.gather(1, nxt[:, :, None].expand(-1, 1, m)).squeeze(1)
        nearest = torch.minimum(nearest, to_new).scatter_(1, nxt, -1)
    medoids = torch.cat(centres, dim=1)  # (B, K)
    labels = _assign(q, medoids, ok, valid)
    tokens = torch.arange(m, device=device).expand(b, m)
    top = torch.iinfo(torch.int64).max
    for _ in range(iters):
        same = labels[:, :, None] == labels[:, None, :]
        cost = torch.where(same, q, 0).sum(dim=2, dtype=torch.int64)  # own-cluster cost
        best = torch.full((b, k + 1), top, device=device, dtype=torch.int64)
        best = best.scatter_reduce(1, labels, cost, reduce="amin")
        cand = torch.where(cost <= best.gather(1, labels), tokens, m)
        medoids = torch.full((b, k + 1), m, device=device, dtype=torch.long)
        medoids = medoids.scatter_reduce(1, labels, cand, reduce="amin")[:, :k]
        if ok is not None:
            medoids = torch.where(ok, medoids, 0)
        labels = _assign(q, medoids, ok, valid)
    return _finish(labels, k, valid)


def _finish(labels: Tensor, k: int, valid: Tensor | None) -> Tensor:
    """Canonical numbering; ``-1`` for entries that are not tokens."""
    out = canonical_labels(labels, k)
    return out if valid is None else out.masked_fill_(~valid, -1)


@with_kernel_threads
def dpcknn_labels(
    dist: Tensor,
    num_clusters: int | Tensor,
    k: int,
    valid: Tensor | None = None,
    max_clusters: int | None = None,
) -> Tensor:
    """DPC-KNN as in TCFormer's ``cluster_dpc_knn``, on cosine distances ``(B, M, M)``.

    Density ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)`` over the ``k`` nearest tokens (itself
    included, as TCFormer); ``delta_i`` = distance to the nearest denser token (the largest
    distance for the densest one); the ``num_clusters`` tokens with the largest
    ``rho * delta`` become centres and every token joins its nearest centre. Density ties are
    broken by token index instead of TCFormer's random noise, and equal scores by token index
    too, so results are deterministic.
    """
    b, m, _ = dist.shape
    kc = num_clusters if isinstance(num_clusters, int) else int(max_clusters)
    kk = min(k, m)
    tokens = torch.arange(m, device=dist.device)
    if valid is None:
        knn = dist.topk(kk, dim=2, largest=False).values
        density = (-(knn**2).mean(dim=2)).exp()  # (B, M)
        dmax = dist.flatten(1).max(dim=1).values[:, None, None]
    else:
        pair = valid[:, :, None] & valid[:, None, :]
        knn = dist.masked_fill(~pair, float("inf")).topk(kk, dim=2, largest=False).values
        used = tokens[:kk] < valid.sum(dim=1, keepdim=True).clamp_max(k)  # (B, kk)
        count = used.sum(dim=1, keepdim=True).clamp_min(1)
        mean = torch.where(used[:, None, :], knn**2, 0.0).sum(dim=2) / count
        density = (-mean).exp()
        dmax = dist.masked_fill(~pair, 0.0).flatten(1).max(dim=1).values[:, None, None]
    rho_i, rho_j = density[:, :, None], density[:, None, :]
    earlier = tokens[None, None, :] < tokens[None, :, None]
    denser = (rho_j > rho_i) | ((rho_j == rho_i) & earlier)  # [b, i, j]: j is denser than i
    if valid is not None:
        denser &= valid[:, None, :]
    delta = torch.where(denser, dist, dmax).min(dim=2).values
    score = delta * density
    if valid is not None:
        score = score.masked_fill(~valid, -float("inf"))
    centres = score.argsort(dim=1, descending=True, stable=True)[:, :kc]
    ok = _centre_ok(num_clusters, kc, dist.device)
    return _finish(_assign(dist, centres, ok, valid), kc, valid)
