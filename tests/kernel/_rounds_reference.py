"""Plain numpy, one sample at a time: how many rounds the kernel's schedule needs.

The kernel must be exact *and* stop as early as its rule allows; a kernel that merges the right
pairs but keeps stale nearest neighbours (or misses reciprocal pairs) still cuts correctly, only
later. These references run the same schedule in the most obvious way, so a test can compare
the kernel's round count with them.
"""

from __future__ import annotations

import numpy as np


def rnn_rounds(dist: np.ndarray, r: int, linkage: str) -> int:
    """Rounds of reciprocal-nearest-neighbour merging (complete/average) until the ``r``
    lowest merges are known: ``r`` recorded heights no higher than the smallest distance left.

    Every round merges all reciprocal pairs (pairs are disjoint; merged one after another with
    Lance-Williams, which for reducible linkages equals merging them at once).
    """
    d = dist.astype(np.float64).copy()
    m = d.shape[0]
    np.fill_diagonal(d, np.inf)
    size = np.ones(m)
    alive = np.ones(m, dtype=bool)
    heights: list[float] = []
    rounds = 0
    while True:
        d[~alive, :] = np.inf
        d[:, ~alive] = np.inf
        nn = d.argmin(axis=1)
        dmin = d[np.arange(m), nn]
        if rounds > 0 and sum(h <= dmin[alive].min() for h in heights) >= r:
            return rounds
        pairs = [(i, int(nn[i])) for i in range(m) if alive[i] and nn[nn[i]] == i and i < nn[i]]
        for i, j in pairs:
            heights.append(float(d[i, j]))
            if linkage == "complete":
                row = np.maximum(d[i], d[j])
            else:
                row = (size[i] * d[i] + size[j] * d[j]) / (size[i] + size[j])
            d[i], d[:, i] = row, row
            d[i, i] = np.inf
            size[i] += size[j]
            alive[j] = False
        rounds += 1


def boruvka_rounds(dist: np.ndarray, r: int) -> int:
    """Rounds of Borůvka (every component joins its nearest outside token) until the ``r``
    lowest minimum-spanning-tree edges are known (single linkage)."""
    d = dist.astype(np.float64).copy()
    m = d.shape[0]
    np.fill_diagonal(d, np.inf)
    comp = np.arange(m)
    edges: list[float] = []
    rounds = 0
    while True:
        labels = np.unique(comp)
        outside = np.where(comp[:, None] == comp[None, :], np.inf, d)
        best = {c: outside[comp == c].min() for c in labels}
        if rounds > 0 and sum(e <= min(best.values()) for e in edges) >= r:
            return rounds
        target = {}
        for c in labels:
            rows = np.flatnonzero(comp == c)
            sub = outside[rows]
            if np.isfinite(sub.min()):
                target[c] = comp[np.unravel_index(sub.argmin(), sub.shape)[1]]
        for c, t in target.items():  # each component's edge once (a reciprocal pair: once)
            if not (target.get(t) == c and t < c):
                edges.append(best[c])
        parent = {c: c for c in labels}
        for c, t in target.items():
            parent[_find(parent, c)] = _find(parent, t)
        comp = np.array([_find(parent, c) for c in comp])
        rounds += 1


def _find(parent: dict, c: int) -> int:
    while parent[c] != c:
        c = parent[c]
    return c
