"""Exact agglomerative token clustering, batched and on-device.

Single, complete and average linkage are *reducible*: if two clusters are each other's nearest
neighbour, merging them never makes another pair closer than they were. Hence

* every reciprocal-nearest-neighbour (RNN) pair can be merged in the same round without
  changing the dendrogram (the idea behind RNN chains and parallel "RAC" clustering), and
* the smallest distance among the remaining clusters never decreases, so no future merge can
  be lower than it.

:func:`agglomerative_labels` therefore runs RNN rounds on the whole batch at once until, for
every sample, at least ``r`` merges are recorded and the ``r``-th lowest recorded merge is no
higher than the smallest remaining distance. The ``r`` lowest merges are then exactly the first
``r`` merges of the sequential dendrogram (for distances without ties), and they form a
downward-closed set, so cutting there gives the partition that ``scipy.cluster.hierarchy``'s
``linkage`` + ``cut_tree(n_clusters=M - r)`` gives.

Cost per round: one row-min over the active distance matrix and four gathers to merge and
compact it (it shrinks every round). One host synchronisation per round decides whether to
stop. No numpy, no per-sample loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .centers import canonical_labels

LINKAGES = ("single", "complete", "average")


def agglomerative_labels(dist: Tensor, r: int, linkage: str, stats: dict | None = None) -> Tensor:
    """Cut the ``linkage`` dendrogram of ``dist`` after its ``r`` lowest merges.

    Args:
        dist: ``(B, M, M)`` symmetric, finite distance matrices (the diagonal is ignored).
        r: merges to apply, ``0 <= r <= M - 1``.
        linkage: ``"single"``, ``"complete"`` or ``"average"``.
        stats: if given, filled with ``rounds`` (RNN rounds run) and ``syncs`` (host syncs).

    Returns:
        ``(B, M)`` int64 labels in ``[0, M - r)``; clusters are numbered in the order of
        their smallest token index.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    b, m, _ = dist.shape
    device = dist.device
    tokens = torch.arange(m, device=device).expand(b, m)
    if r <= 0:
        return tokens.clone()
    if linkage == "single":
        parent, height, when, rounds = _boruvka_rounds(dist, r)
        labels = _cut(parent, height, when, r, max_depth=m)
        labels = canonical_labels(labels, m - r)
    else:
        parent, height, when, rounds = _rnn_rounds(dist, r, linkage)
        labels = _cut(parent, height, when, r, max_depth=rounds)
    if stats is not None:
        stats.update(rounds=rounds, syncs=2 * rounds)
    return labels


def _new_records(b: int, m: int, device: torch.device, dtype: torch.dtype):
    """Merge records by absorbed token; column ``m`` is a sink for masked-out scatters."""
    parent = torch.arange(m + 1, device=device).expand(b, m + 1).clone()
    height = torch.full((b, m + 1), float("inf"), device=device, dtype=dtype)
    when = torch.full((b, m + 1), m, device=device, dtype=torch.long)
    return parent, height, when


def _done(height: Tensor, r: int, dmin: Tensor) -> bool:
    """Host sync: are the ``r`` lowest merges of every sample known?

    They are once the ``r``-th lowest recorded merge is no higher than the smallest remaining
    distance, because no later merge can be lower than that (reducibility).
    """
    kth = height[:, :-1].kthvalue(r, dim=1).values
    return bool((kth <= dmin.min(dim=1).values).all())


def _boruvka_rounds(dist: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Single linkage as a minimum spanning forest, grown by Borůvka rounds.

    Every component joins its nearest neighbour (each such edge is in the MST), so the number
    of components at least halves per round; contracted distances are plain minima. The
    ``r`` lowest MST edges are the ``r`` lowest single-linkage merges.
    Returns ``parent``, ``height``, ``when`` ``(B, M)`` as :func:`_rnn_rounds` and the rounds.
    """
    b, m, _ = dist.shape
    device = dist.device
    d = dist.clone()
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    ids = torch.arange(m, device=device).expand(b, m).clone()  # position -> a token of it
    parent, height, when = _new_records(b, m, device, dist.dtype)
    rounds = 0
    while True:
        dmin, nn = d.min(dim=2)  # ties go to the lowest index, so NN cycles are 2-cycles
        if rounds > 0 and _done(height, r, dmin):
            break
        p = d.shape[1]
        pos = torch.arange(p, device=device).expand(b, p)
        alive = torch.isfinite(dmin)
        is_root = ((nn.gather(1, nn) == pos) & (pos < nn)) | ~alive
        ptr = torch.where(is_root, pos, nn)
        absorbed_tok = torch.where(is_root, m, ids)
        parent.scatter_(1, absorbed_tok, ids.gather(1, ptr))
        height.scatter_(1, absorbed_tok, dmin)
        when.scatter_(1, absorbed_tok, torch.full_like(absorbed_tok, rounds))
        rounds += 1

        for _ in range(max(1, math.ceil(math.log2(p)))):
            ptr = ptr.gather(1, ptr)
        keep = is_root & alive
        n_keep = keep.sum(dim=1)
        q = max(int(n_keep.max()), 1)
        rank = keep.long().cumsum(dim=1) - 1
        group = torch.where(alive, rank.gather(1, ptr), q)  # (B, P); q = sink
        rows = torch.full((b, q + 1, p), float("inf"), device=device, dtype=d.dtype)
        rows.scatter_reduce_(1, group[:, :, None].expand(b, p, p), d, reduce="amin")
        d = torch.full((b, q + 1, q + 1), float("inf"), device=device, dtype=d.dtype)
        d.scatter_reduce_(2, group[:, None, :].expand(b, q + 1, p), rows, reduce="amin")
        d = d[:, :q, :q].contiguous()
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        new_ids = torch.zeros(b, q + 1, device=device, dtype=torch.long)
        ids = new_ids.scatter_(1, torch.where(keep, rank, q), ids)[:, :q]
    return parent[:, :m], height[:, :m], when[:, :m], rounds


def _rnn_rounds(dist: Tensor, r: int, linkage: str) -> tuple[Tensor, Tensor, Tensor, int]:
    """Merge reciprocal nearest neighbours round by round until the ``r`` lowest are known.

    Returns ``parent`` ``(B, M)`` (the token each absorbed token's cluster merged into; itself
    if never absorbed), ``height`` ``(B, M)`` (merge distance, ``inf`` if never absorbed),
    ``when`` ``(B, M)`` (round of the merge) and the number of rounds.
    """
    b, m, _ = dist.shape
    device, dtype = dist.device, dist.dtype
    inf = torch.tensor(float("inf"), device=device, dtype=dtype)

    d = dist.clone()
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    ids = torch.arange(m, device=device).expand(b, m).clone()  # position -> smallest token
    size = torch.ones(b, m, device=device, dtype=dtype)
    parent, height, when = _new_records(b, m, device, dtype)

    rounds = 0
    while True:
        dmin, nn = d.min(dim=2)  # (B, P) nearest active cluster of every position
        if rounds > 0 and _done(height, r, dmin):
            break
        p = d.shape[1]
        pos = torch.arange(p, device=device).expand(b, p)
        mutual = (nn.gather(1, nn) == pos) & (pos < nn) & torch.isfinite(dmin)

        # Record the merges by token: the cluster at nn[i] is absorbed into the one at i.
        absorbed_tok = torch.where(mutual, ids.gather(1, nn), m)
        parent.scatter_(1, absorbed_tok, ids)
        height.scatter_(1, absorbed_tok, dmin)
        when.scatter_(1, absorbed_tok, torch.full_like(absorbed_tok, rounds))
        rounds += 1

        # Survivors keep their relative order, so ids stays "smallest token of the cluster".
        absorbed = torch.zeros(b, p + 1, device=device, dtype=torch.bool)
        absorbed.scatter_(1, torch.where(mutual, nn, p), True)
        alive = ~absorbed[:, :p] & torch.isfinite(dmin)
        n_alive = alive.sum(dim=1)
        q = max(int(n_alive.max()), 1)  # compacted width (shape needs it on the host)
        sel = torch.where(alive, pos, pos + p).argsort(dim=1)[:, :q]
        valid = torch.arange(q, device=device)[None, :] < n_alive[:, None]
        merged = mutual.gather(1, sel) & valid
        partner = torch.where(merged, nn.gather(1, sel), sel)

        n1 = size.gather(1, sel)
        n2 = torch.where(merged, size.gather(1, partner), 0)
        rows = _combine(
            d.gather(1, sel[:, :, None].expand(b, q, p)),
            d.gather(1, partner[:, :, None].expand(b, q, p)),
            n1[:, :, None],
            n2[:, :, None],
            merged[:, :, None],
            linkage,
        )
        d = _combine(
            rows.gather(2, sel[:, None, :].expand(b, q, q)),
            rows.gather(2, partner[:, None, :].expand(b, q, q)),
            n1[:, None, :],
            n2[:, None, :],
            merged[:, None, :],
            linkage,
        )
        d.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), inf)
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        size = torch.where(valid, n1 + n2, 1)
        ids = torch.where(valid, ids.gather(1, sel), 0)
    return parent[:, :m], height[:, :m], when[:, :m], rounds


def _combine(a: Tensor, b: Tensor, na: Tensor, nb: Tensor, merged: Tensor, linkage: str) -> Tensor:
    """Lance-Williams update of distances to clusters ``a`` and ``b`` for ``a ∪ b``.

    ``a``/``b`` hold distances from the (possibly merged) partner clusters; where ``merged``
    is False, ``b`` is ``a`` itself and ``a`` is returned unchanged.
    """
    if linkage == "single":
        return torch.minimum(a, b)
    if linkage == "complete":
        return torch.maximum(a, b)
    avg = (a * na + b * nb) / (na + nb)
    return torch.where(merged, avg, a)


def _cut(parent: Tensor, height: Tensor, when: Tensor, r: int, max_depth: int) -> Tensor:
    """Apply the ``r`` lowest merges (ties: earlier round first) and label the clusters.

    Every absorbed token points to a smaller token, so the chosen merges form a forest whose
    roots are the clusters' smallest tokens; pointer jumping finds them in ``log2(depth)``
    steps (a chain is at most one link per round deep).
    """
    b, m = parent.shape
    tokens = torch.arange(m, device=parent.device).expand(b, m)
    by_round = when.argsort(dim=1, stable=True)
    by_height = height.gather(1, by_round).argsort(dim=1, stable=True)
    chosen = by_round.gather(1, by_height)[:, :r]
    is_edge = torch.zeros_like(parent, dtype=torch.bool).scatter_(1, chosen, True)
    root = torch.where(is_edge, parent, tokens)
    for _ in range(max(1, math.ceil(math.log2(max_depth + 1)))):
        root = root.gather(1, root)
    is_root = root == tokens
    slot = is_root.long().cumsum(dim=1) - 1
    return slot.gather(1, root)
