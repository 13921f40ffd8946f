"""Evaluation metrics: top-k accuracy (timm's) and multi-label mean average precision."""

from __future__ import annotations

import torch
from torch import Tensor


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each column, as scikit-learn's ``average_precision_score``.

    ``scores`` and ``targets`` are ``(N, C)``; ``targets`` is 0/1. AP is
    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds (tied scores form one
    step). Returns ``(C,)`` float64; ``nan`` for a column without positives.
    """
    scores, targets = scores.double(), (targets > 0).double()
    c = scores.shape[1]
    order = scores.argsort(dim=0, descending=True, stable=True)
    s = scores.gather(0, order)
    t = targets.gather(0, order)
    tp = t.cumsum(0)
    fp = (1 - t).cumsum(0)
    # The last row of each run of equal scores is where the threshold takes effect.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    pos = tp[-1]
    precision = tp / (tp + fp)
    ap = torch.empty(c, dtype=torch.float64)
    for k in range(c):
        rows = last[:, k].nonzero().squeeze(1)
        tp_k = tp[rows, k]
        step = torch.diff(tp_k, prepend=tp_k.new_zeros(1))
        ap[k] = (step * precision[rows, k]).sum() / pos[k] if pos[k] > 0 else float("nan")
    return ap


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mAP in ``[0, 1]`` over the classes that have at least one positive.

    Equals ``sklearn.metrics.average_precision_score(targets, scores, average="macro")``
    restricted to those columns. ``scores`` may be logits or probabilities (AP only uses the
    order). Raises ``ValueError`` if no class has a positive.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and targets must both be (N, C), got {scores.shape}, {targets.shape}"
        )
    ap = average_precision(scores, targets)
    keep = ~ap.isnan()
    if not keep.any():
        raise ValueError("mAP is undefined: no class has a positive target")
    return float(ap[keep].mean())
