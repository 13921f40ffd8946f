"""Modelled GPU step time of token reduction on diffusion models and a ViT (issue 21's model).

    python benchmarks/gpu_model.py                              # every setup and row, H100
    python benchmarks/gpu_model.py --hardware h200 --per_merge_us 1.5
    python benchmarks/gpu_model.py --models sd15 --batches 2 --rows unpatched "atc triton"
    python benchmarks/gpu_model.py --models qwenimage flux2 sana   # issue 22's image DiTs

Every setup of ``_steps.SETUPS`` (SD-1.5 UNet at 512² and 1024², SDXL UNet at 1024², FLUX.1-dev
transformer at 1024² and 2048², batch 1 and 2; DeiT-S at 224², batch 256; with ``--models``
naming them, ``_steps.CURRENT_SETUPS``: QwenImage, Z-Image, FLUX.2, Chroma, CogView4, HiDream,
Sana) is built from its real configuration on the meta device (random init, bf16), patched as
each row of ``_steps.DIFFUSION_ROWS`` / ``VIT_ROWS`` / ``CURRENT_ROWS`` says, and called once
(``reuse_steps=k``: k calls with a moving timestep, averaged) under the roofline
:class:`~_costmodel.CostModel`. Nothing runs on
a GPU: every figure is **modelled**, from these rules and constants (all printed in the run's
header and the CSV's ``source`` column):

* per aten op ``max(bytes / bandwidth, flops / peak) + launch``; flops for matmuls and
  convolutions, bytes read + written for everything (views free);
* attention as flash attention by its own formula (``4 * B * H * Nq * Nk * D`` flops, bytes of
  q, k, v, o), caught before it decomposes;
* host syncs counted (``.item()``, ``bool()``, ``.tolist()``, ``nonzero``, host <-> device
  copies; timed only with ``--sync_us``);
* clustering calls (``cluster_tokens``) as ``_clustercost`` says: ATC's fused Triton kernel by
  a stated per-merge latency (``--per_merge_us`` per merge per 256-token row block, one program
  per sample, ``--sms`` at once) plus its bytes, after its torch prologue; the other paths by
  their real op list at that N, run once on a CPU stand-in of the metric (random values).

Rows whose options the installed atc_patch rejects are reported ``n/a (option not available)``.
``ratio`` is ms / the unpatched ms of the same setup. The first GPU run of
``benchmarks/gpu_check.py --sections steps`` writes the same columns, measured: join the two
CSVs on ``(model, resolution, batch, label)`` to calibrate ``--per_merge_us``.

Then it prints, and writes to ``<out_dir>/gpu_model_goals.md``, issue 21's per-step claims
(clustering calls per token resolution, host syncs, launches per clustering call, per row) and
its goals on the recommended rows (``_steps.RECOMMENDED``: ratio to unpatched, and to tome_sd
with the same tokens removed).

Writes ``<out_dir>/gpu_model.csv`` (``_steps.COLUMNS``) and ``<out_dir>/gpu_model.png``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _clustercost import ClusterCalls, clustering_on_meta
from _costmodel import PRESETS, CostModel, Hardware, Totals, to_device
from _steps import (
    COLUMNS,
    CURRENT_SETUPS,
    CURRENT_TINY_SETUPS,
    FAMILIES,
    RECOMMENDED,
    SETUPS,
    TINY_SETUPS,
    Row,
    Setup,
    apply_row,
    at_step,
    build,
    call,
    record,
    rows_for,
)
from tqdm import tqdm

import atc_patch
from atc_patch.demo.argtypes import positive_int


def model_row(
    model: Any, inputs: dict, row: Row, hw: Hardware, per_merge_s: float, proxy_bytes: float
) -> tuple[Totals, ClusterCalls]:
    """Run ``row.calls`` model calls on meta under the cost model; the totals of all of them."""
    cm = CostModel(hw)
    steps = [to_device(cm, at_step(inputs, i)) for i in range(row.calls)]
    with torch.no_grad(), cm, clustering_on_meta(cm, per_merge_s, proxy_bytes) as calls:
        for step in steps:
            call(model, step)
    return cm.totals, calls


def model_setup(
    setup: Setup,
    rows: tuple[Row, ...],
    args: argparse.Namespace,
    hw: Hardware,
    source: str,
    bar: tqdm,
) -> list[dict]:
    """Every row of one setup: one dict per row, ``COLUMNS`` keys."""
    model, inputs = build(setup, "meta", torch.bfloat16)
    out: list[dict] = []
    base_ms = None
    for row in rows:
        bar.set_postfix_str(f"{setup.name}: {row.label}")
        rec = record(setup, row, source)
        rec["status"], rec["note"] = apply_row(model, row)
        if rec["status"] == "ok":
            try:
                totals, calls = model_row(
                    model, inputs, row, hw, args.per_merge_us * 1e-6, args.proxy_gb * 1e9
                )
                rec.update(per_call(totals, calls, row.calls))
            except Exception as err:  # noqa: BLE001 - one row's failure is reported, not fatal
                rec["status"] = f"failed: {type(err).__name__}: {err}"[:300]
            finally:
                atc_patch.remove_patch(model)
        if row.method is None and "ms" in rec:
            base_ms = rec["ms"]
        if base_ms and "ms" in rec:
            rec["ratio"] = round(rec["ms"] / base_ms, 3)
        out.append(rec)
        bar.update()
    return out


def per_call(t: Totals, calls: ClusterCalls, n: int) -> dict[str, Any]:
    """The CSV fields of ``n`` calls' totals, per call."""
    notes = []
    if calls.how:
        notes.append("clustering: " + ", ".join(f"{k} x{v / n:g}" for k, v in calls.how.items()))
    if t.sync_sites:
        top = t.sync_sites.most_common(3)
        notes.append("syncs: " + ", ".join(f"{k} x{v / n:g}" for k, v in top))
    resolutions = len(set(calls.tokens))
    return {
        "ms": round(t.ms / n, 3),
        "launches": round(t.launches / n, 1),
        "syncs": round(t.syncs / n, 2),
        "cluster_calls": round(calls.count / n, 2),
        "calls_per_resolution": round(calls.count / n / resolutions, 3) if resolutions else 0,
        "cluster_launches": max(calls.launches, default=0),
        "hbm_gb": round(t.bytes / n / 1e9, 3),
        "cluster_ms": round(t.seconds_by["cluster"] * 1e3 / n, 3),
        "attention_ms": round(t.seconds_by["attention"] * 1e3 / n, 3),
        "note": "; ".join(notes),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def table(rows: list[dict]) -> str:
    """A markdown table of the results (status in place of the figures where not ok)."""
    head = (
        "| setup | row | ms | ratio | launches | syncs | clustering calls | HBM GB | cluster ms |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['setup']} | {r['label']} | {r['status']} |" + " |" * 6)
            continue
        lines.append(
            f"| {r['setup']} | {r['label']} | {r['ms']:.1f} | {r.get('ratio', ''):.2f}x | "
            f"{r['launches']:,.0f} | {r['syncs']:g} | {r['cluster_calls']:g} | "
            f"{r['hbm_gb']:.1f} | {r['cluster_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bars of the ratio to unpatched per setup, one per patched row that ran (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["method"]]
    if not ok:
        return
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in ok))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(setups)), 5))
    for j, setup in enumerate(setups):
        here = [r for r in ok if r["setup"] == setup]
        width = 0.8 / max(len(here), 1)
        for i, r in enumerate(here):
            x = j + (i - (len(here) - 1) / 2) * width
            ax.bar(x, r["ratio"], width, color=colors[r["label"]])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(setups)), setups, rotation=30, ha="right")
    ax.set_ylabel("modelled step time / unpatched")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Issue 21's per-step claims and goals, checked on the modelled rows
# --------------------------------------------------------------------------------------------
GOALS = (  # (model, resolution, the most ratio the recommended row may have)
    ("sd15", 1024, 0.85),
    ("sdxl", 1024, 0.9),
    ("flux", 2048, 0.8),
)


def claims(rows: list[dict]) -> list[str]:
    """The per-step claims, as the rows that ran show them (markdown lines)."""
    ok = [r for r in rows if r["status"] == "ok" and r["method"] and FAMILIES[r["model"]] != "vit"]
    if not ok:
        return []
    out = ["| row | clustering calls per resolution and step | host syncs per step | most "
           "launches per clustering call |", "|---|---|---|---|"]  # fmt: skip
    for label in dict.fromkeys(r["label"] for r in ok):
        here = [r for r in ok if r["label"] == label]
        per_res = max(r["calls_per_resolution"] for r in here)
        syncs = max(r["syncs"] for r in here)
        launches = max(r["cluster_launches"] for r in here)
        out.append(f"| {label} | {per_res:g} | {syncs:g} | {launches} |")
    return out


def goals(rows: list[dict]) -> list[str]:
    """Issue 21's goals on the recommended rows (``_steps.RECOMMENDED``), markdown lines."""
    ok = {(r["setup"], r["label"]): r for r in rows if r["status"] == "ok" and "ms" in r}
    setups = list(dict.fromkeys(r["setup"] for r in rows if FAMILIES[r["model"]] in RECOMMENDED))
    lines = ["| setup | recommended row | ratio | vs tome_sd (same tokens removed) | goal |",
             "|---|---|---|---|---|"]  # fmt: skip
    for setup in setups:
        first = next(r for r in rows if r["setup"] == setup)
        label, tome = RECOMMENDED[FAMILIES[first["model"]]]
        rec, ref = ok.get((setup, label)), ok.get((setup, tome))
        if rec is None:
            lines.append(f"| {setup} | {label} | n/a | | |")
            continue
        limit = next(
            (g for m, res, g in GOALS if (m, res) == (first["model"], first["resolution"])), 1.0
        )
        vs = rec["ms"] / ref["ms"] if ref else None
        met = rec["ratio"] <= limit and (vs is None or vs <= 1.05)
        lines.append(
            f"| {setup} | {label} | {rec['ratio']:.3f}x | "
            f"{'' if vs is None else f'{vs:.3f}x'} | <= {limit:g}x, <= 1.05x: "
            f"{'met' if met else 'MISSED'} |"
        )
    return lines


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _number(minimum: float, strict: bool):
    """An argparse type: a float ``> minimum`` (``strict``) or ``>= minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum or (strict and value == minimum) or value != value:
            raise argparse.ArgumentTypeError(
                f"must be a number {'>' if strict else '>='} {minimum:g}, got {text}"
            )
        return value

    return parse


positive_float = _number(0.0, strict=True)
non_negative_float = _number(0.0, strict=False)


def hardware(args: argparse.Namespace) -> Hardware:
    """The preset named by ``--hardware`` with the constants given on the command line."""
    given = {
        "bandwidth": (args.bandwidth_tbs, 1e12),
        "peak_flops": (args.peak_tflops, 1e12),
        "peak_flops_fp32": (args.peak_fp32_tflops, 1e12),
        "launch_s": (args.launch_us, 1e-6),
        "sms": (args.sms, 1),
        "sync_s": (args.sync_us, 1e-6),
    }
    changes = {k: v * unit for k, (v, unit) in given.items() if v is not None}
    return replace(PRESETS[args.hardware], **changes)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--hardware",
        choices=sorted(PRESETS),
        default="h100",
        help="constants preset (h100: 3.35 TB/s; h200: 4.8 TB/s)",
    )
    p.add_argument("--bandwidth_tbs", type=positive_float, help="HBM TB/s (preset's)")
    p.add_argument("--peak_tflops", type=positive_float, help="bf16 dense TFLOP/s (600)")
    p.add_argument("--peak_fp32_tflops", type=positive_float, help="fp32 matmul TFLOP/s (60)")
    p.add_argument("--launch_us", type=non_negative_float, help="µs per kernel launch (4)")
    p.add_argument("--sms", type=positive_int, help="SMs: fused-kernel programs at once (132)")
    p.add_argument("--sync_us", type=non_negative_float, help="µs per host sync (0: counted)")
    p.add_argument(
        "--per_merge_us",
        type=positive_float,
        default=2.0,
        help="fused ATC kernel: µs per merge per 256-token row block (2)",
    )
    p.add_argument(
        "--proxy_gb",
        type=positive_float,
        default=1.5,
        help="largest distance matrices (GB) of a CPU stand-in clustering call",
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=sorted({s.model for s in SETUPS + CURRENT_SETUPS}),
        help="setups of these models only (issue 22's image transformers only when named)",
    )
    p.add_argument("--resolutions", nargs="+", type=int, help="setups at these sizes only")
    p.add_argument("--batches", nargs="+", type=int, help="setups at these batch sizes only")
    p.add_argument("--rows", nargs="+", help="rows with these labels only (and unpatched)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny stand-ins of the setups (same layouts; tests, smoke runs)",
    )
    p.add_argument("--out_dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--no_plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    hw = hardware(args)
    pool = TINY_SETUPS if args.tiny else SETUPS
    if args.models:  # issue 22's image transformers when named
        pool += CURRENT_TINY_SETUPS if args.tiny else CURRENT_SETUPS
    setups = [
        s
        for s in pool
        if (not args.models or s.model in args.models)
        and (not args.resolutions or s.resolution in args.resolutions)
        and (not args.batches or s.batch in args.batches)
    ]
    if not setups:
        sys.exit("no setup matches --models / --resolutions / --batches")

    def wanted(r: Row) -> bool:
        return not args.rows or r.method is None or r.label in args.rows

    source = f"modelled ({hw.name} constants)"
    print(
        f"# gpu_model: {source}: {hw.bandwidth / 1e12:g} TB/s, {hw.peak_flops / 1e12:g} TFLOP/s "
        f"bf16 ({hw.peak_flops_fp32 / 1e12:g} fp32), {hw.launch_s * 1e6:g} µs per launch, "
        f"{hw.sync_s * 1e6:g} µs per sync, {hw.sms} SMs; fused ATC kernel "
        f"{args.per_merge_us:g} µs per merge per 256-token row block (assumed)\n"
        "Every figure is modelled (nothing runs on a GPU): per op max(bytes / bandwidth, "
        "flops / peak) + launch; attention as flash attention; the fused ATC kernel by the "
        "per-merge latency above; the other clustering paths by their op list at the real N, "
        "run on a CPU stand-in with random values.\n"
    )
    todo = [(s, tuple(r for r in rows_for(s) if wanted(r))) for s in setups]
    results: list[dict] = []
    start = time.monotonic()
    with tqdm(total=sum(len(r) for _, r in todo), desc="gpu_model", file=sys.stderr) as bar:
        for setup, rows in todo:
            part = model_setup(setup, rows, args, hw, source, bar)
            results += part
            tqdm.write(table(part) + "\n")
    report = ["## Per-step claims (modelled)", "", *claims(results), ""]
    report += ["## Issue 21's goals on the recommended rows (modelled)", "", *goals(results)]
    print("\n".join(report))
    write_csv(results, args.out_dir / "gpu_model.csv")
    (args.out_dir / "gpu_model_goals.md").write_text("\n".join(report) + "\n")
    title = f"{source}; fused ATC {args.per_merge_us:g} µs/merge/256 tokens"
    if not args.no_plot:
        plot(results, args.out_dir / "gpu_model.png", title)
    print(f"wrote {args.out_dir / 'gpu_model.csv'} ({time.monotonic() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
