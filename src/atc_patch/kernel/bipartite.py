"""Bipartite soft matching: ToMe (Bolya et al., 2023) and ToMe-SD's 2-D random variant.

Both split the tokens into sources ``A`` and destinations ``B``, connect every source to its
most similar destination and merge the ``r`` most similar sources. Only the partition is
computed here; the :class:`MergePlan` applies it.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    edge_idx = node_max.argsort(dim=-1, descending=True)
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
def bipartite_random2d_plan(
    metric: Tensor,
    r: int,
    protected: int,
    *,
    h: int | None,
    w: int | None,
    sx: int,
    sy: int,
    no_rand: bool,
    generator: torch.Generator | None,
    pick: Tensor | None = None,
) -> MergePlan:
    """ToMe-SD's ``bipartite_soft_matching_random2d`` on ``metric`` ``(B, h*w, C)``.

    One destination per ``sy x sx`` window (``pick`` ``(h // sy, w // sx)`` if given, else a
    random one drawn from ``generator``, or the top-left one when ``no_rand``); rows/columns
    past the last whole window are sources. Every source is matched to its most similar
    destination and the ``r`` best matches merge (``r`` is clamped to the number of sources).
    Output order as ToMe-SD: unmerged sources by decreasing score, then destinations.
    """
    bsz, n, _ = metric.shape
    if protected:
        raise ValueError("method='tome_sd' merges a full token grid; use protected=0")
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"method='tome_sd' needs the token grid: {name} must be an int >= 1")
    if h * w != n:
        raise ValueError(f"method='tome_sd': h * w = {h} * {w} != {n} tokens in metric")
    for name, v in (("sx", sx), ("sy", sy)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"method='tome_sd': {name} must be an int >= 1, got {v!r}")
    hsy, wsx = h // sy, w // sx
    if r <= 0 or hsy == 0 or wsx == 0:
        return MergePlan.identity(bsz, n, metric.device)
    device = metric.device
    with torch.no_grad():
        if no_rand:
            pick = torch.zeros(hsy, wsx, 1, device=device, dtype=torch.long)
        elif pick is not None:
            pick = pick.to(device=device, dtype=torch.long).reshape(hsy, wsx, 1)
        else:
            gen_device = generator.device if generator is not None else device
            pick = torch.randint(
                sy * sx, size=(hsy, wsx, 1), device=gen_device, generator=generator
            ).to(device)
        # -1 marks the destination of each window, 0 everything else; argsort puts dst first.
        window = torch.zeros(hsy, wsx, sy * sx, device=device, dtype=torch.long)
        window.scatter_(2, pick, -torch.ones_like(pick))
        window = window.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if hsy * sy < h or wsx * sx < w:
            grid = torch.zeros(h, w, device=device, dtype=torch.long)
            grid[: hsy * sy, : wsx * sx] = window
        else:
            grid = window
        order = grid.reshape(1, -1, 1).argsort(dim=1)
        num_dst = hsy * wsx
        a_idx = order[:, num_dst:, 0].expand(bsz, -1)  # sources
        b_idx = order[:, :num_dst, 0].expand(bsz, -1)  # destinations
        x = normalize_tokens(metric)
        a = x.gather(1, a_idx[..., None].expand(-1, -1, x.shape[-1]))
        b = x.gather(1, b_idx[..., None].expand(-1, -1, x.shape[-1]))
        scores = a @ b.transpose(-1, -2)
        r = min(r, a.shape[1])
        labels, slots = _labels_from_matching(a_idx, b_idx, scores, r, False, 0)
    return MergePlan(labels, slots, validate=False)
