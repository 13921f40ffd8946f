"""Exact agglomerative token clustering, batched and on-device (the torch path of ATC).

:func:`agglomerative_labels` gives, per sample, the partition of
``scipy.cluster.hierarchy.linkage`` + ``cut_tree(n_clusters=M - r)`` for single, complete or
average linkage (for distances without ties), computed in parallel rounds on the whole batch:
reciprocal-nearest-neighbour rounds with in-place Lance-Williams updates (complete, average:
:func:`_rnn_rounds`), Borůvka rounds (single: :func:`_boruvka_rounds`), until the ``r`` lowest
merges are known; the cut keeps exactly those. One host read per round plus one (``stats``
counts them); no numpy, no per-sample loop. Rows may differ in ``r`` (a ``(B,)`` tensor) and
hold entries that are not tokens (``valid``), as tiled and masked calls need
(:mod:`~atc_patch.kernel.tiles`). Why the rounds are exact: docs/kernel.md ("ATC: exact,
batched, few rounds")::

    labels = agglomerative_labels(dist, r=8, linkage="average")   # (B, M) in [0, M - 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .scratch import call_scope, scratch
from .threads import with_kernel_threads

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


def agglomerative_labels(
    dist: Tensor,
    r: int | Tensor,
    linkage: str,
    stats: dict | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Cut the ``linkage`` dendrogram of ``dist`` after its ``r`` lowest merges.

    Args:
        dist: ``(B, M, M)`` finite dissimilarities (the diagonal is ignored; an asymmetric
            matrix is read as ``min(d, d^T)``). Any increasing affine map of cosine distance
            (e.g. ``-cos``) gives the same result. Not modified.
        r: merges to apply, ``0 <= r <= M - 1``: an int, or a ``(B,)`` int64 tensor (per row,
            at most the row's real tokens minus one).
        linkage: ``"single"``, ``"complete"`` or ``"average"``.
        stats: if given, filled with ``rounds`` and ``syncs`` (host synchronisations).
        valid: ``(B, M)`` bool, optional: the real tokens of each row (the others never merge).

    Returns:
        ``(B, M)`` int64 labels in ``[0, M - r)``; clusters are numbered in the order of
        their smallest token (with ``valid``: real tokens' clusters only, ``-1`` elsewhere).
    """
    b, m, _ = dist.shape
    ws = Workspace.empty(b, m, dist.dtype, dist.device)
    torch.minimum(dist, dist.mT, out=ws.d[:, :m, :m])
    if valid is not None:
        ws.d[:, :m, :m].masked_fill_(~(valid[:, :, None] & valid[:, None, :]), _INF)
    return agglomerative_labels_ws(ws.finish(), r, linkage, stats, valid)


@with_kernel_threads
def agglomerative_labels_ws(
    ws: Workspace,
    r: int | Tensor,
    linkage: str,
    stats: dict | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """:func:`agglomerative_labels` on a prepared :class:`Workspace` (which it overwrites).

    :func:`~atc_patch.kernel.distance.negative_cosine_workspace` builds one with one matmul,
    exactly symmetric and with ``inf`` rows and columns for the tokens that ``valid`` marks
    as not real (``valid`` here only numbers the slots). Should a row still be asymmetric in
    the last bit, a near-tie that this turns into a nearest-neighbour cycle longer than a pair
    is resolved without stalling (:func:`_closest_pair`).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    b, m = ws.d.shape[0], ws.m
    if b == 0 or (isinstance(r, int) and r <= 0):  # an empty batch, or nothing to merge
        labels = torch.arange(m, device=ws.d.device).expand(b, m).clone()
        return labels if valid is None else number_clusters(labels, valid)
    if isinstance(r, int):
        r = torch.full((b,), r, device=ws.d.device, dtype=torch.long)
    counter = {"rounds": 0, "syncs": 0}
    with call_scope(), torch.inference_mode():  # no autograd bookkeeping on the small ops
        if linkage == "single":
            parent, height, when = _boruvka_rounds(ws, r, counter)
            root = _cut(parent, height, when, r, max_depth=m)
        else:
            parent, height, when = _rnn_rounds(ws, r, linkage, counter)
            root = _cut(parent, height, when, r, max_depth=counter["rounds"])
        labels = number_clusters(root, valid)
    if stats is not None:
        stats.update(counter)
    return labels.clone()  # a normal tensor: callers may use it in autograd graphs


def number_clusters(root: Tensor, valid: Tensor | None = None) -> Tensor:
    """Slots ``(B, M)`` from ``root`` (any member of each token's cluster, ``(B, M)``):
    clusters numbered in the order of their smallest token. With ``valid`` ``(B, M)`` only
    real tokens' clusters are numbered (clusters never mix real and other entries); the
    other entries get ``-1``."""
    b, m = root.shape
    tokens = torch.arange(m, device=root.device).expand(b, m)
    smallest = torch.full_like(root, m).scatter_reduce_(1, root, tokens, "amin")
    first = smallest.gather(1, root)  # each token's cluster's smallest member
    is_first = first == tokens
    if valid is not None:
        is_first &= valid
    slot = (is_first.long().cumsum(dim=1) - 1).gather(1, first)
    return slot if valid is None else slot.masked_fill_(~valid, -1)


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


def _empty_records(d: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge records ``(B, M+1)`` before any merge: ``parent`` (every token its own),
    ``height`` (``inf``) and ``when`` (round ``M``, later than any)."""
    b, m1 = d.shape[:2]
    parent = torch.arange(m1, device=d.device).expand(b, m1).clone()
    height = torch.full((b, m1), _INF, device=d.device, dtype=d.dtype)
    return parent, height, torch.full((b, m1), m, device=d.device, dtype=torch.long)


def _unfinished(height: Tensor, dmin: Tensor, r: Tensor) -> Tensor:
    """``(B, 1)``: samples whose ``r`` ``(B,)`` lowest merges are not known yet.

    They are known once ``r`` recorded merges (``height`` ``(B, M)``) are no higher than the
    smallest distance left (``dmin`` ``(B, n)``): by reducibility no later merge is lower.
    """
    known = (height <= dmin.amin(dim=1, keepdim=True)).sum(dim=1, keepdim=True)
    return known < r[:, None]


def _rnn_rounds(ws: Workspace, r: Tensor, linkage: str, counter: dict):
    """Complete/average linkage: reciprocal-nearest-neighbour rounds, in place on ``ws.d``.

    Returns the merge records ``parent``, ``height``, ``when`` ``(B, M)``: for every absorbed
    token the smallest token of the cluster it joined, the merge distance and the round.
    A cluster lives at the position of its smallest token, so positions are token ids.
    State is ``(B, M+1)``; index ``M`` is a sink that padding reads and writes.

    Dead clusters' columns are not cleared in ``ws.d``: every scan reads a copy of its rows
    and adds ``penalty`` (``inf`` at dead columns). A sample whose ``r`` lowest merges are
    known stops merging; once at most half of a batch of 8 or more is unfinished, the rounds
    go on with those samples only (a copy of their matrices), since late rounds are many
    small operations whose cost grows with the batch. One host read per round.
    """
    m, block = ws.m, ws.block
    st = _RoundState.start(ws.d, m, block, r)
    records = st.parent, st.height, st.when  # the whole batch's; st's may become a subset
    batch = None  # the whole-batch sample of each of st's samples, once a subset
    inf = torch.tensor(_INF, device=st.d.device, dtype=st.d.dtype)
    rescanned = False
    while True:
        b = st.d.shape[0]
        mutual = (st.nn.gather(1, st.nn) == st.pos) & (st.pos < st.nn) & (st.dmin < _INF)
        if counter["rounds"] > 0:
            todo = _unfinished(st.height[:, :m], st.dmin, st.r)
        else:
            todo = (st.r > 0)[:, None]
        mutual &= todo
        touched = _touched(st, mutual)
        counter["syncs"] += 1
        widths = [mutual.sum(dim=1).max(), todo.sum(), touched.sum(dim=1).max()]
        k, unfinished, rescan = torch.stack(widths).tolist()
        if unfinished == 0:
            break
        if b >= 8 and 2 * unfinished <= b:
            # The unfinished samples in order (their count is known: no data-dependent shape).
            keep = (~todo[:, 0]).to(torch.uint8).argsort(stable=True)[:unfinished]
            if batch is not None:
                _write_back(records, batch, st)
            batch = keep if batch is None else batch[keep]
            subsets = counter["subsets"] = counter.get("subsets", 0) + 1
            st = st.subset(keep, name=f"atc.subset{subsets % 2}")  # not the buffer st is in
            continue
        if k == 0:  # an unfinished sample without a reciprocal pair: exact ties in kept
            if not rescanned:  # neighbours, or a last-bit asymmetry
                st.dmin, st.nn = _full_scan(st.d, st.alive, block, st.penalty)
                rescanned = True
                continue
            mutual, st.nn, st.dmin = _closest_pair(st.dmin, st.nn, st.pos, todo[:, 0])
            touched = _touched(st, mutual)
            counter["syncs"] += 1
            k, rescan = 1, int(touched.sum(dim=1).max())
        rescanned = False
        _merge_pairs(st, mutual, k, linkage, counter["rounds"], inf)
        counter["rounds"] += 1
        _rescan(st, touched, rescan)
    if batch is not None:
        _write_back(records, batch, st)
    parent, height, when = records
    return parent[:, :m], height[:, :m], when[:, :m]


def _touched(st: _RoundState, mutual: Tensor) -> Tensor:
    """``(B, M+1)``: the rows that survive the merge of the pairs marked in ``mutual`` (at
    their smaller position) but whose nearest neighbour is one of the merged clusters."""
    merged = mutual.scatter(1, torch.where(mutual, st.nn, st.m), True)
    return merged.gather(1, st.nn) & st.alive & ~merged & (st.dmin < _INF)


@dataclass
class _RoundState:
    """Per-sample state of :func:`_rnn_rounds`: the matrix ``d`` ``(B, M+1, W)`` and
    ``(B, M+1)`` rows: alive, size, nearest neighbour (``dmin``, ``nn``), merge records,
    ``penalty`` ``(B, W)`` (``inf`` at dead and padding columns) and ``r`` ``(B,)``."""

    d: Tensor
    m: int
    block: int
    alive: Tensor
    penalty: Tensor
    size: Tensor
    parent: Tensor
    height: Tensor
    when: Tensor
    dmin: Tensor
    nn: Tensor
    r: Tensor

    @classmethod
    def start(cls, d: Tensor, m: int, block: int, r: Tensor) -> _RoundState:
        """The state before round 0: every token alive, its nearest neighbour scanned."""
        b, m1, w = d.shape
        pos = torch.arange(m1, device=d.device).expand(b, m1)
        alive = pos < m
        penalty = torch.zeros(b, w, device=d.device, dtype=d.dtype)
        penalty[:, m:] = _INF
        dmin, nn = _full_scan(d, alive, block)
        parent, height, when = _empty_records(d, m)
        return cls(
            d=d,
            m=m,
            block=block,
            alive=alive,
            penalty=penalty,
            size=torch.ones(b, m1, device=d.device, dtype=d.dtype),
            parent=parent,
            height=height,
            when=when,
            dmin=dmin,
            nn=nn,
            r=r,
        )

    @property
    def pos(self) -> Tensor:
        return torch.arange(self.d.shape[1], device=self.d.device).expand(self.d.shape[:2])

    @property
    def offsets(self) -> Tensor:
        """``(B, 1)``: the flat row number of each sample's row 0."""
        return torch.arange(self.d.shape[0], device=self.d.device)[:, None] * self.d.shape[1]

    def subset(self, keep: Tensor, name: str) -> _RoundState:
        """The samples ``keep`` ``(b,)``; their matrices are copied into scratch ``name``."""
        d = scratch(name, (keep.numel(), *self.d.shape[1:]), self.d.dtype, self.d.device)
        torch.index_select(self.d, 0, keep, out=d)
        rows = {f: getattr(self, f).index_select(0, keep) for f in _PER_SAMPLE}
        return _RoundState(d=d, m=self.m, block=self.block, **rows)


_PER_SAMPLE = ("alive", "penalty", "size", "parent", "height", "when", "dmin", "nn", "r")


def _write_back(records: tuple[Tensor, Tensor, Tensor], batch: Tensor, st: _RoundState) -> None:
    """Copy the subset ``st``'s merge records into the whole batch's, at samples ``batch``."""
    for full, part in zip(records, (st.parent, st.height, st.when), strict=True):
        full.index_copy_(0, batch, part)


def _merge_pairs(
    st: _RoundState, mutual: Tensor, k: int, linkage: str, round_no: int, inf: Tensor
) -> None:
    """Merge every pair marked in ``mutual`` (at its smaller position; at most ``k`` per
    sample): records, sizes, the merged rows and columns of ``st.d`` (Lance-Williams), and
    the merged rows' neighbours."""
    d, m, block = st.d, st.m, st.block
    b, m1, w = d.shape
    flat, offsets = d.view(b * m1, w), st.offsets
    i = _pack(mutual, k, fill=m)  # (B, K): i absorbs j = nn[i] (i < j); padding -> sink
    j = st.nn.gather(1, i)
    st.parent.scatter_(1, j, i)
    st.height.scatter_(1, j, st.dmin.gather(1, i))
    st.when.scatter_(1, j, round_no)
    w_i = w_j = None
    if linkage == "average":
        n_i, n_j = st.size.gather(1, i), st.size.gather(1, j)
        total = n_i + n_j
        w_i, w_j = (n_i / total)[:, :, None], (n_j / total)[:, :, None]
        st.size.scatter_(1, i, total)
        st.size[:, m] = 1.0  # padding merges the sink with itself: keep its weight finite

    new = _lance_williams(
        _rows(flat, i + offsets, "atc.rows_i"),
        _rows(flat, j + offsets, "atc.rows_j"),
        w_i,
        w_j,
        linkage,
    )
    cols_i = i[:, None, :].expand(b, k, k)
    # Merged-to-merged distances combine 4 old clusters (Lance-Williams once more).
    block4 = _lance_williams(
        new.gather(2, cols_i),
        new.gather(2, j[:, None, :].expand(b, k, k)),
        None if w_i is None else w_i.mT,
        None if w_j is None else w_j.mT,
        linkage,
    )
    if linkage == "average":  # rows first or columns first may differ in the last bit
        block4 = torch.minimum(block4, block4.mT)
    block4.diagonal(dim1=1, dim2=2).fill_(_INF)
    new.scatter_(2, cols_i, block4)
    flat.index_copy_(0, (i + offsets).view(-1), new.view(b * k, w))
    columns = scratch("atc.rows_j", (b, m1, k), d.dtype, d.device)  # rows_j is spent
    d.scatter_(2, i[:, None, :].expand(b, m1, k), columns.copy_(new[:, :, :m1].mT))

    st.alive.scatter_(1, j, False)
    st.penalty.scatter_(1, j, inf.expand(b, k))
    value, index = _row_argmin(new.add_(st.penalty[:, None, :]), block)
    st.dmin = st.dmin.scatter_(1, i, value).masked_fill_(~st.alive, _INF)
    st.nn = st.nn.scatter_(1, i, index).masked_fill_(~st.alive, m)


def _rescan(st: _RoundState, rows_to_scan: Tensor, count: int) -> None:
    """Recompute ``st.dmin`` / ``st.nn`` of the rows marked in ``rows_to_scan`` ``(B, M+1)``,
    at most ``count`` per sample."""
    d, m = st.d, st.m
    b, m1, w = d.shape
    if count:
        sel = _pack(rows_to_scan, count, fill=m)  # padding -> the scratch row and the sink
        rows = _rows(d.view(b * m1, w), sel + st.offsets, "atc.rows_j")
        value, index = _row_argmin(rows.add_(st.penalty[:, None, :]), st.block)
        st.dmin.scatter_(1, sel, value)
        st.nn.scatter_(1, sel, index)
    st.dmin[:, m] = _INF
    st.nn[:, m] = m


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


def _boruvka_rounds(ws: Workspace, r: Tensor, counter: dict):
    """Single linkage: Borůvka rounds on the rows of ``ws.d``; the columns are never touched.

    Each component's row holds, per token column, the component's distance to that token (the
    minimum over its members' rows), with its own members' columns at ``inf``. A round scans
    the rows (every component's nearest outside token: a minimum-spanning-forest edge), joins
    each component to that token's component, and min-reduces the rows by the new components.
    The components at least halve per round. One host read per round (is any sample
    unfinished, and the widest sample's component count, a shape).

    Returns ``parent``, ``height``, ``when`` ``(B, M)`` as :func:`_rnn_rounds`, with the
    representative token of a component in place of the smallest token. Recording the
    representative is exact: a component's members reach its representative through edges
    no higher than any edge leaving the component.
    """
    d, m, block = ws.d, ws.m, ws.block
    b, m1, w = d.shape
    device, dtype = d.device, d.dtype
    parent, height, when = _empty_records(d, m)
    comp = torch.arange(w, device=device).clamp_(max=m).expand(b, w).clone()  # column -> row
    rep = parent.clone()  # row -> representative token; the last row is an all-inf sink
    inf = torch.tensor(_INF, dtype=dtype, device=device)
    rows = d
    while True:
        q = rows.shape[1] - 1
        dmin, nearest = _row_argmin(rows, block)  # (B, q+1)
        pos = torch.arange(q + 1, device=device).expand(b, q + 1)
        ptr = torch.where(dmin < _INF, comp.gather(1, nearest), pos)
        root = _cycle_roots(ptr, pos)
        is_root = root == pos
        keep = is_root & (pos < q)
        if counter["rounds"] > 0:
            go = _unfinished(height[:, :m], dmin, r).any()
        else:
            go = (r > 0).any()
        counter["syncs"] += 1
        go, q_new = torch.stack([go.long(), keep.sum(dim=1).max()]).tolist()
        if not go:
            break
        absorbed = torch.where(is_root, m, rep)  # non-roots record their edge
        parent.scatter_(1, absorbed, rep.gather(1, ptr))
        height.scatter_(1, absorbed, dmin)
        when.scatter_(1, absorbed, counter["rounds"])
        counter["rounds"] += 1

        rank = keep.long().cumsum(dim=1) - 1
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


def _cut(parent: Tensor, height: Tensor, when: Tensor, r: Tensor, max_depth: int) -> Tensor:
    """Apply each sample's ``r`` ``(B,)`` lowest merges (ties: earlier round first, then the
    smaller token) and return every token's root ``(B, M)``.

    The chosen merges form a forest over tokens (each token is absorbed at most once);
    pointer jumping finds every token's root in ``log2(depth)`` steps.
    """
    b, m = parent.shape
    tokens = torch.arange(m, device=parent.device).expand(b, m)
    by_round = when.argsort(dim=1, stable=True)
    by_height = height.gather(1, by_round).argsort(dim=1, stable=True)
    order = by_round.gather(1, by_height)  # tokens by (height, round, index) of their merge
    rank = torch.empty_like(order).scatter_(1, order, tokens)
    root = torch.where(rank < r[:, None], parent, tokens)
    for _ in range(max(1, math.ceil(math.log2(max_depth + 1)))):
        root = root.gather(1, root)
    return root
