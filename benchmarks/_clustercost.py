"""What one ``atc_patch.cluster_tokens`` call costs on a GPU, for a model run on meta tensors.

A clustering call's work depends on the values of its metric (ATC's rounds, host syncs), which
meta tensors do not have, and ATC's fused Triton kernel cannot run on them. So, while
:func:`clustering_on_meta` is active, every ``cluster_tokens`` call on a meta metric is
answered by the kernel itself (on meta it returns a shape-only plan: labels ``(B, N)`` without
values, the real ``num_out``) and charged to the :class:`~_costmodel.CostModel` as follows:

* **ATC, fused path** (``backend="triton"``, or ``"auto"`` where it picks the fused path on a
  GPU: rows of at most 1024 tokens): the kernel's own torch ops run on meta tensors of the
  call's shapes and are charged like any op (the rows: a sample's free tokens, or with
  ``tile``/``mask`` the gather into ``(R, L, C)`` rows and the write back of the labels; the
  prologue: float32 cast, ``nan_to_num``, norm, clamp, divide, one ``baddbmm`` for ``-cos``,
  ``minimum(d, d^T)``); the Triton kernel is one launch of ``R`` programs, one per row, at
  most ``sms`` at once, each running its row's ``r_t`` sequential merges at ``per_merge_s``
  per merge per ``row_block`` (256) tokens of the row, plus its bytes over the bandwidth (the
  ``(L, L)`` matrix read once, two rows read and a row and a column written per merge, the
  labels). Time: ``ceil(R / sms) * max_t(r_t) * ceil(L / row_block) * per_merge_s``.
  ``torch.ops.atc_patch.atc_labels`` met on meta tensors is charged the same way.
* **every other call** (ATC's torch path, ToMe, ToMe-SD, K-Medoids, DPC-KNN): the library's
  own call runs on a CPU stand-in of the metric (same shape and dtype, standard-normal values,
  the same ``r`` and options; a meta tensor among the options, ToMe-SD's ``pick`` or a
  ``mask``, by its shadow values where the cost model has them, else zeros / all-true) under a
  ``CostModel(devices={"cpu"})``, so its real op list at that ``N`` (every round, every host
  sync) is charged with GPU constants. The stand-in runs once per distinct call (cached) and
  at a smaller batch when ``B`` full matrices would not fit ``proxy_bytes`` (bytes and flops
  then scaled by ``B / batch run``; launches and syncs as run). Host <-> device copies inside
  such a call (ToMe-SD's destinations drawn on a CPU generator) are not seen there.

Example::

    with CostModel(H100) as cm, clustering_on_meta(cm) as calls:
        model(**meta_inputs)
    print(calls.count, max(calls.launches), cm.totals.seconds_by["cluster"])
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

from atc_patch.kernel.ops import atc_labels_impl, resolve_backend
from atc_patch.kernel.plan import MergePlan
from atc_patch.kernel.tiles import build_rows, row_cap, split_r, tile_grid
from atc_patch.kernel.triton_atc import symmetric_neg_cosine

FUSED_OP = "atc_patch::atc_labels"
CUDA = torch.device("cuda")
# (call, hardware) -> charges of a CPU stand-in run, for the process.
_PROXY_RUNS: dict[tuple, list[Charge]] = {}


@dataclass
class ClusterCalls:
    """What :func:`clustering_on_meta` saw: calls, how each was costed, and the launches and
    host syncs of each call (in call order)."""

    count: int = 0
    how: dict[str, int] = field(default_factory=dict)  # "atc triton (formula)": calls
    launches: list[int] = field(default_factory=list)
    syncs: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # N of each call (its token resolution)


def fused_kernel_seconds(
    rows: int, length: int, r: int, sms: int, per_merge_s: float, row_block: int = 256
) -> float:
    """Seconds of the fused kernel's merges: ``ceil(rows / sms)`` waves of (at most) ``r``
    sequential merges, each ``per_merge_s`` per ``row_block`` tokens of a ``length``-token
    row."""
    return math.ceil(rows / sms) * r * math.ceil(length / row_block) * per_merge_s


def fused_kernel_bytes(rows: int, length: int, r: int) -> float:
    """HBM bytes of the fused kernel: per row the float32 ``(L, L)`` matrix read once, 2 rows
    read and a row and a column written per merge, ``L`` int64 labels written."""
    return float(rows * (4 * length * length + r * 4 * 4 * length + 8 * length))


def charge_kernel(
    cm: CostModel, x: torch.Tensor, r_rows: list[int], per_merge_s: float, row_block: int = 256
) -> torch.Tensor:
    """Charge the fused path on rows ``x`` ``(R, L, C)`` (meta) with ``r_rows`` merges per row:
    its prologue ops (run on meta, charged by ``cm``) and its one kernel launch. Returns the
    ``(R, L)`` int64 labels (meta, no values)."""
    rows, length, _ = x.shape
    out = x.new_empty((rows, length), dtype=torch.long)
    if rows == 0 or length < 2:
        return out
    d = symmetric_neg_cosine(x)
    d.new_empty((rows, length))  # the kernel's dmin scratch (an allocation)
    r = max(min(max(r_rows, default=0), length - 1), 0)
    cm.charge(
        fused_kernel_bytes(rows, length, r),
        extra_s=fused_kernel_seconds(rows, length, r, cm.hw.sms, per_merge_s, row_block),
    )
    return out


def charge_fused(
    cm: CostModel,
    metric: torch.Tensor,
    r: int,
    protected: int,
    per_merge_s: float,
    grid: tuple[int, ...] | None = None,
    tile: tuple[int, ...] | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """Charge ATC's fused path on ``metric`` ``(B, N, C)`` (meta; ``r`` already clamped) as
    ``cluster_tokens`` runs it: one row per sample, or the rows of its tiles and mask."""
    b, n, _ = metric.shape
    p = protected
    if tile is None and mask is None:
        torch.full((b,), r, device=metric.device, dtype=torch.long)  # the op's r (B,)
        labels = charge_kernel(cm, metric[:, p:], [r] * b, per_merge_s)
        if p:
            fixed = torch.arange(p, device=metric.device).expand(b, p)
            torch.cat([fixed, labels + p], dim=1)
        return
    grid = tuple(grid) if grid is not None else (n - p,)
    tile = tuple(tile) if tile is not None else None
    args = (metric, r, "atc", p, grid, tile, mask)
    with cm.paused():
        build_rows(*args)  # the shape-only index tensors: made once per signature, kept
    rows = build_rows(*args)
    sizes = tile_grid(grid, tile).sizes
    r_tile = split_r(r, [row_cap("atc", s, mask is not None) for s in sizes])
    per_sample = r_tile * (2 if mask is not None else 1)  # masked: real and padding rows
    labels = charge_kernel(cm, rows.x, per_sample * b, per_merge_s)
    rows.write(labels, n)


def _stand_in(cm: CostModel, value: Any) -> Any:
    """A CPU stand-in for a meta tensor among a call's options: its shadow values if known,
    else zeros (all-true for a bool mask)."""
    if not (isinstance(value, torch.Tensor) and value.is_meta):
        return value
    shadow = cm.shadows.get(value)
    if shadow is not None:
        return shadow.clone()
    if value.dtype == torch.bool:
        return torch.ones(value.shape, dtype=torch.bool)
    return torch.zeros(value.shape, dtype=value.dtype)


def _proxy(
    cm: CostModel,
    original: Any,
    metric: torch.Tensor,
    r: int,
    method: str,
    options: dict[str, Any],
    proxy_bytes: float,
) -> None:
    """Run ``original`` on a CPU stand-in of ``metric`` and charge its ops."""
    b, n, c = metric.shape
    rows = options.get("grid") and options.get("tile")
    square = max(tile_grid(tuple(options["grid"]), tuple(options["tile"])).length, 1) if rows else n
    run_b = max(1, min(b, int(proxy_bytes // max(4 * n * square, 1))))
    options = {k: _stand_in(cm, v) for k, v in options.items()}
    key_opts = tuple(sorted((k, repr(v)) for k, v in options.items() if k != "generator"))
    key = (method, run_b, n, c, metric.dtype, r, key_opts, cm.hw)
    if key not in _PROXY_RUNS:
        with cm.paused():
            gen = torch.Generator().manual_seed(0)
            stand_in = torch.randn(run_b, n, c, generator=gen).to(metric.dtype)
            sub = CostModel(cm.hw, devices={"cpu"}, record=True)
            if isinstance(options.get("mask"), torch.Tensor):
                options["mask"] = options["mask"][:run_b]
            with sub:
                original(stand_in, r, method, **options)
        _PROXY_RUNS[key] = sub.charges
    cm.replay(_PROXY_RUNS[key], scale=b / run_b)


def _row_length(n: int, protected: int, options: dict[str, Any]) -> int:
    """Tokens per row of an ATC call: a tile's (the largest), else the sample's free tokens."""
    tile, grid = options.get("tile"), options.get("grid")
    if tile is not None and grid is not None:
        return tile_grid(tuple(grid), tuple(tile)).length
    return n - protected


@contextmanager
def clustering_on_meta(
    cm: CostModel, per_merge_s: float = 2e-6, proxy_bytes: float = 1.5e9
) -> Iterator[ClusterCalls]:
    """Answer and charge ``cluster_tokens`` calls on meta metrics (see the module doc) while
    active; also charge ``torch.ops.atc_patch.atc_labels`` met on meta tensors."""
    calls = ClusterCalls()

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
        with cm.paused():  # checks the call; on meta: a shape-only plan
            plan = original(metric, r, method, linkage, protected, **options)
        calls.count += 1
        launches, syncs = cm.totals.launches, cm.totals.syncs
        b, n, _ = metric.shape
        calls.tokens.append(n)
        r = n - plan.num_out
        with cm.category("cluster"):
            if plan.is_identity:
                _count(calls, "nothing to merge")
            elif method == "atc" and _fused(options, n, protected):
                _count(calls, "atc triton (formula)")
                grid, tile, mask = (options.get(k) for k in ("grid", "tile", "mask"))
                charge_fused(cm, metric, r, protected, per_merge_s, grid, tile, mask)
            else:
                _count(calls, f"{method}{' torch' if method == 'atc' else ''} (CPU stand-in)")
                opts = dict(options, protected=protected)
                if linkage is not None:
                    opts["linkage"] = linkage
                _proxy(cm, original, metric, r, method, opts, proxy_bytes)
        calls.launches.append(cm.totals.launches - launches)
        calls.syncs.append(cm.totals.syncs - syncs)
        return plan

    def fused_op(_: CostModel, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        values = dict(zip((a.name for a in func._schema.arguments), args, strict=False))
        values.update(kwargs)
        x, valid, r = values["x"], values["valid"], values["r"]
        calls.count += 1
        launches, syncs = cm.totals.launches, cm.totals.syncs
        calls.tokens.append(x.shape[1])
        shadow = cm.shadows.get(r)
        rows, length = x.shape[:2]
        r_rows = shadow.tolist() if shadow is not None else [length - 1] * rows
        sub = CostModel(cm.hw, record=True)
        with cm.paused(), sub:  # on its own, so that it also works inside cm's dispatch
            if resolve_backend(values["backend"], CUDA, length) == "triton":
                _count(calls, "atc triton (formula)")
                out = charge_kernel(sub, x, r_rows, per_merge_s)
            else:
                _count(calls, "atc torch (CPU stand-in)")
                out = _op_proxy(sub, x, valid, r_rows, values["linkage"])
        with cm.category("cluster"):
            cm.replay(sub.charges)
        calls.launches.append(cm.totals.launches - launches)
        calls.syncs.append(cm.totals.syncs - syncs)
        return out

    cm.kernels[FUSED_OP] = fused_op
    try:
        with wrapped_cluster_tokens(on_call):
            yield calls
    finally:
        cm.kernels.pop(FUSED_OP, None)


def _fused(options: dict[str, Any], n: int, protected: int) -> bool:
    """Whether an ATC call takes the fused path on a GPU (``backend`` resolved for CUDA)."""
    length = _row_length(n, protected, options)
    return resolve_backend(options.get("backend", "auto"), CUDA, length) == "triton"


def _op_proxy(
    sub: CostModel, x: torch.Tensor, valid: torch.Tensor | None, r_rows: list[int], linkage: str
) -> torch.Tensor:
    """The op's torch path on CPU stand-ins of its rows, charged to ``sub`` (as if on a GPU)."""
    rows, length, c = x.shape
    stand_in = torch.randn(rows, length, c, generator=torch.Generator().manual_seed(0))
    cpu = CostModel(sub.hw, devices={"cpu"}, record=True)
    with sub.paused(), cpu:
        ok = None if valid is None else torch.ones(rows, length, dtype=torch.bool)
        atc_labels_impl(stand_in.to(x.dtype), ok, torch.tensor(r_rows), linkage, "torch")
    sub.replay(cpu.charges)
    return x.new_empty((rows, length), dtype=torch.long)


def _count(calls: ClusterCalls, how: str) -> None:
    calls.how[how] = calls.how.get(how, 0) + 1
