"""Centre-based token clustering baselines of the ATC paper: K-Medoids and DPC-KNN.

Both take a ``(B, M, M)`` distance matrix and return ``(B, M)`` labels in ``[0, K)`` with every
cluster non-empty, numbered in the order of each cluster's smallest token index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .threads import with_kernel_threads


def canonical_labels(labels: Tensor, num_clusters: int) -> Tensor:
    """Renumber ``(B, M)`` labels so clusters appear in order of their smallest token."""
    b, m = labels.shape
    tokens = torch.arange(m, device=labels.device).expand(b, m)
    first = torch.full((b, num_clusters), m, device=labels.device, dtype=torch.long)
    first = first.scatter_reduce(1, labels, tokens, reduce="amin")
    rank = torch.empty_like(first).scatter_(
        1, first.argsort(dim=1), torch.arange(num_clusters, device=labels.device).expand(b, -1)
    )
    return rank.gather(1, labels)


def _assign(dist: Tensor, centres: Tensor) -> Tensor:
    """Nearest centre of every token ``(B, M)``; each centre is forced into its own cluster."""
    b, k = centres.shape
    to_centre = dist.gather(2, centres[:, None, :].expand(-1, dist.shape[1], -1))  # (B, M, K)
    labels = to_centre.argmin(dim=2)
    own = torch.arange(k, device=dist.device).expand(b, k)
    return labels.scatter(1, centres, own)


@with_kernel_threads
def kmedoids_labels(dist: Tensor, num_clusters: int, iters: int) -> Tensor:
    """K-Medoids (alternating assignment / medoid update) on ``dist`` ``(B, M, M)``.

    Initialisation is deterministic: the most central token first, then farthest-point
    sampling over the tokens not chosen yet. Each update moves a medoid to the member with the
    smallest summed distance to its cluster. ``iters`` rounds run without host
    synchronisation (a converged state is a fixed point).
    """
    b, m, _ = dist.shape
    device = dist.device
    first = dist.sum(dim=2).argmin(dim=1, keepdim=True)
    centres = [first]
    nearest = dist.gather(1, first[:, :, None].expand(-1, 1, m)).squeeze(1)  # (B, M)
    nearest = nearest.scatter(1, first, -1.0)  # a chosen token is never chosen again
    for _ in range(num_clusters - 1):
        nxt = nearest.argmax(dim=1, keepdim=True)
        centres.append(nxt)
        to_new = dist.gather(1, nxt[:, :, None].expand(-1, 1, m)).squeeze(1)
        nearest = torch.minimum(nearest, to_new).scatter_(1, nxt, -1.0)
    medoids = torch.cat(centres, dim=1)  # (B, K)
    labels = _assign(dist, medoids)
    big = torch.finfo(dist.dtype).max
    for _ in range(iters):
        onehot = torch.zeros(b, m, num_clusters, device=device, dtype=dist.dtype)
        onehot.scatter_(2, labels[:, :, None], 1.0)
        cost = (dist @ onehot).gather(2, labels[:, :, None]).squeeze(2)  # (B, M) own-cluster cost
        best = torch.full((b, num_clusters), big, device=device, dtype=dist.dtype)
        best = best.scatter_reduce(1, labels, cost, reduce="amin")
        is_best = cost <= best.gather(1, labels)
        # The smallest-index member among the minimisers becomes the medoid.
        tokens = torch.arange(m, device=device).expand(b, m)
        cand = torch.where(is_best, tokens, m)
        medoids = torch.full((b, num_clusters), m, device=device, dtype=torch.long)
        medoids = medoids.scatter_reduce(1, labels, cand, reduce="amin")
        labels = _assign(dist, medoids)
    return canonical_labels(labels, num_clusters)


@with_kernel_threads
def dpcknn_labels(dist: Tensor, num_clusters: int, k: int) -> Tensor:
    """DPC-KNN as in TCFormer's ``cluster_dpc_knn``, on cosine distances ``(B, M, M)``.

    Density ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)`` over the ``k`` nearest tokens (itself
    included, as TCFormer); ``delta_i`` = distance to the nearest denser token (the largest
    distance for the densest one); the ``num_clusters`` tokens with the largest
    ``rho * delta`` become centres and every token joins its nearest centre. Density ties are
    broken by token index instead of TCFormer's random noise, so results are deterministic.
    """
    b, m, _ = dist.shape
    kk = min(k, m)
    knn = dist.topk(kk, dim=2, largest=False).values
    density = (-(knn**2).mean(dim=2)).exp()  # (B, M)
    tokens = torch.arange(m, device=dist.device)
    rho_i, rho_j = density[:, :, None], density[:, None, :]
    earlier = tokens[None, None, :] < tokens[None, :, None]
    denser = (rho_j > rho_i) | ((rho_j == rho_i) & earlier)  # [b, i, j]: j is denser than i
    dmax = dist.flatten(1).max(dim=1).values[:, None, None]
    delta = torch.where(denser, dist, dmax).min(dim=2).values
    score = delta * density
    centres = score.topk(num_clusters, dim=1).indices
    return canonical_labels(_assign(dist, centres), num_clusters)
