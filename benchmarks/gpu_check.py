"""The GPU check: one command on a lent GPU (H100 / H200), within ``--budget`` seconds (9 min).

    python benchmarks/gpu_check.py OUT_DIR                      # on a CUDA machine
    python benchmarks/gpu_check.py OUT_DIR --sections steps     # the step times only
    python benchmarks/gpu_check.py OUT_DIR --smoke    # tiny sizes; on the CPU the fused path
                                                      # runs under Triton's interpreter

Writes ``OUT_DIR/gpu_check.csv`` (every measurement), ``OUT_DIR/gpu_check.md`` (the tables) and
``OUT_DIR/gpu_steps.csv`` (section 4 in ``benchmarks/gpu_model.py``'s columns). Times are
medians of many runs after warm-up, with the spread (25th-75th percentile), taken with CUDA
events on a GPU (``time.perf_counter`` on the CPU). Sections:

1. exactness: the fused path (``backend="triton"``) against scipy ``linkage`` + ``cut_tree``
   on ~60 random float64 cases (every linkage, protected 0-2, r from 0 to the maximum), and the
   float32 agreement rate;
2. one ``cluster_tokens`` call at B in {1, 64, 256}, N in {197, 577, 1025, 4096}, each
   linkage: fused, torch, ToMe's plan, and the reference per-sample scikit-learn loop from
   CUDA tensors where its estimate fits the time left; kernel launches and host syncs per
   call (profiler);
3. DeiT-S / DeiT-B (random init, bf16, batch 256): images/s unpatched, ToMe, ATC (each
   linkage) at keep 0.7 @ 3,6,9, eager and ``torch.compile(mode="reduce-overhead")`` (as the
   time budget allows), and ATC's clustering time as a share of the patched forward;
4. steps: the setups and rows that ``benchmarks/gpu_model.py`` models (``benchmarks/_steps.py``:
   SD-1.5 512²/1024², SDXL 1024², Flux 1024²/2048², batch 2 then 1, DeiT-S batch 256; real
   configurations, random init, bf16, unpatched SDPA as the baseline): ms per model call,
   ratio to the unpatched call of the same round (median and spread over interleaved
   rounds), launches and host syncs (profiler: CUDA kernels, ``cudaStreamSynchronize`` /
   ``cudaEventSynchronize`` / blocking ``cudaMemcpy``), clustering calls; rows that force the
   untiled fused kernel on more than ``--max_fused_tokens`` (4096) tokens are skipped. Join
   ``gpu_steps.csv`` with ``gpu_model.csv`` on ``(model, resolution, batch, label)``: measured
   vs modelled, which calibrates the model's per-merge latency. Within a setup the unpatched
   and the recommended rows (``_steps.RECOMMENDED``) go first; then the unpatched and the
   recommended rows again under ``torch.compile(fullgraph=True, mode="reduce-overhead")``
   (CUDA graphs), labelled ``"<label> [reduce-overhead]"``, while the time allows.

Each section has a share of the budget; what does not fit is written as ``skipped (time)``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from _steps import (  # noqa: E402
    COLUMNS,
    RECOMMENDED,
    SETUPS,
    TINY_SETUPS,
    Row,
    Setup,
    apply_row,
    at_step,
    build,
    call,
    counted_cluster_calls,
    move,
    record,
    rows_for,
)

import atc_patch  # noqa: E402
from atc_patch.demo.argtypes import positive_int  # noqa: E402

LINKAGES = ("single", "complete", "average")
SYNC_EVENTS = ("aten::_local_scalar_dense",)  # host syncs seen on the CPU (item() calls it)
# On a GPU: the runtime calls that wait for the device (our own closing cudaDeviceSynchronize
# is not counted).
CUDA_SYNC_EVENTS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SECTIONS = ("exactness", "kernel", "deit", "steps")
SHARES = {"exactness": 0.05, "kernel": 0.25, "deit": 0.2, "steps": 0.5}  # of --budget


class Clock:
    """Median / spread of many calls: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
        """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            out = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
            return out
        events = [(torch.cuda.Event(True), torch.cuda.Event(True)) for _ in range(runs)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    def adaptive(self, fn: Callable[[], object], budget_s: float, lo: int = 3, hi: int = 50):
        """Time ``fn`` with as many runs as fit ``budget_s`` (between ``lo`` and ``hi``)."""
        first = self.run(fn, 1, 1)[0]
        runs = int(min(hi, max(lo, budget_s * 1e3 / max(first, 1e-3))))
        return self.run(fn, runs, 1)


def stats(ms: list[float]) -> dict:
    q = np.percentile(ms, [25, 50, 75])
    return {"median_ms": round(q[1], 4), "q25_ms": round(q[0], 4), "q75_ms": round(q[2], 4)}


def counts(fn: Callable[[], object], device: torch.device) -> dict:
    """Kernel launches (GPU kernels; top-level aten ops on the CPU) and host syncs of a call."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = list(prof.events())
    syncs = sum(e.name in SYNC_EVENTS for e in events)
    if device.type == "cuda":
        syncs = sum(e.name in CUDA_SYNC_EVENTS for e in events)
        cuda = torch.autograd.DeviceType.CUDA
        launches = sum(
            e.device_type == cuda and not e.name.startswith(("Memcpy", "Memset")) for e in events
        )
    else:
        launches = sum(e.cpu_parent is None and e.name.startswith("aten::") for e in events)
    return {"launches": launches, "syncs": syncs}


def same_partition(a, b) -> bool:
    a, b = np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()
    pairs = set(zip(a, b, strict=True))
    return len(a) == len(b) and len(pairs) == len(set(a)) == len(set(b))


def scipy_cut(x: torch.Tensor, method: str, k: int) -> np.ndarray:
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform

    x = x.double().cpu().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return cut_tree(linkage(squareform(d, checks=False), method=method), n_clusters=k)[:, 0]


def sklearn_loop(metric: torch.Tensor, k: int, linkage: str) -> list:
    """The reference code's clustering: per sample, to the CPU, scikit-learn."""
    from sklearn.cluster import AgglomerativeClustering

    out = []
    for sample in metric:
        x = sample.detach().float().cpu().numpy()
        out.append(AgglomerativeClustering(k, metric="cosine", linkage=linkage).fit(x).labels_)
    return out


# --- sections -----------------------------------------------------------------------------------


def exactness(device: torch.device, smoke: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype, cases in ((torch.float64, 6 if smoke else 60), (torch.float32, 3 if smoke else 30)):
        agree = total = 0
        for c in range(cases):
            name = LINKAGES[c % 3]
            b = 1 + c % 3
            n = int(torch.randint(2, 24 if smoke else 300, (1,), generator=gen))
            p = min(c % 3, n - 2)
            m = n - p
            r = [0, m - 1][c % 2] if c % 5 == 0 else int(torch.randint(0, m, (1,), generator=gen))
            metric = torch.randn(b, n, 32, generator=gen, dtype=dtype)
            plan = atc_patch.cluster_tokens(
                metric.to(device), r, linkage=name, protected=p, backend="triton"
            )
            labels = plan.labels.cpu()
            ok = torch.equal(labels[:, :p], torch.arange(p).expand(b, p))
            for i in range(b):
                ok = ok and same_partition(labels[i, p:], scipy_cut(metric[i, p:], name, m - r))
            agree += ok
            total += 1
        what = "exact (float64)" if dtype == torch.float64 else "agreement (float32)"
        rows.append({"section": "exactness", "name": what, "agree": agree, "cases": total})
    return rows


def kernel_calls(device: torch.device, smoke: bool, clock: Clock, deadline: float) -> list[dict]:
    batches = (1, 2) if smoke else (1, 64, 256)
    sizes = (9, 20) if smoke else (197, 577, 1025, 4096)
    rows = []
    for n in sizes:
        p = 0 if n == 4096 else 1
        r = (n - p) - int(0.7 * (n - p))
        for b in batches:
            metric = torch.randn(b, n, 64, device=device, dtype=torch.float32)
            for name in LINKAGES:
                fns = {
                    fw: functools.partial(
                        atc_patch.cluster_tokens, metric, r, linkage=name, protected=p, backend=fw
                    )
                    for fw in ("triton", "torch")
                }
                if name == "average":  # ToMe's plan does not depend on the linkage
                    fns["tome"] = functools.partial(
                        atc_patch.cluster_tokens, metric, r, "tome", protected=p
                    )
                for fw, fn in fns.items():
                    row = {"section": "kernel", "name": fw, "B": b, "N": n, "r": r, "linkage": name}
                    if time.monotonic() > deadline:
                        rows.append({**row, "note": "skipped (time)"})
                        continue
                    first = clock.run(fn, 1, 1)
                    if first[0] * 8e-3 > deadline - time.monotonic():  # one slow call: keep it
                        rows.append({**row, **stats(first), "note": "1 run (time)"})
                        continue
                    row.update(stats(clock.adaptive(fn, 0.05 if smoke else 0.4)))
                    row.update(counts(fn, device))
                    rows.append(row)
                # sklearn: estimate from one sample, run the whole loop only if it fits.
                row = {"section": "kernel", "name": "sklearn", "B": b, "N": n, "r": r}
                row["linkage"] = name
                t = time.perf_counter()
                sklearn_loop(metric[:1, p:], n - p - r, name)
                estimate = (time.perf_counter() - t) * b
                if estimate < min(3.0, deadline - time.monotonic() - 1):
                    loop = functools.partial(sklearn_loop, metric[:, p:], n - p - r, name)
                    row.update(stats(clock.run(loop, 2, 0)))
                else:
                    row.update({"note": f"skipped (estimated {estimate:.1f} s per call)"})
                rows.append(row)
            del metric
    return rows


def deit(device: torch.device, smoke: bool, clock: Clock, deadline: float) -> list[dict]:
    import timm

    models = (
        ("vit_tiny_patch16_224",) if smoke else ("deit_small_patch16_224", "deit_base_patch16_224")
    )
    batch, img = (2, 64) if smoke else (256, 224)
    dtype = torch.float32 if smoke else torch.bfloat16
    configs = [("unpatched", None, {})] + [("tome", "tome", {})]
    configs += [(f"atc_{k}", "atc", {"linkage": k}) for k in LINKAGES]
    schedule = {"keep_rate": 0.7, "reduction_loc": (0, 1) if smoke else (3, 6, 9)}
    rows = []
    for model_name in models:
        kw = {"img_size": img, "depth": 2} if smoke else {}
        base = timm.create_model(model_name, pretrained=False, **kw).eval().to(device, dtype)
        x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
        eager = {}
        for label, method, extra in configs:
            model = base
            if method is not None:
                model = atc_patch.apply_patch(_copy(base), method=method, **schedule, **extra)
            eager[label] = model
        for mode in ("eager", "reduce-overhead"):
            for label, model in eager.items():
                row = {
                    "section": "deit",
                    "name": label,
                    "model": model_name,
                    "mode": mode,
                    "B": batch,
                }
                if time.monotonic() > deadline:
                    rows.append({**row, "note": "skipped (time)"})
                    continue
                fn = model
                if mode != "eager":
                    torch._dynamo.reset()
                    backend = "aot_eager" if device.type == "cpu" else "inductor"
                    cmode = None if device.type == "cpu" else mode
                    fn = torch.compile(model, backend=backend, mode=cmode, fullgraph=True)
                try:
                    with torch.inference_mode():
                        ms = clock.run(
                            functools.partial(fn, x), 2 if smoke else 10, 1 if smoke else 3
                        )
                except Exception as err:  # noqa: BLE001 - report, go on
                    rows.append({**row, "note": f"failed: {type(err).__name__}: {err}"[:200]})
                    continue
                row.update(stats(ms))
                row["images_per_s"] = round(batch / (row["median_ms"] / 1e3), 1)
                if method_share := _cluster_share(model, x, device, clock, smoke):
                    row["cluster_ms"] = method_share
                    row["cluster_share"] = round(method_share / row["median_ms"], 4)
                rows.append(row)
        ref = {
            (r["mode"]): r.get("images_per_s")
            for r in rows
            if r.get("model") == model_name and r["name"] == "tome"
        }
        for r in rows:
            if r.get("model") == model_name and r.get("images_per_s") and ref.get(r["mode"]):
                r["vs_tome"] = round(r["images_per_s"] / ref[r["mode"]], 3)
        del base, eager
    return rows


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _cluster_share(model, x, device, clock: Clock, smoke: bool) -> float | None:
    """Milliseconds of the clustering calls an ATC-patched ``model`` makes per forward."""
    from atc_patch.patch.vit import ViTPatch

    config = atc_patch.patch_config(model)
    if config is None or config.method != "atc":
        return None
    patch = ViTPatch(config, int(model.num_prefix_tokens))
    n = model.patch_embed.num_patches + patch.protected
    head_dim = model.blocks[0].attn.head_dim
    total = 0.0
    for r in patch.block_r(len(model.blocks), n):
        if r <= 0:
            continue
        metric = torch.randn(x.shape[0], n, head_dim, device=device, dtype=x.dtype)

        def call(metric=metric, r=r):
            return atc_patch.cluster_tokens(
                metric, r, linkage=config.linkage, protected=patch.protected
            )

        total += statistics.median(clock.run(call, 2 if smoke else 10, 1 if smoke else 2))
        n -= min(r, n - patch.protected - 1)
    return round(total, 4)


def steps(
    device: torch.device, smoke: bool, clock: Clock, deadline: float, max_fused_tokens: int = 4096
) -> list[dict]:
    """``benchmarks/gpu_model.py``'s setups and rows, measured (``_steps``: real configurations,
    random init, bf16; the tiny stand-ins in fp32 with ``--smoke``). Per setup, one model is
    patched as each row in turn; rows are timed in interleaved rounds and each round's ratio
    to the unpatched step of that round is kept."""
    setups = TINY_SETUPS if smoke else tuple(sorted(SETUPS, key=_priority))
    dtype = torch.float32 if smoke else torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    source = f"measured ({name}, {str(dtype).removeprefix('torch.')})"
    out: list[dict] = []
    compiled = next((s for s in setups if s.family in RECOMMENDED), None)
    for setup in setups:
        rows = rows_for(setup)
        if time.monotonic() > deadline:
            out += [{**record(setup, r, source), "status": "skipped (time)"} for r in rows]
            continue
        model, inputs = build(setup, device, dtype)
        inputs = move(inputs, device)
        rows = tuple(sorted(rows, key=_row_priority))
        out += measure_setup(
            model, inputs, setup, rows, source, clock, deadline, smoke, max_fused_tokens
        )
        if not smoke or setup == compiled:  # the smoke run compiles one setup (CPU compiles)
            out += compiled_steps(model, inputs, setup, rows, source, clock, deadline, smoke)
        del model, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [{"section": "steps", **r} for r in out]


def _row_priority(row: Row) -> int:
    """Unpatched, then the recommended rows and their tome_sd counterparts, then the rest."""
    first = {label for pair in RECOMMENDED.values() for label in pair}
    return 0 if row.method is None else 1 if row.label in first else 2


COMPILE_S = {"cuda": 150.0, "cpu": 30.0}  # time a compiled row needs at least (compile + runs)


def compiled_steps(
    model,
    inputs: dict,
    setup: Setup,
    rows: tuple[Row, ...],
    source: str,
    clock: Clock,
    deadline: float,
    smoke: bool,
) -> list[dict]:
    """The unpatched and the recommended rows under ``torch.compile(fullgraph=True,
    mode="reduce-overhead")`` (CUDA graphs; on the CPU ``aot_eager``, no mode), labelled
    ``"<label> [reduce-overhead]"`` (not modelled: the ratio is to the compiled unpatched step).
    Each only while ``COMPILE_S`` seconds are left before ``deadline``."""
    if setup.family not in RECOMMENDED:
        return []
    device = next(model.parameters()).device
    wanted = {"unpatched", *RECOMMENDED[setup.family]}
    out: list[dict] = []
    base = None
    for row in (r for r in rows if r.label in wanted):
        rec = {**record(setup, row, source), "label": f"{row.label} [reduce-overhead]"}
        out.append(rec)
        if deadline - time.monotonic() < COMPILE_S[device.type]:
            rec["status"] = "skipped (time)"
            continue
        rec["status"], rec["note"] = apply_row(model, row)
        if rec["status"] != "ok":
            continue
        torch._dynamo.reset()
        cuda = device.type == "cuda"
        fn = torch.compile(
            model,
            backend="inductor" if cuda else "aot_eager",
            mode="reduce-overhead" if cuda else None,
            fullgraph=True,
        )
        try:
            step = _step(fn, inputs, row)
            ms = [t / row.calls for t in clock.run(step, 2 if smoke else 5, 3)]
            s = stats(ms)
            rec.update(ms=s["median_ms"], ms_q25=s["q25_ms"], ms_q75=s["q75_ms"])
            base = rec["ms"] if row.method is None else base
            if base:
                rec["ratio"] = round(rec["ms"] / base, 3)
        except Exception as err:  # noqa: BLE001 - report, go on
            rec["status"] = f"failed: {type(err).__name__}: {err}"[:300]
        finally:
            atc_patch.remove_patch(model)
            torch._dynamo.reset()
    return out


def _priority(setup: Setup) -> tuple:
    """Batch 2 of every model first (then 1), smaller sizes first; DeiT last."""
    return (setup.family == "vit", setup.batch != 2, setup.resolution, setup.model)


SLOW_MS = {"cuda": 2e3, "cpu": 1e4}  # a step slower than this is timed once, in round 1


def measure_setup(
    model,
    inputs: dict,
    setup: Setup,
    rows: tuple[Row, ...],
    source: str,
    clock: Clock,
    deadline: float,
    smoke: bool,
    max_fused_tokens: int,
) -> list[dict]:
    """Every row of one setup on ``model``: a warm-up step (clustering calls counted), profiler
    counts, then interleaved rounds of timed steps while the time lasts."""
    device = next(model.parameters()).device
    recs = {r.label: {**record(setup, r, source), "status": "ok"} for r in rows}
    steps_of: dict[str, Callable[[], object]] = {}
    first: dict[str, float] = {}
    for row in rows:
        rec = recs[row.label]
        if time.monotonic() > deadline:
            rec["status"] = "skipped (time)"
            continue
        if _fused_too_long(setup, row, max_fused_tokens):
            rec["status"] = f"skipped (untiled fused kernel above {max_fused_tokens} tokens)"
            continue
        rec["status"], rec["note"] = apply_row(model, row)
        if rec["status"] != "ok":
            continue
        step = _step(model, inputs, row)
        try:
            with counted_cluster_calls() as n:
                first[row.label] = clock.run(step, 1, 0)[0]
            rec["cluster_calls"] = round(n[0] / row.calls, 2)
            if first[row.label] < 1e3 and time.monotonic() < deadline:
                rec.update({k: round(v / row.calls, 2) for k, v in counts(step, device).items()})
            steps_of[row.label] = step
        except Exception as err:  # noqa: BLE001 - report, go on
            rec["status"] = f"failed: {type(err).__name__}: {err}"[:300]
        finally:
            atc_patch.remove_patch(model)
    rounds = _rounds(model, rows, steps_of, first, clock, deadline, 2 if smoke else 10)
    for label, (ms, ratios) in rounds.items():
        rec = recs[label]
        if not ms:
            rec["status"] = "skipped (time)"
            continue
        s = stats(ms)
        rec.update(ms=s["median_ms"], ms_q25=s["q25_ms"], ms_q75=s["q75_ms"])
        if ratios:
            q = np.percentile(ratios, [25, 50, 75])
            rec.update(ratio=round(q[1], 3), ratio_q25=round(q[0], 3), ratio_q75=round(q[2], 3))
        if len(ms) == 1:
            rec["note"] = "1 run (slow)"
    return list(recs.values())


def _fused_too_long(setup: Setup, row: Row, max_tokens: int) -> bool:
    """Whether ``row`` forces the fused ATC kernel on whole images of more than ``max_tokens``
    tokens (one program per sample, modelled at seconds per step; not worth the budget)."""
    forced = row.options.get("backend") == "triton" and row.options.get("tile") is None
    return forced and setup.tokens > max_tokens


def _step(model, inputs: dict, row: Row) -> Callable[[], None]:
    """One denoising step of ``row``: ``row.calls`` model calls (moving timesteps)."""
    step_inputs = [at_step(inputs, i) for i in range(row.calls)]

    def step() -> None:
        with torch.no_grad():
            for x in step_inputs:
                call(model, x)

    return step


def _rounds(
    model,
    rows: tuple[Row, ...],
    steps_of: dict[str, Callable[[], object]],
    first: dict[str, float],
    clock: Clock,
    deadline: float,
    max_rounds: int,
) -> dict[str, tuple[list[float], list[float]]]:
    """Time every row's step in interleaved rounds (each round patches the model as each row in
    turn): ``{label: (ms per model call, each round's ratio to the unpatched call)}``. A round
    starts only if its estimate fits before ``deadline`` (round 1: each row if the deadline is
    not past); slow steps (:data:`SLOW_MS`) are timed once, in round 1."""
    by_label = {r.label: r for r in rows}
    slow = SLOW_MS[next(model.parameters()).device.type]
    runs = 3
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in steps_of}
    for rnd in range(max_rounds):
        todo = [k for k in steps_of if rnd == 0 or first[k] < slow]
        if rnd and time.monotonic() + sum(first[k] * runs for k in todo) / 1e3 > deadline:
            break
        medians = {}
        for label in todo:
            if rnd == 0 and time.monotonic() > deadline:
                break
            calls = by_label[label].calls
            apply_row(model, by_label[label])
            try:
                ms = clock.run(steps_of[label], 1 if first[label] >= slow else runs, 0)
            finally:
                atc_patch.remove_patch(model)
            out[label][0].extend(t / calls for t in ms)
            medians[label] = statistics.median(ms) / calls
        base = medians.get("unpatched")
        for label, m in medians.items():
            if base:
                out[label][1].append(m / base)
    return out


# --- output -------------------------------------------------------------------------------------


def write(rows: list[dict], out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(out / "gpu_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [header, ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        part = [r for r in rows if r["section"] == section]
        cols = [k for k in keys if k != "section" and any(k in r for r in part)]
        lines += [f"## {section}", "", "| " + " | ".join(cols) + " |"]
        lines.append("|" + "---|" * len(cols))
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in part]
        lines.append("")
    (out / "gpu_check.md").write_text("\n".join(lines))
    with open(out / "gpu_steps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(r for r in rows if r["section"] == "steps")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out_dir", help="folder for gpu_check.csv, gpu_check.md and gpu_steps.csv")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check")
    ap.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which sections (the budget is shared among them)",
    )
    ap.add_argument(
        "--max_fused_tokens",
        type=positive_int,
        default=4096,
        help="steps: skip rows forcing the untiled fused kernel on more tokens than this",
    )
    args = ap.parse_args(argv)
    from tqdm import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        ap.error("no CUDA device: the full check needs a GPU (use --smoke on the CPU)")
    torch.manual_seed(0)
    clock = Clock(device)
    start = time.monotonic()
    run = {
        "exactness": lambda _: exactness(device, args.smoke),
        "kernel": lambda d: kernel_calls(device, args.smoke, clock, d),
        "deit": lambda d: deit(device, args.smoke, clock, d),
        "steps": lambda d: steps(device, args.smoke, clock, d, args.max_fused_tokens),
    }
    chosen = [s for s in SECTIONS if s in args.sections]
    total = sum(SHARES[s] for s in chosen)
    rows: list[dict] = []
    elapsed_share = 0.0  # what a section does not use carries over to the next
    for section in tqdm(chosen, desc="gpu_check"):
        elapsed_share += SHARES[section] / total
        rows += run[section](start + elapsed_share * args.budget)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke, interpreter)"
    header = (
        f"# gpu_check on {name}: torch {torch.__version__}, {time.monotonic() - start:.0f} s"
        "\n\nmedian (q25-q75) of many runs after warm-up; launches/syncs from the profiler"
    )
    write(rows, Path(args.out_dir), header)
    print((Path(args.out_dir) / "gpu_check.md").read_text())
    return rows


if __name__ == "__main__":
    main()
