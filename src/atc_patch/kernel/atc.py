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

* complete / average (:func:`_rnn_rounds`): the distance matrix is updated **in place** and
  only where it changes. A round merges every RNN pair, rewrites the merged clusters' rows and
  columns (Lance-Williams: ``max``, or the size-weighted mean of the two rows) and re-scans
  only the rows whose nearest neighbour was merged: a row whose nearest neighbour survived
  keeps it, at the same distance (reducibility).
* single (:func:`_boruvka_rounds`): Borůvka rounds. Every cluster joins its nearest neighbour
  (an edge of the minimum spanning tree, whose ``r`` lowest edges are the ``r`` lowest
  single-linkage merges); rows are min-reduced by component and columns are never touched.

Host synchronisations: two per round for complete/average, two for single (a width that is a
tensor shape, and the stop test). No numpy, no per-sample loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .centers import canonical_labels
from .scratch import scratch

LINKAGES = ("single", "complete", "average")
_INF = float("inf")


@dataclass
class Workspace:
    """The working distance matrix of :func:`agglomerative_labels_ws`.

    ``d`` is ``(B, M+1, W)``: ``d[:, :M, :M]`` the dissimilarities with an ``inf`` diagonal,
    row ``M`` a scratch row and column ``M`` a sink (both let samples with fewer merges than
    the batch's widest be padded without masks), columns ``M .. W-1`` ``inf``. ``block``
    divides ``W``: rows are scanned block-wise (:func:`_row_argmin`).
    """

    d: Tensor
    m: int
    block: int

    @classmethod
    def empty(cls, b: int, m: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        """An uninitialised workspace for ``B`` samples of ``M`` tokens (kernel scratch memory)."""
        block = scan_block(m)
        return cls(scratch("atc.d", (b, m + 1, padded_width(m)), dtype, device), m, block)

    def finish(self) -> Workspace:
        """Given ``d[:, :M, :M]``, set the diagonal, the scratch row and the padding columns to
        ``inf``. Returns ``self``."""
        m = self.m
        self.d[:, :, m:] = _INF
        self.d[:, m] = _INF
        self.d[:, :m, :m].diagonal(dim1=1, dim2=2).fill_(_INF)
        return self


def scan_block(m: int) -> int:
    """Block length of the row scans for ``M`` tokens (a multiple of the SIMD width)."""
    return 64 if m >= 1024 else 32


def padded_width(m: int) -> int:
    """Row width ``W`` of the workspace: the smallest multiple of the scan block above ``M``."""
    block = scan_block(m)
    return (m // block + 1) * block


def agglomerative_labels(dist: Tensor, r: int, linkage: str, stats: dict | None = None) -> Tensor:
    """Cut the ``linkage`` dendrogram of ``dist`` after its ``r`` lowest merges.

    Args:
        dist: ``(B, M, M)`` finite dissimilarities (the diagonal is ignored; an asymmetric
            matrix is read as ``min(d, d^T)``). Any increasing affine map of cosine distance
            (e.g. ``-cos``) gives the same result. Not modified.
        r: merges to apply, ``0 <= r <= M - 1``.
        linkage: ``"single"``, ``"complete"`` or ``"average"``.
        stats: if given, filled with ``rounds`` and ``syncs`` (host synchronisations).

    Returns:
        ``(B, M)`` int64 labels in ``[0, M - r)``; clusters are numbered in the order of
        their smallest token index.
    """
    b, m, _ = dist.shape
    ws = Workspace.empty(b, m, dist.dtype, dist.device)
    torch.minimum(dist, dist.mT, out=ws.d[:, :m, :m])
    return agglomerative_labels_ws(ws.finish(), r, linkage, stats)


def agglomerative_labels_ws(
    ws: Workspace, r: int, linkage: str, stats: dict | None = None
) -> Tensor:
    """:func:`agglomerative_labels` on a prepared :class:`Workspace` (which it overwrites).

    :func:`~atc_patch.kernel.distance.negative_cosine_workspace` builds one with one matmul.
    Its matrix may be asymmetric in the last bit (a matmul need not be exactly symmetric);
    the rounds read rows, and a near-tie that this turns into a nearest-neighbour cycle
    longer than a pair is resolved without stalling (:func:`_closest_pair`).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    b, m = ws.d.shape[0], ws.m
    if r <= 0:
        return torch.arange(m, device=ws.d.device).expand(b, m).clone()
    counter = {"rounds": 0, "syncs": 0}
    with torch.inference_mode():  # no autograd bookkeeping on the many small ops
        if linkage == "single":
            parent, height, when = _boruvka_rounds(ws, r, counter)
            labels = canonical_labels(_cut(parent, height, when, r=r, max_depth=m), m - r)
        else:
            parent, height, when = _rnn_rounds(ws, r, linkage, counter)
            labels = _cut(parent, height, when, r=r, max_depth=counter["rounds"])
    if stats is not None:
        stats.update(counter)
    return labels.clone()  # a normal tensor: callers may use it in autograd graphs


def _row_argmin(rows: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Minimum and its index along the last dim of ``rows`` ``(B, n, W)``, ``W % block == 0``.

    On the CPU ``torch.min`` with indices costs several times a plain ``amin``, so the index
    is found in two steps over a ``(W / block, block)`` view of each row: a vectorised ``amin``
    over one axis, then the index along the other, small, axis. Narrow rows reduce across
    blocks first (lane ``l`` = every ``block``-th column), wide rows within blocks first.
    Exact ties go to the first column in that fixed order, which is all the rounds need.
    """
    b, n, w = rows.shape
    blocks = rows.view(b, n, w // block, block)
    sample = torch.arange(b, device=rows.device)[:, None]
    row = torch.arange(n, device=rows.device)
    if w <= 1024:  # lanes: (B, n, block) minima, then the block inside the best lane
        value, lane = blocks.amin(dim=2).min(dim=2)
        inside = blocks.transpose(2, 3)[sample, row, lane]  # (B, n, W / block)
        return value, inside.argmin(dim=2) * block + lane
    value, best = blocks.amin(dim=3).min(dim=2)
    inside = blocks[sample, row, best]  # (B, n, block)
    return value, best * block + inside.argmin(dim=2)


def _lance_williams(
    a: Tensor, b: Tensor, wa: Tensor | None, wb: Tensor | None, linkage: str
) -> Tensor:
    """Distances to ``A ∪ B`` from distances ``a`` to A and ``b`` to B, in place in ``a``.

    complete: ``max``; average: ``wa * a + wb * b`` with ``wa = n_A / (n_A + n_B)`` (``inf``
    stays ``inf``).
    """
    if linkage == "complete":
        return torch.maximum(a, b, out=a)
    return a.mul_(wa).addcmul_(b, wb)


def _pack(mask: Tensor, width: int, fill: int) -> Tensor:
    """Positions of the ``True`` entries of ``mask`` ``(B, N)``, in order, padded with ``fill``.

    Returns ``(B, width)``; ``width`` must be at least the largest count of a row.
    """
    b, n = mask.shape
    rank = torch.where(mask, mask.long().cumsum(dim=1) - 1, width)  # column ``width``: a sink
    out = torch.full((b, width + 1), fill, device=mask.device, dtype=torch.long)
    out.scatter_(1, rank, torch.arange(n, device=mask.device).expand(b, n))
    return out[:, :width]


def _rows(flat: Tensor, index: Tensor, name: str) -> Tensor:
    """Rows ``index`` ``(B, K)`` (flat row numbers) of ``flat`` ``(B*(M+1), W)``:
    ``(B, K, W)`` in scratch memory."""
    b, k = index.shape
    out = scratch(name, (b * k, flat.shape[1]), flat.dtype, flat.device)
    return torch.index_select(flat, 0, index.view(-1), out=out).view(b, k, -1)


def _rnn_rounds(ws: Workspace, r: int, linkage: str, counter: dict):
    """Complete/average linkage: reciprocal-nearest-neighbour rounds, in place on ``ws.d``.

    Returns the merge records ``parent``, ``height``, ``when`` ``(B, M)``: for every absorbed
    token the smallest token of the cluster it joined, the merge distance and the round.
    A cluster lives at the position of its smallest token, so positions are token ids.
    State is ``(B, M+1)``; index ``M`` is a sink that padding reads and writes.

    Dead clusters' columns are not cleared in ``ws.d``: every scan reads a copy of its rows
    and adds ``penalty`` (``inf`` at dead columns). A sample whose ``r`` lowest merges are
    known stops merging, so the other samples' rounds are no wider than they need.
    """
    d, m, block = ws.d, ws.m, ws.block
    b, m1, w = d.shape
    device, dtype = d.device, d.dtype
    flat = d.view(b * m1, w)
    offsets = torch.arange(b, device=device)[:, None] * m1
    pos = torch.arange(m1, device=device).expand(b, m1)
    alive = pos < m
    penalty = torch.zeros(b, w, device=device, dtype=dtype)  # inf at dead and padding columns
    penalty[:, m:] = _INF
    size = torch.ones(b, m1, device=device, dtype=dtype)
    parent = pos.clone()
    height = torch.full((b, m1), _INF, device=device, dtype=dtype)
    when = torch.full((b, m1), m, device=device, dtype=torch.long)
    inf = torch.tensor(_INF, device=device, dtype=dtype)
    dmin, nn = _full_scan(d, alive, block)
    todo = torch.ones(b, 1, device=device, dtype=torch.bool)
    rescanned = False
    while True:
        mutual = (nn.gather(1, nn) == pos) & (pos < nn) & (dmin < _INF)
        if counter["rounds"] > 0:  # a sample is done once r recorded merges are no higher
            todo = (height[:, :m] <= dmin.amin(dim=1, keepdim=True)).sum(dim=1, keepdim=True) < r
            mutual &= todo
        counter["syncs"] += 1
        k, unfinished = torch.stack([mutual.sum(dim=1).max(), todo.sum()]).tolist()
        if unfinished == 0:
            break
        if k == 0:  # an unfinished sample without a reciprocal pair: exact ties in kept
            if not rescanned:  # neighbours, or a matmul's last-bit asymmetry
                dmin, nn = _full_scan(d, alive, block, penalty)
                rescanned = True
                continue
            mutual, nn, dmin = _closest_pair(dmin, nn, pos, todo[:, 0])
            k = 1
        rescanned = False
        i = _pack(mutual, k, fill=m)  # (B, K): i absorbs j = nn[i] (i < j); padding -> sink
        j = nn.gather(1, i)
        parent.scatter_(1, j, i)
        height.scatter_(1, j, dmin.gather(1, i))
        when.scatter_(1, j, counter["rounds"])
        w_i = w_j = None
        if linkage == "average":
            n_i, n_j = size.gather(1, i), size.gather(1, j)
            total = n_i + n_j
            w_i, w_j = (n_i / total)[:, :, None], (n_j / total)[:, :, None]
            size.scatter_(1, i, total)
            size[:, m] = 1.0  # padding merges the sink with itself: keep its weight finite

        new = _lance_williams(
            _rows(flat, i + offsets, "atc.rows_i"),
            _rows(flat, j + offsets, "atc.rows_j"),
            w_i,
            w_j,
            linkage,
        )
        cols_i = i[:, None, :].expand(b, k, k)
        cols_j = j[:, None, :].expand(b, k, k)
        # Merged-to-merged distances combine 4 old clusters; combining rows first or columns
        # first may differ in the last bit for average linkage: keep the smaller, symmetric.
        block4 = _lance_williams(
            new.gather(2, cols_i),
            new.gather(2, cols_j),
            None if w_i is None else w_i.mT,
            None if w_j is None else w_j.mT,
            linkage,
        )
        block4 = torch.minimum(block4, block4.mT)
        block4.diagonal(dim1=1, dim2=2).fill_(_INF)
        new.scatter_(2, cols_i, block4)
        flat.index_copy_(0, (i + offsets).view(-1), new.view(b * k, w))
        columns = scratch("atc.rows_j", (b, m1, k), dtype, device)  # rows_j is spent
        d.scatter_(2, i[:, None, :].expand(b, m1, k), columns.copy_(new[:, :, :m1].mT))
        counter["rounds"] += 1

        alive.scatter_(1, j, False)
        penalty.scatter_(1, j, inf.expand(b, k))
        merged = torch.zeros_like(alive).scatter_(1, i, True).scatter_(1, j, True)
        touched = merged.gather(1, nn) & alive & ~merged  # their nearest neighbour is gone
        value, index = _row_argmin(new.add_(penalty[:, None, :]), block)
        dmin = dmin.scatter_(1, i, value).masked_fill_(~alive, _INF)
        nn = nn.scatter_(1, i, index).masked_fill_(~alive, m)
        counter["syncs"] += 1
        a = int(touched.sum(dim=1).max())
        if a:
            sel = _pack(touched, a, fill=m)  # padding -> the scratch row and the sink entry
            rows = _rows(flat, sel + offsets, "atc.rows_j").add_(penalty[:, None, :])
            value, index = _row_argmin(rows, block)
            dmin.scatter_(1, sel, value)
            nn.scatter_(1, sel, index)
        dmin[:, m] = _INF
        nn[:, m] = m
    return parent[:, :m], height[:, :m], when[:, :m]


def _full_scan(
    d: Tensor, alive: Tensor, block: int, penalty: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Nearest neighbour of every row: ``dmin``, ``nn`` ``(B, M+1)``; dead rows and the sink
    get ``inf`` and point to the sink ``M``. ``penalty`` ``(B, W)``, if given, is added to
    every row (a copy: the start has no dead columns, and later full scans are rare)."""
    m = d.shape[1] - 1
    rows = d[:, :m] if penalty is None else d[:, :m] + penalty[:, None, :]
    value, index = _row_argmin(rows, block)
    dmin = torch.cat([value, torch.full_like(value[:, :1], _INF)], dim=1)
    nn = torch.cat([index, torch.full_like(index[:, :1], m)], dim=1)
    return dmin.masked_fill_(~alive, _INF), torch.where(alive, nn, m)


def _closest_pair(
    dmin: Tensor, nn: Tensor, pos: Tensor, todo: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Force one merge in every sample marked in ``todo`` ``(B,)``: its closest row and that
    row's neighbour.

    Returns ``mutual``, ``nn`` and ``dmin`` with that pair marked at its smaller position.
    Needed only when no reciprocal pair exists, which exact symmetry rules out; a matmul may
    be asymmetric in the last bit, and near-ties may then form longer nearest-neighbour cycles.
    """
    m = pos.shape[1] - 1
    value, x = dmin.min(dim=1, keepdim=True)
    y = nn.gather(1, x)
    has = (value < _INF) & todo[:, None]
    at = torch.where(has, torch.minimum(x, y), m)
    mutual = torch.zeros_like(pos, dtype=torch.bool).scatter_(1, at, has)
    nn = nn.scatter(1, at, torch.where(has, torch.maximum(x, y), m))
    return mutual, nn, dmin.scatter(1, at, value)


def _boruvka_rounds(ws: Workspace, r: int, counter: dict):
    """Single linkage: Borůvka rounds on the rows of ``ws.d``; the columns are never touched.

    Each component's row holds, per token column, the component's distance to that token (the
    minimum over its members' rows), with its own members' columns at ``inf``. A round scans
    the rows (every component's nearest outside token: a minimum-spanning-forest edge), joins
    each component to that token's component, and min-reduces the rows by the new components.
    The components at least halve per round.

    Returns ``parent``, ``height``, ``when`` ``(B, M)`` as :func:`_rnn_rounds`, with the
    representative token of a component in place of the smallest token. Recording the
    representative is exact: a component's members reach its representative through edges
    no higher than any edge leaving the component.
    """
    d, m, block = ws.d, ws.m, ws.block
    b, m1, w = d.shape
    device, dtype = d.device, d.dtype
    tokens = torch.arange(m1, device=device).expand(b, m1)
    parent = tokens.clone()
    height = torch.full((b, m1), _INF, device=device, dtype=dtype)
    when = torch.full((b, m1), m, device=device, dtype=torch.long)
    comp = torch.arange(w, device=device).clamp_(max=m).expand(b, w).clone()  # column -> row
    rep = tokens.clone()  # row -> representative token; the last row is an all-inf sink
    inf = torch.tensor(_INF, dtype=dtype, device=device)
    rows = d
    while True:
        q = rows.shape[1] - 1
        dmin, nearest = _row_argmin(rows, block)  # (B, q+1)
        pos = torch.arange(q + 1, device=device).expand(b, q + 1)
        ptr = torch.where(dmin < _INF, comp.gather(1, nearest), pos)
        if counter["rounds"] > 0:  # done once r recorded merges are no higher than any to come
            counter["syncs"] += 1
            if bool(((height[:, :m] <= dmin.amin(dim=1, keepdim=True)).sum(dim=1) >= r).all()):
                break
        root = _cycle_roots(ptr, pos)
        is_root = root == pos
        absorbed = torch.where(is_root, m, rep)  # non-roots record their edge
        parent.scatter_(1, absorbed, rep.gather(1, ptr))
        height.scatter_(1, absorbed, dmin)
        when.scatter_(1, absorbed, torch.full_like(absorbed, counter["rounds"]))
        counter["rounds"] += 1

        keep = is_root & (pos < q)
        rank = keep.long().cumsum(dim=1) - 1
        counter["syncs"] += 1
        q_new = int(keep.sum(dim=1).max())
        group = torch.where(pos < q, rank.gather(1, root), q_new)  # old row -> new row
        name = "atc.rows_i" if counter["rounds"] % 2 else "atc.rows_j"  # never ``rows``' buffer
        new = scratch(name, (b, q_new + 1, w), dtype, device).fill_(_INF)
        index = (group + torch.arange(b, device=device)[:, None] * (q_new + 1)).view(-1, 1)
        new.view(-1, w).scatter_reduce_(0, index.expand(-1, w), rows.view(-1, w), "amin")
        comp = group.gather(1, comp)
        own = comp[:, :m] * w + torch.arange(m, device=device)  # members' own columns
        new.view(b, -1).scatter_(1, own, inf.expand_as(own))
        rep = torch.full((b, q_new + 1), m, device=device, dtype=torch.long).scatter_(
            1, torch.where(keep, rank, q_new), rep
        )
        rep[:, q_new] = m
        rows = new
    return parent[:, :m], height[:, :m], when[:, :m]


def _cycle_roots(ptr: Tensor, pos: Tensor) -> Tensor:
    """For the functional graph ``x -> ptr[x]`` ``(B, n)``: the smallest node on the cycle
    each node leads to (pointer doubling, ``log2(n)`` steps).

    With exactly symmetric distances and ties to the lowest index every cycle is a reciprocal
    pair; longer cycles (an asymmetric matmul's near-ties) are handled all the same.
    """
    low, hop = pos, ptr
    for _ in range(max(1, math.ceil(math.log2(ptr.shape[1]))) + 1):
        low = torch.minimum(low, low.gather(1, hop))
        hop = hop.gather(1, hop)
    return low.gather(1, hop)


def _cut(parent: Tensor, height: Tensor, when: Tensor, r: int, max_depth: int) -> Tensor:
    """Apply the ``r`` lowest merges (ties: earlier round first) and label the clusters.

    The chosen merges form a forest over tokens (each token is absorbed at most once);
    pointer jumping finds every token's root in ``log2(depth)`` steps. Slots are numbered in
    root order.
    """
    b, m = parent.shape
    tokens = torch.arange(m, device=parent.device).expand(b, m)
    is_edge = height <= height.kthvalue(r, dim=1, keepdim=True).values
    if bool((is_edge.sum(dim=1) != r).any()):  # tied heights at the cut: order by round
        by_round = when.argsort(dim=1, stable=True)
        by_height = height.gather(1, by_round).argsort(dim=1, stable=True)
        chosen = by_round.gather(1, by_height)[:, :r]
        is_edge = torch.zeros_like(parent, dtype=torch.bool).scatter_(1, chosen, True)
    root = torch.where(is_edge, parent, tokens)
    for _ in range(max(1, math.ceil(math.log2(max_depth + 1)))):
        root = root.gather(1, root)
    slot = (root == tokens).long().cumsum(dim=1) - 1
    return slot.gather(1, root)
