"""Bipartite soft matching: ToMe (Bolya et al., 2023) and ToMe-SD's random grid variant.

Both split the tokens into sources ``A`` and destinations ``B``, connect every source to its
most similar destination and merge the ``r`` most similar sources. Only the partition is
computed here; the :class:`MergePlan` applies it. Ties between equal scores go to the smaller
index (stable sorts), whatever else is in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .atc import number_clusters
from .distance import normalize_tokens
from .plan import MergePlan
from .threads import with_kernel_threads


def _labels_from_matching(
    a_idx: Tensor, b_idx: Tensor, scores: Tensor, r: int, sort_unmerged: bool, offset: int
) -> tuple[Tensor, int]:
    """Slots for the ``A`` (``a_idx``, ``(B, Na)``) and ``B`` (``b_idx``, ``(B, Nb)``) tokens.

    ``scores`` is ``(B, Na, Nb)``. Output order: unmerged ``A`` tokens (by index when
    ``sort_unmerged``, else by decreasing best score as ToMe-SD leaves them), then ``B``.
    Returns ``(labels of the A+B tokens in token order, number of slots)`` with slots shifted
    by ``offset``.
    """
    bsz, na = scores.shape[:2]
    nb = scores.shape[2]
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    if sort_unmerged:
        unm_idx = unm_idx.sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)
    n_unm = na - r
    n = na + nb
    a_slot = torch.empty(bsz, na, dtype=torch.long, device=scores.device)
    a_slot.scatter_(1, unm_idx, torch.arange(n_unm, device=scores.device).expand(bsz, n_unm))
    a_slot.scatter_(1, src_idx, n_unm + dst_idx)
    b_slot = n_unm + torch.arange(nb, device=scores.device).expand(bsz, nb)
    labels = torch.empty(bsz, n, dtype=torch.long, device=scores.device)
    labels.scatter_(1, a_idx, a_slot + offset)
    labels.scatter_(1, b_idx, b_slot + offset)
    return labels, n_unm + nb


@with_kernel_threads
def bipartite_plan(metric: Tensor, r: int, protected: int) -> MergePlan:
    """ToMe's ``bipartite_soft_matching`` on ``metric`` ``(B, N, C)``.

    ``A`` are the unprotected tokens at even positions and ``B`` those at odd positions
    (ToMe's ``a, b = metric[..., ::2, :], metric[..., 1::2, :]`` with the class/distillation
    tokens left out instead of scored ``-inf``). ``r`` must not exceed ``|A|`` nor half the
    unprotected tokens. Output order: protected tokens, unmerged ``A`` tokens, ``B``. As in
    ToMe, unmerged ``A`` tokens are sorted by index when there are protected tokens (ToMe's
    ``class_token=True``) and stay in decreasing-score order otherwise; the order decides the
    ``A``/``B`` split of the next reduction.
    """
    bsz, n, _ = metric.shape
    with torch.no_grad():
        x = normalize_tokens(metric)
        first_a = protected + protected % 2
        a_pos = torch.arange(first_a, n, 2, device=metric.device)
        b_pos = torch.arange(
            first_a + 1 if first_a == protected else protected, n, 2, device=metric.device
        )
        scores = x[:, a_pos] @ x[:, b_pos].transpose(-1, -2)
        labels, slots = _labels_from_matching(
            (a_pos - protected).expand(bsz, -1),
            (b_pos - protected).expand(bsz, -1),
            scores,
            r,
            sort_unmerged=protected > 0,
            offset=protected,
        )
        if protected:
            fixed = torch.arange(protected, device=metric.device).expand(bsz, protected)
            labels = torch.cat([fixed, labels], dim=1)
    return MergePlan(labels, protected + slots, validate=False)


@with_kernel_threads
def bipartite_rows(x: Tensor, valid: Tensor | None, r: Tensor) -> Tensor:
    """ToMe inside each row of ``x`` ``(R, L, C)`` (a tile, or the real or padding tokens of
    one): ``A`` = the row's real tokens at even places in their order, ``B`` = those at odd
    places; every ``A`` token's most similar ``B`` token; the ``r`` ``(R,)`` best ``A`` tokens
    merge into theirs (``r`` at most half the row's real tokens).

    Returns local labels ``(R, L)`` numbered by each cluster's smallest token, ``-1`` for
    entries that are not real tokens (``valid`` ``(R, L)``; ``None``: all are).
    """
    rows, length, _ = x.shape
    tokens = torch.arange(length, device=x.device)
    with torch.no_grad():
        units = normalize_tokens(x)
        scores = units @ units.transpose(-1, -2)
        place = tokens if valid is None else valid.long().cumsum(dim=1) - 1
        odd = place % 2 == 1
        is_a, is_b = (~odd, odd) if valid is None else (valid & ~odd, valid & odd)
        scores.masked_fill_(~(is_a[..., :, None] & is_b[..., None, :]), -float("inf"))
        best, dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, tokens.expand(rows, length))
        root = torch.where(rank < r[:, None], dst, tokens)
        return number_clusters(root, valid)


@with_kernel_threads
def bipartite_random_grid_plan(
    metric: Tensor,
    r: int,
    grid: tuple[int, int, int],
    window: tuple[int, int, int],
    no_rand: bool,
    generator: torch.Generator | None,
    pick: Tensor | None = None,
) -> MergePlan:
    """ToMe-SD's ``bipartite_soft_matching_random2d`` on ``metric`` ``(B, t*h*w, C)``, in 3-D.

    ``grid`` is ``(t, h, w)`` (``t = 1`` for an image) and ``window`` ``(st, sy, sx)``: one
    destination per ``st x sy x sx`` window (``pick``, one entry per window, if given; else a
    random one drawn from ``generator``, or the first one when ``no_rand``); frames, rows and
    columns past the last whole window are sources. Every source is matched to its most
    similar destination and the ``r`` best matches merge (``r`` is clamped to the number of
    sources). Output order as ToMe-SD: unmerged sources by decreasing score, then
    destinations. For ``t = st = 1`` this is
    ``tomesd``'s function, draws included (``(h // sy, w // sx, 1)`` values in ``[0, sy * sx)``).
    """
    bsz, n, _ = metric.shape
    (t, h, w), (st, sy, sx) = grid, window
    tst, hsy, wsx = t // st, h // sy, w // sx
    if r <= 0 or tst == 0 or hsy == 0 or wsx == 0:
        return MergePlan.identity(bsz, n, metric.device)
    device = metric.device
    with torch.no_grad():
        if no_rand:
            pick = torch.zeros(tst, hsy, wsx, 1, device=device, dtype=torch.long)
        elif pick is not None:
            pick = pick.to(device=device, dtype=torch.long).reshape(tst, hsy, wsx, 1)
        else:
            gen_device = generator.device if generator is not None else device
            pick = torch.randint(
                st * sy * sx, size=(tst, hsy, wsx, 1), device=gen_device, generator=generator
            ).to(device)
        # -1 marks the destination of each window, 0 everything else; argsort puts dst first.
        window_ids = torch.zeros(tst, hsy, wsx, st * sy * sx, device=device, dtype=torch.long)
        window_ids.scatter_(3, pick, -torch.ones_like(pick))
        window_ids = window_ids.view(tst, hsy, wsx, st, sy, sx).permute(0, 3, 1, 4, 2, 5)
        window_ids = window_ids.reshape(tst * st, hsy * sy, wsx * sx)
        if tst * st < t or hsy * sy < h or wsx * sx < w:
            ids = torch.zeros(t, h, w, device=device, dtype=torch.long)
            ids[: tst * st, : hsy * sy, : wsx * sx] = window_ids
        else:
            ids = window_ids
        order = ids.reshape(1, -1, 1).argsort(dim=1)
        num_dst = tst * hsy * wsx
        a_idx = order[:, num_dst:, 0].expand(bsz, -1)  # sources
        b_idx = order[:, :num_dst, 0].expand(bsz, -1)  # destinations
        x = normalize_tokens(metric)
        a = x.gather(1, a_idx[..., None].expand(-1, -1, x.shape[-1]))
        b = x.gather(1, b_idx[..., None].expand(-1, -1, x.shape[-1]))
        scores = a @ b.transpose(-1, -2)
        r = min(r, a.shape[1])
        labels, slots = _labels_from_matching(a_idx, b_idx, scores, r, False, 0)
    return MergePlan(labels, slots, validate=False)


def random_grid_cap(n: int, grid: tuple[int, int, int], window: tuple[int, int, int]) -> int:
    """The most ToMe-SD removes from ``n = t*h*w`` tokens: every source (0 if no window fits)."""
    windows = 1
    for g, s in zip(grid, window, strict=True):
        windows *= g // s
    return n - windows if windows else 0
