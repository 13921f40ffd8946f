"""Exact agglomerative token clustering, batched and on-device.

Single, complete and average linkage are *reducible*: if two clusters are each other's nearest
neighbour, merging them never makes another pair closer than they were. Hence

* every reciprocal-nearest-neighbour (RNN) pair can be merged in the same round without
  changing the dendrogram (the idea behind RNN chains and parallel "RAC" clustering), and
* the smallest distance among the remaining clusters never decreases, so no future merge can
  be lower than it.

:func:`agglomerative_labels` therefore runs rounds on the whole batch at once until, for every
sample, at least ``r`` merges are recorded and the ``r``-th lowest recorded merge is no higher
than the smallest remaining distance. The ``r`` lowest merges are then exactly the first ``r``
merges of the sequential dendrogram (for distances without ties); they form a downward-closed
set, so cutting there gives the partition of ``scipy.cluster.hierarchy.linkage`` +
``cut_tree(n_clusters=M - r)``.

* complete / average: RNN rounds. Each round merges all reciprocal pairs and compacts the
  distance matrix to the surviving clusters (one row gather, one column gather, and
  Lance-Williams updates of the merged rows/columns only).
* single: Borůvka rounds. Every cluster joins its nearest neighbour (each such edge is in the
  minimum spanning tree, whose ``r`` lowest edges are the ``r`` lowest single-linkage merges);
  the number of clusters at least halves per round and contraction is a plain minimum.

Host synchronisations: a few per round (the compacted width is a shape; the stop test is a
bool). Rounds are few: single digits on random tokens. No numpy, no per-sample loop.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .centers import canonical_labels

LINKAGES = ("single", "complete", "average")
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")
_INF = float("inf")


def agglomerative_labels(dist: Tensor, r: int, linkage: str, stats: dict | None = None) -> Tensor:
    """Cut the ``linkage`` dendrogram of ``dist`` after its ``r`` lowest merges.

    Args:
        dist: ``(B, M, M)`` symmetric, finite dissimilarities (the diagonal is ignored). Any
            increasing affine map of cosine distance (e.g. ``-cos``) gives the same result.
        r: merges to apply, ``0 <= r <= M - 1``.
        linkage: ``"single"``, ``"complete"`` or ``"average"``.
        stats: if given, filled with ``rounds`` and ``syncs`` (host synchronisations).

    Returns:
        ``(B, M)`` int64 labels in ``[0, M - r)``; clusters are numbered in the order of
        their smallest token index.
    """
    padded = torch.nn.functional.pad(dist, (0, 1, 0, 1), value=_INF)
    return agglomerative_labels_padded(padded, r, linkage, stats)


def agglomerative_labels_padded(
    padded: Tensor, r: int, linkage: str, stats: dict | None = None
) -> Tensor:
    """:func:`agglomerative_labels` on ``(B, M+1, M+1)`` whose last row/column is ``inf``.

    ``padded`` is overwritten (it becomes the working matrix), which saves a copy of the
    ``M x M`` matrix; :func:`~atc_patch.kernel.distance.negative_cosine_padded` builds it
    with one matmul.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    b, m = padded.shape[0], padded.shape[1] - 1
    if r <= 0:
        return torch.arange(m, device=padded.device).expand(b, m).clone()
    counter = {"rounds": 0, "syncs": 0}
    if linkage == "single":
        records = _boruvka_rounds(padded, r, counter)
    else:
        records = _rnn_rounds(padded, r, linkage, counter)
    labels = _cut(*records, r=r, max_depth=m if linkage == "single" else counter["rounds"])
    if linkage == "single":  # Borůvka roots are not the smallest tokens: renumber
        labels = canonical_labels(labels, m - r)
    if stats is not None:
        stats.update(counter)
    return labels


def _start(d: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Prepare the padded working matrix ``d`` ``(B, M+1, M+1)`` (in place) and the records.

    Index ``M`` is a sentinel whose row and column are ``inf``. Returns ``d`` with an ``inf``
    diagonal, ``ids`` ``(B, M+1)`` (position -> representative token; the sentinel maps to the
    sink token ``M``), and the merge records indexed by absorbed token (column ``M`` is a sink
    for masked-out scatters): ``parent``, ``height``, ``when``.
    """
    b, m1, _ = d.shape
    device = d.device
    d.diagonal(dim1=1, dim2=2).fill_(_INF)
    ids = torch.arange(m1, device=device).expand(b, m1).clone()
    parent = ids.clone()
    height = torch.full((b, m1), _INF, device=device, dtype=d.dtype)
    when = torch.full((b, m1), m1 - 1, device=device, dtype=torch.long)
    return d, ids, parent, height, when


def _done(height: Tensor, r: int, dmin: Tensor, counter: dict) -> bool:
    """Host sync: are the ``r`` lowest merges of every sample known?

    They are once the ``r``-th lowest recorded merge is no higher than the smallest remaining
    distance: reducibility means no later merge can be lower than that.
    """
    if counter["rounds"] == 0:
        return False
    counter["syncs"] += 1
    kth = height[:, :-1].kthvalue(r, dim=1).values
    return bool((kth <= dmin.min(dim=1).values).all())


def _record(records, absorbed_tok: Tensor, into_tok: Tensor, dmin: Tensor, rnd: int) -> None:
    """Store merges: token ``absorbed_tok`` (or the sink) joined ``into_tok`` at ``dmin``."""
    parent, height, when = records
    parent.scatter_(1, absorbed_tok, into_tok)
    height.scatter_(1, absorbed_tok, dmin)
    when.scatter_(1, absorbed_tok, torch.full_like(absorbed_tok, rnd))


def _compact_width(keep: Tensor, counter: dict) -> tuple[Tensor, int]:
    """Per-sample survivor counts and the padded width (a host sync: it is a shape)."""
    counter["syncs"] += 1
    n_keep = keep.sum(dim=1)
    return n_keep, max(int(n_keep.max()), 1)


def _rnn_rounds(dist: Tensor, r: int, linkage: str, counter: dict):
    """Complete/average linkage by reciprocal-nearest-neighbour rounds.

    Returns the merge records ``parent``, ``height``, ``when`` ``(B, M)``: for every absorbed
    token the smallest token of the cluster it joined, the merge distance and the round.
    """
    b, m = dist.shape[0], dist.shape[1] - 1
    device = dist.device
    d, ids, parent, height, when = _start(dist)
    size = torch.ones(b, m + 1, device=device, dtype=dist.dtype)
    while True:
        dmin, nn = d.min(dim=2)  # (B, P+1), P active positions and the sentinel
        if _done(height, r, dmin, counter):
            break
        p1 = d.shape[1]
        pos = torch.arange(p1, device=device).expand(b, p1)
        mutual = (nn.gather(1, nn) == pos) & (pos < nn) & torch.isfinite(dmin)
        # The cluster at nn[i] joins the one at i (i < nn[i]: ids stays the smallest token).
        _record(
            (parent, height, when),
            torch.where(mutual, ids.gather(1, nn), m),
            ids,
            dmin,
            counter["rounds"],
        )
        counter["rounds"] += 1

        absorbed = torch.zeros(b, p1 + 1, device=device, dtype=torch.bool)
        absorbed.scatter_(1, torch.where(mutual, nn, p1), True)
        alive = ~absorbed[:, :p1] & torch.isfinite(dmin)
        _, q = _compact_width(alive, counter)
        sel = _pack(alive, q + 1, fill=p1 - 1)  # survivors, then the sentinel: (B, q+1)
        partner = torch.where(mutual.gather(1, sel), nn.gather(1, sel), sel)
        n1, n2 = size.gather(1, sel), size.gather(1, partner)
        merged = partner != sel
        counter["syncs"] += 1
        mb, ms = merged.nonzero(as_tuple=True)
        weight_all = n2 / (n1 + n2)  # average linkage: lerp towards the partner by this
        weight = weight_all[mb, ms, None]
        # Rows of the survivors with merged rows updated, then the same for the columns.
        rows = _merge_rows(d, sel, partner, mb, ms, weight, linkage)  # (B, q+1, P+1)
        d = rows.gather(2, sel[:, None, :].expand(b, q + 1, q + 1))
        _merge_columns(d, rows, sel, partner, merged, weight_all, linkage, counter)
        d.diagonal(dim1=1, dim2=2).fill_(_INF)
        size = torch.where(merged, n1 + n2, n1)
        ids = ids.gather(1, sel)
    return parent[:, :m], height[:, :m], when[:, :m]


def _pack(mask: Tensor, width: int, fill: int) -> Tensor:
    """Positions of the ``True`` entries of ``mask`` ``(B, N)``, in order, padded with ``fill``.

    Returns ``(B, width)``; ``width`` must be at least the largest count of a row.
    """
    b, n = mask.shape
    rank = torch.where(mask, mask.long().cumsum(dim=1) - 1, width)  # column ``width``: a sink
    out = torch.full((b, width + 1), fill, device=mask.device, dtype=torch.long)
    out.scatter_(1, rank, torch.arange(n, device=mask.device).expand(b, n))
    return out[:, :width]


def _lance_williams(a: Tensor, b: Tensor, weight: Tensor, linkage: str) -> Tensor:
    """Distances to ``A ∪ B`` from distances ``a`` to A and ``b`` to B (``a`` is reused).

    Complete takes the maximum, average the size-weighted mean ``lerp(a, b, n_B/(n_A+n_B))``.
    """
    if linkage == "complete":
        return torch.maximum(a, b)
    # inf (diagonal, sentinel) must stay inf: lerp gives inf - inf = nan there
    return a.lerp_(b, weight).nan_to_num_(nan=_INF, posinf=_INF)


def _merge_columns(
    d: Tensor,
    rows: Tensor,
    sel: Tensor,
    partner: Tensor,
    merged: Tensor,
    weight: Tensor,
    linkage: str,
    counter: dict,
) -> None:
    """Update the merged columns of ``d`` ``(B, Q, Q)`` in place from ``rows`` ``(B, Q, P)``.

    Each sample's merged columns are gathered into a ``(B, Q, K)`` block (``K`` = the most
    merges in a sample; shorter samples are padded with the all-``inf`` sentinel column).
    """
    b, q = merged.shape
    count = merged.sum(dim=1)
    counter["syncs"] += 1
    k = int(count.max())
    if k == 0:
        return
    cols = _pack(merged, k, fill=q - 1)
    a = rows.gather(2, sel.gather(1, cols)[:, None, :].expand(b, q, k))
    other = rows.gather(2, partner.gather(1, cols)[:, None, :].expand(b, q, k))
    combined = _lance_williams(a, other, weight.gather(1, cols)[:, None, :], linkage)
    d.scatter_(2, cols[:, None, :].expand(b, q, k), combined)


def _merge_rows(
    d: Tensor, sel: Tensor, partner: Tensor, mb: Tensor, ms: Tensor, weight: Tensor, linkage: str
) -> Tensor:
    """Rows ``sel`` of ``d`` ``(B, P, C)``, rows of merged clusters combined with ``partner``'s.

    ``(mb, ms)`` index the merged rows of the ``(B, Q)`` selection. Lance-Williams: complete
    takes the maximum, average the size-weighted mean ``lerp(a, b, n_b / (n_a + n_b))``.
    Returns ``(B, Q, C)``.
    """
    b, p, c = d.shape
    q = sel.shape[1]
    flat = d.reshape(b * p, c)
    out = flat.index_select(0, (sel + torch.arange(b, device=d.device)[:, None] * p).reshape(-1))
    if mb.numel():
        rows = mb * q + ms
        a = out.index_select(0, rows)
        other = flat.index_select(0, mb * p + partner[mb, ms])
        combined = _lance_williams(a, other, weight, linkage)
        out.index_copy_(0, rows, combined)
    return out.view(b, q, c)


def _boruvka_rounds(dist: Tensor, r: int, counter: dict):
    """Single linkage as a minimum spanning forest grown by Borůvka rounds.

    Returns ``parent``, ``height``, ``when`` ``(B, M)`` as :func:`_rnn_rounds`, except that a
    cluster's representative token is not necessarily its smallest.
    """
    b, m = dist.shape[0], dist.shape[1] - 1
    device = dist.device
    d, ids, parent, height, when = _start(dist)
    _symmetrize_min(d)
    while True:
        dmin, nn = d.min(dim=2)  # ties go to the lowest index, so NN cycles are 2-cycles
        if _done(height, r, dmin, counter):
            break
        p1 = d.shape[1]
        pos = torch.arange(p1, device=device).expand(b, p1)
        alive = torch.isfinite(dmin)
        is_root = ((nn.gather(1, nn) == pos) & (pos < nn)) | ~alive
        ptr = torch.where(is_root, pos, nn)
        _record(
            (parent, height, when),
            torch.where(is_root, m, ids),
            ids.gather(1, ptr),
            dmin,
            counter["rounds"],
        )
        counter["rounds"] += 1

        for _ in range(max(1, math.ceil(math.log2(p1)))):  # pointer jumping to the roots
            ptr = ptr.gather(1, ptr)
        keep = is_root & alive
        _, q = _compact_width(keep, counter)
        rank = keep.long().cumsum(dim=1) - 1
        group = torch.where(alive, rank.gather(1, ptr), q)  # (B, P+1); q = the new sentinel
        offsets = torch.arange(b, device=device)[:, None] * (q + 1)
        flat = (group + offsets).reshape(-1)
        rows = torch.full((b * (q + 1), p1), _INF, device=device, dtype=d.dtype)
        rows.index_reduce_(0, flat, d.reshape(b * p1, p1), "amin")
        # Columns: lay the samples side by side, (q+1, B*P1), and reduce along dim 1.
        side = rows.view(b, q + 1, p1).transpose(0, 1).reshape(q + 1, b * p1)
        cols = torch.full((q + 1, b * (q + 1)), _INF, device=device, dtype=d.dtype)
        cols.index_reduce_(1, flat, side, "amin")
        d = cols.view(q + 1, b, q + 1).transpose(0, 1).contiguous()
        d.diagonal(dim1=1, dim2=2).fill_(_INF)
        new_ids = torch.full((b, q + 1), m, device=device, dtype=torch.long)
        ids = new_ids.scatter_(1, torch.where(keep, rank, q), ids)
    return parent[:, :m], height[:, :m], when[:, :m]


def _symmetrize_min(d: Tensor) -> None:
    """``d = min(d, d^T)`` in place, sample by sample (2-D transposes take a blocked copy).

    A matmul need not be exactly symmetric; exact symmetry keeps Borůvka's nearest-neighbour
    cycles 2-cycles (with ties broken by index).
    """
    for sample in d:  # a layout step, not clustering: B copies of the matrix
        torch.minimum(sample, sample.t().contiguous(), out=sample)


def _cut(parent: Tensor, height: Tensor, when: Tensor, r: int, max_depth: int) -> Tensor:
    """Apply the ``r`` lowest merges (ties: earlier round first) and label the clusters.

    The chosen merges form a forest over tokens (each token is absorbed at most once);
    pointer jumping finds every token's root in ``log2(depth)`` steps. Slots are numbered in
    root order.
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
    slot = (root == tokens).long().cumsum(dim=1) - 1
    return slot.gather(1, root)
