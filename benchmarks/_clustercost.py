"""What one ``atc_patch.cluster_tokens`` call costs on a GPU, for a model run on meta tensors.

A clustering call's work depends on the values of its metric (ATC's rounds, host syncs), which
meta tensors do not have, and ATC's fused Triton kernel cannot run on them. So, while
:func:`clustering_on_meta` is active, every ``cluster_tokens`` call on a meta metric is
answered with a shape-only plan (labels ``(B, N)`` without values, the real ``num_out``) and
charged to the :class:`~_costmodel.CostModel` as follows:

* **ATC, fused path** (``backend="triton"``, or ``"auto"`` where it picks the fused path on a
  GPU: at most 1024 free tokens): modelled by formula. The torch prologue of the fused path
  (float32 cast, ``nan_to_num``, norm, clamp, divide, one ``bmm`` for ``-cos``, ``neg_``,
  ``minimum(d, d^T)``: eight ops) runs on meta tensors of the call's shape and is charged
  like any op; the kernel is one launch of ``B`` programs (one per sample, at most ``sms`` at
  once), each running ``r`` sequential merges at ``per_merge_s`` per merge per ``row_block``
  (256) tokens of its row, plus its bytes over the bandwidth (the ``(M, M)`` matrix read once,
  two rows read and a row and a column written per merge, the labels).
  ``torch.ops.atc_patch.atc_labels`` met on meta tensors is charged the same way.
* **every other call** (ATC's torch path, ToMe, ToMe-SD, K-Medoids, DPC-KNN): the library's
  own call runs on a CPU stand-in of the metric (same shape and dtype, standard-normal values,
  the same ``r`` and options) under a ``CostModel(devices={"cpu"})``, so its real op list at
  that ``N`` (every round, every host sync) is charged with GPU constants. The stand-in runs
  once per distinct call (cached) and at a smaller batch when ``B`` full matrices would not
  fit ``proxy_bytes`` (bytes and flops then scaled by ``B / batch run``; launches and syncs
  as run). Host <-> device copies inside such a call (ToMe-SD's destinations drawn on a CPU
  generator) are not seen there.

Example::

    with CostModel(H100) as cm, clustering_on_meta(cm) as calls:
        model(**meta_inputs)
    print(calls.count, cm.totals.seconds_by["cluster"])
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from _costmodel import Charge, CostModel
from _steps import wrapped_cluster_tokens

from atc_patch.kernel import max_reduction
from atc_patch.kernel.ops import resolve_backend
from atc_patch.kernel.plan import MergePlan

FUSED_OP = "atc_patch::atc_labels"
CUDA = torch.device("cuda")
# (call, hardware) -> (charges, num_out, identity) of a CPU stand-in run, for the process.
_PROXY_RUNS: dict[tuple, tuple[list[Charge], int, bool]] = {}


@dataclass
class ClusterCalls:
    """What :func:`clustering_on_meta` saw: calls, and how each was costed."""

    count: int = 0
    how: dict[str, int] = field(default_factory=dict)  # "atc triton (formula)": calls


def fused_kernel_seconds(b: int, m: int, r: int, sms: int, per_merge_s: float, row_block: int):
    """Seconds of the fused kernel's merges: ``ceil(b / sms)`` waves of ``r`` merges, each
    ``per_merge_s`` per ``row_block`` tokens of an ``m``-token row."""
    return math.ceil(b / sms) * r * math.ceil(m / row_block) * per_merge_s


def fused_kernel_bytes(b: int, n: int, m: int, r: int) -> float:
    """HBM bytes of the fused kernel: the float32 ``(m, m)`` matrix read once, 2 rows read and
    a row and a column written per merge, ``(b, n)`` int64 labels written."""
    return float(b * (4 * m * m + r * 4 * 4 * m + 8 * n))


def charge_fused(
    cm: CostModel,
    metric: torch.Tensor,
    r: int,
    protected: int,
    per_merge_s: float,
    row_block: int = 256,
) -> None:
    """Charge the fused ATC path on ``metric`` ``(B, N, C)`` (meta): prologue ops and kernel."""
    b, n, _ = metric.shape
    m = n - protected
    if b == 0 or m < 2 or r <= 0:
        return
    sub = CostModel(cm.hw, record=True)
    with cm.paused(), sub:  # on its own, so that it also works inside cm's dispatch
        free = metric[:, protected:]
        x = torch.nan_to_num(free.float(), nan=0.0, posinf=0.0, neginf=0.0)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        units = x / norm.clamp_min(torch.finfo(torch.float32).tiny)
        d = torch.bmm(units, units.transpose(1, 2)).neg_()
        torch.minimum(d, d.transpose(1, 2))
    cm.replay(sub.charges)
    r = min(r, m - 1)
    cm.charge(
        fused_kernel_bytes(b, n, m, r),
        extra_s=fused_kernel_seconds(b, m, r, cm.hw.sms, per_merge_s, row_block),
    )


def _shape_only(metric: torch.Tensor, num_out: int, identity: bool) -> MergePlan:
    b, n = metric.shape[:2]
    if identity:
        return MergePlan.identity(b, n, metric.device)
    return MergePlan(metric.new_empty((b, n), dtype=torch.long), num_out, validate=False)


def _proxy(
    cm: CostModel,
    original: Any,
    metric: torch.Tensor,
    r: int,
    method: str,
    options: dict[str, Any],
    proxy_bytes: float,
) -> tuple[int, bool]:
    """Run ``original`` on a CPU stand-in of ``metric``; charge its ops; ``(num_out, identity)``."""
    b, n, c = metric.shape
    run_b = max(1, min(b, int(proxy_bytes // max(4 * n * n, 1))))
    key_opts = tuple(sorted((k, repr(v)) for k, v in options.items() if k != "generator"))
    key = (method, run_b, n, c, metric.dtype, r, key_opts, cm.hw)
    if key not in _PROXY_RUNS:
        with cm.paused():
            gen = torch.Generator().manual_seed(0)
            stand_in = torch.randn(run_b, n, c, generator=gen).to(metric.dtype)
            sub = CostModel(cm.hw, devices={"cpu"}, record=True)
            with sub:
                plan = original(stand_in, r, method, **options)
        _PROXY_RUNS[key] = (sub.charges, plan.num_out, plan.is_identity)
    charges, num_out, identity = _PROXY_RUNS[key]
    cm.replay(charges, scale=b / run_b)
    return num_out, identity


@contextmanager
def clustering_on_meta(
    cm: CostModel, per_merge_s: float = 2e-6, proxy_bytes: float = 1.5e9
) -> Iterator[ClusterCalls]:
    """Answer and charge ``cluster_tokens`` calls on meta metrics (see the module doc) while
    active; also charge ``torch.ops.atc_patch.atc_labels`` met on meta tensors."""
    from atc_patch import kernel

    original = kernel.cluster_tokens
    calls = ClusterCalls()

    def charge(metric: torch.Tensor, r: int, method: str, options: dict[str, Any]) -> MergePlan:
        """Charge one call on a meta ``metric`` (``r`` clamped); its shape-only plan."""
        n = metric.shape[1]
        with cm.category("cluster"):
            if method == "atc":
                free = n - options["protected"]
                options = dict(options, backend=resolve_backend(options["backend"], CUDA, free))
                if options["backend"] == "triton":
                    _count(calls, "atc triton (formula)")
                    charge_fused(cm, metric, r, options["protected"], per_merge_s)
                    return _shape_only(metric, n - r, r <= 0)
            _count(calls, f"{method}{' torch' if method == 'atc' else ''} (CPU stand-in)")
            num_out, identity = _proxy(cm, original, metric, r, method, options, proxy_bytes)
            return _shape_only(metric, num_out, identity)

    def on_call(
        original: Any,
        metric: torch.Tensor,
        r: int,
        method: str = "atc",
        linkage: str | None = None,
        protected: int = 0,
        **options: Any,
    ) -> MergePlan:
        if not (isinstance(metric, torch.Tensor) and metric.is_meta):
            return original(metric, r, method, linkage, protected, **options)
        calls.count += 1
        options = dict(options, protected=protected)
        if method == "atc":
            options.update(linkage=linkage, backend=options.get("backend", "auto"))
        elif linkage is not None:
            options["linkage"] = linkage  # (cluster_tokens rejects it: as the real call does)
        r = min(int(r), max_reduction(method, metric.shape[1], protected))
        return charge(metric, r, method, options)

    def fused_op(_: CostModel, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        values = dict(zip((a.name for a in func._schema.arguments), args, strict=False))
        values.update(kwargs)
        metric = values.pop("metric")
        calls.count += 1
        return charge(metric, int(values.pop("r")), "atc", values).labels

    cm.kernels[FUSED_OP] = fused_op
    try:
        with wrapped_cluster_tokens(on_call):
            yield calls
    finally:
        cm.kernels.pop(FUSED_OP, None)


def _count(calls: ClusterCalls, how: str) -> None:
    calls.how[how] = calls.how.get(how, 0) + 1
