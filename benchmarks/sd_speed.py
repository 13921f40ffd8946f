"""UNet step time and peak memory: unpatched, tomesd, atc_patch ``tome_sd`` and ATC per linkage.

One process run times every configuration side by side on the same random-init UNet and the
same inputs (the machines are shared and noisy: compare ratios within a run, not across runs).

    # the full sweep (SD-1.5 architecture, 64x64 latents = 512 px, batch 2 = one CFG step)
    python benchmarks/sd_speed.py
    # the headline configuration only (ratio 0.5), much quicker on a small CPU
    python benchmarks/sd_speed.py --headline
    # a smoke run
    python benchmarks/sd_speed.py --unet tiny-sd --latent 16 --ratios 0.5

Step time: median wall time of ``--repeats`` UNet calls after ``--warmup`` calls, median over
``--rounds`` interleaved passes over all configurations.
Peak memory (CPU): the process's peak resident set size during the timed calls above the
resident size just before them, read from ``VmHWM`` in ``/proc/self/status`` after resetting
it through ``/proc/self/clear_refs`` (Linux >= 4.0). On CUDA: ``torch.cuda.max_memory_allocated``
above the allocation before the call. ATC keeps its CPU buffers between calls (they are part of
the baseline after the warm-up call): ``kept MB`` reports them, and they are released after
every configuration (``atc_patch.release_workspace``).
Writes ``<out_dir>/sd_speed.csv`` and ``sd_speed.png``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import atc_patch
from atc_patch.demo.argtypes import kernel_threads_policy, positive_int
from atc_patch.kernel.scratch import release_workspace, workspace_bytes
from atc_patch.kernel.threads import set_kernel_threads
from atc_patch.testing import UNET_KINDS, build_unet, unet_inputs

METHODS = ("unpatched", "tomesd", "tome_sd", "atc-single", "atc-complete", "atc-average")


@dataclass(frozen=True)
class Config:
    method: str  # one of METHODS
    ratio: float

    def apply(self, unet: torch.nn.Module) -> None:
        if self.method == "tomesd":
            import tomesd

            tomesd.apply_patch(unet, ratio=self.ratio)
        elif self.method == "tome_sd":
            atc_patch.apply_patch(unet, method="tome_sd", ratio=self.ratio, seed=0)
        elif self.method.startswith("atc-"):
            linkage = self.method.split("-", 1)[1]
            atc_patch.apply_patch(unet, method="atc", linkage=linkage, ratio=self.ratio)

    def remove(self, unet: torch.nn.Module) -> None:
        if self.method == "tomesd":
            import tomesd

            tomesd.remove_patch(unet)
        else:
            atc_patch.remove_patch(unet)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(
    unet: torch.nn.Module, args: tuple, warmup: int, repeats: int
) -> tuple[float, float | None]:
    """``(median step seconds, peak memory MB above the pre-call level or None)``."""
    cuda = args[0].is_cuda
    for _ in range(warmup):
        unet(*args)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        can_reset = _reset_peak_rss()
        base = _status_kb("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        unet(*args)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        hwm = _status_kb("VmHWM")
        peak = (hwm - base) / 1024 if can_reset and hwm is not None and base else None
    return statistics.median(times), peak


def configs(methods: list[str], ratios: list[float]) -> list[Config]:
    out = [Config("unpatched", 0.0)] if "unpatched" in methods else []
    out += [Config(m, r) for r in ratios for m in methods if m != "unpatched"]
    return out


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "step_s", "UNet step time (s)"),
        (axes[1], "peak_mb", "peak memory above baseline (MB)"),
    ):
        for method in METHODS:
            pts = [(r["ratio"], r[key]) for r in rows if r["method"] == method and r[key] != ""]
            if not pts:
                continue
            if method == "unpatched":
                ax.axhline(pts[0][1], color="k", ls="--", label=method)
            else:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xlabel("reduction ratio")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()  # not set_grad_enabled(False): main() is also called from the tests
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--unet", default="sd15", choices=UNET_KINDS, help="UNet layout (random init)")
    p.add_argument("--latent", type=int, default=64, help="latent size (64 = 512 px)")
    p.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance step")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--headline", action="store_true", help="ratio 0.5 only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement")
    p.add_argument("--rounds", type=int, default=1, help="interleaved passes over all configs")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    p.add_argument(
        "--kernel_threads",
        type=kernel_threads_policy,
        default="auto",
        help="the clustering kernel's thread policy (atc_patch.kernel.threads): auto, torch or n",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out_dir", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    if a.headline:
        a.ratios = [0.5]
    if a.threads:
        torch.set_num_threads(a.threads)
    set_kernel_threads(a.kernel_threads)

    unet = build_unet(a.unet).to(a.device)
    inp = unet_inputs(unet, batch=a.batch, height=a.latent, width=a.latent)
    args = tuple(
        v.to(a.device) for v in (inp["sample"], inp["timestep"], inp["encoder_hidden_states"])
    )
    if "added_cond_kwargs" in inp:  # SDXL: tomesd's size hook needs positional args
        added = {k: v.to(a.device) for k, v in inp["added_cond_kwargs"].items()}
        base_forward = unet.forward
        unet.forward = lambda *xs, **kw: base_forward(*xs, added_cond_kwargs=added, **kw)

    todo = configs(a.methods, a.ratios)
    times: dict[Config, list[float]] = {c: [] for c in todo}
    peaks: dict[Config, list[float]] = {c: [] for c in todo}
    kept: dict[Config, float] = {}
    # Rounds interleave the configurations, so a noisy neighbour slows all of them alike.
    bar = tqdm(total=len(todo) * a.rounds, desc=f"{a.unet} {a.latent}px-latent b{a.batch}")
    for _ in range(a.rounds):
        for cfg in todo:
            cfg.apply(unet)
            try:
                step, peak = measure(unet, args, a.warmup, a.repeats)
                kept[cfg] = workspace_bytes() / 2**20  # ATC's buffers, kept between calls
            finally:
                cfg.remove(unet)
                release_workspace()  # every configuration starts without them
            times[cfg].append(step)
            if peak is not None:
                peaks[cfg].append(peak)
            bar.update()
    bar.close()
    rows = [
        dict(
            method=c.method,
            ratio=c.ratio,
            step_s=round(statistics.median(times[c]), 4),
            peak_mb=round(max(peaks[c]), 1) if peaks[c] else "",
            kept_mb=round(kept[c], 1),
        )
        for c in todo
    ]
    for row in rows:  # step time relative to tomesd at the same ratio
        ref = [r for r in rows if r["method"] == "tomesd" and r["ratio"] == row["ratio"]]
        row["vs_tomesd"] = round(row["step_s"] / ref[0]["step_s"], 3) if ref else ""

    a.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = a.out_dir / "sd_speed.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, a.out_dir / "sd_speed.png")
    print(f"\n{a.unet} UNet, {a.latent}x{a.latent} latents, batch {a.batch}, "
          f"{torch.get_num_threads()} threads, device {a.device}")  # fmt: skip
    print(
        f"{'method':<14}{'ratio':>6}{'step s':>10}{'peak MB':>10}{'kept MB':>10}{'vs tomesd':>11}"
    )
    for r in rows:
        print(
            f"{r['method']:<14}{r['ratio']:>6}{r['step_s']:>10}{r['peak_mb']!s:>10}"
            f"{r['kept_mb']!s:>10}{r['vs_tomesd']!s:>11}"
        )
    print(f"wrote {csv_path} and {a.out_dir / 'sd_speed.png'}")


if __name__ == "__main__":
    main()
