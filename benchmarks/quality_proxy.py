"""A quality proxy beside the modelled speed: how far each patch setting moves the noise
prediction from the unpatched model's, at equal tokens removed.

    python benchmarks/quality_proxy.py                     # SD-1.5, SDXL and Flux widths
    python benchmarks/quality_proxy.py --models flux --steps 4 --rows tome_sd atc

No weights are reachable here, so every model is **random-init at its real width with
reduced depth** (SD-1.5: ``layers_per_block=1``; SDXL: ``layers_per_block=1``,
``transformer_layers_per_block=(1, 1, 2)``; Flux: FLUX.1-dev's width with 1 double + 1 single
block), run in float32 on the CPU at ``--resolution`` (512: 4096 latent tokens at SD-1.5's
first level, 1024 at SDXL's and Flux's), batch 2. The rows are ``_steps.DIFFUSION_ROWS``
(``gpu_model.py``'s), every one at ratio 0.5, with ``backend`` dropped (the torch and fused
paths give the same plans; the fused one runs only under Triton's interpreter here).

A short trajectory stands for sampling: ``--steps`` calls with the timestep moving down and
``x_{i+1} = x_i - 0.1 * eps(x_i)``, ``eps`` the unpatched prediction, the same inputs for every
row; a row with ``reuse_steps=k`` keeps its plans over those calls as it would while sampling.
Per row: ``rel_l2 = ||eps_row - eps|| / ||eps||`` per step, its mean and maximum. With random
weights this measures how much of the computation the setting changes, not image quality.

Writes ``<out_dir>/quality_proxy.csv``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _steps import DIFFUSION_ROWS, Row
from tqdm import tqdm

import atc_patch
from atc_patch.demo.argtypes import positive_int

COLUMNS = (
    "model", "resolution", "batch", "label", "method", "options", "status", "rel_l2_mean",
    "rel_l2_max", "rel_l2_steps", "seconds", "note",
)  # fmt: skip
DEPTH = {
    "sd15": "real width, layers_per_block=1",
    "sdxl": "real width, layers_per_block=1, transformer_layers_per_block=(1, 1, 2)",
    "flux": "FLUX.1-dev width, 1 double + 1 single block",
}


TINY = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}  # atc_patch.testing kinds


def build(
    model: str, resolution: int, batch: int, tiny: bool = False
) -> tuple[torch.nn.Module, dict]:
    """The reduced-depth, real-width random-init model (``tiny``: its tiny stand-in) and the
    inputs of its first call."""
    torch.manual_seed(0)
    if tiny:
        from atc_patch import testing

        if model == "flux":
            net = testing.build_transformer(TINY[model])
            side = resolution // 16
            return net, testing.transformer_inputs(net, batch=batch, height=side, width=side)
        net = testing.build_unet(TINY[model])
        side = resolution // 8
        return net, testing.unet_inputs(net, batch=batch, height=side, width=side)
    if model == "flux":
        from diffusers import FluxTransformer2DModel

        from atc_patch.testing import transformer_config, transformer_inputs

        _, kw = transformer_config("flux-width")
        net = FluxTransformer2DModel(**dict(kw, num_layers=1, num_single_layers=1)).eval()
        side = resolution // 16
        return net, transformer_inputs(net, batch=batch, height=side, width=side, seq_len=64)
    from diffusers import UNet2DConditionModel

    from atc_patch.testing import unet_config, unet_inputs

    cfg = dict(unet_config(model), layers_per_block=1)
    if model == "sdxl":
        cfg["transformer_layers_per_block"] = (1, 1, 2)
    net = UNet2DConditionModel(**cfg).eval()
    side = resolution // 8
    return net, unet_inputs(net, batch=batch, height=side, width=side, seq_len=77)


def trajectory(net: torch.nn.Module, inputs: dict, steps: int) -> tuple[list[dict], list]:
    """``steps`` calls' inputs and the unpatched predictions on them."""
    name = "sample" if "sample" in inputs else "hidden_states"
    t0 = inputs["timestep"]
    dt = (0.8 if t0.is_floating_point() and float(t0.max()) <= 1 else 800) / max(steps, 1)
    calls, refs = [], []
    x = inputs[name]
    for i in range(steps):
        step = dict(inputs, **{name: x, "timestep": t0 * 0 + (t0.max() - i * dt)})
        with torch.no_grad():
            eps = net(**step).sample
        calls.append(step)
        refs.append(eps)
        x = x - 0.1 * eps
    return calls, refs


def proxy_rows(rows: tuple[Row, ...]) -> list[Row]:
    """The patched rows, ``backend`` dropped, one per distinct setting."""
    out, seen = [], set()
    for row in rows:
        if row.method is None:
            continue
        options = {k: v for k, v in row.options.items() if k != "backend"}
        key = (row.method, tuple(sorted(options.items(), key=lambda kv: kv[0])))
        if key not in seen:
            seen.add(key)
            out.append(Row(row.label, row.method, options))
    return out


def measure(net, calls: list[dict], refs: list, row: Row) -> dict[str, Any]:
    try:
        atc_patch.apply_patch(net, row.method, **row.options)
    except (ValueError, TypeError) as err:
        return {"status": "n/a (rejected)", "note": str(err)[:200]}
    start = time.monotonic()
    errors = []
    try:
        with torch.no_grad():
            for step, ref in zip(calls, refs, strict=True):
                eps = net(**step).sample
                errors.append(float((eps - ref).norm() / ref.norm()))
    finally:
        atc_patch.remove_patch(net)
    return {
        "status": "ok",
        "rel_l2_mean": round(sum(errors) / len(errors), 5),
        "rel_l2_max": round(max(errors), 5),
        "rel_l2_steps": " ".join(f"{e:.5f}" for e in errors),
        "seconds": round(time.monotonic() - start, 1),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(DEPTH), default=sorted(DEPTH))
    p.add_argument("--resolution", type=positive_int, default=512, help="image side, pixels")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--steps", type=positive_int, default=4, help="calls of the trajectory")
    p.add_argument("--rows", nargs="+", help="rows with these labels only")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--tiny", action="store_true", help="tiny stand-ins (tests, smoke runs)")
    p.add_argument("--out_dir", type=Path, default=Path("benchmarks/results"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for r in proxy_rows(DIFFUSION_ROWS) if not args.rows or r.label in args.rows]
    if not rows:
        sys.exit("no row matches --rows")
    out: list[dict] = []
    with tqdm(total=len(args.models) * len(rows), desc="quality_proxy", file=sys.stderr) as bar:
        for model in args.models:
            net, inputs = build(model, args.resolution, args.batch, args.tiny)
            calls, refs = trajectory(net, inputs, args.steps)
            for row in rows:
                bar.set_postfix_str(f"{model}: {row.label}")
                rec = {"model": model, "resolution": args.resolution, "batch": args.batch}
                rec |= {"label": row.label, "method": row.method, "options": row.describe()}
                rec |= {"note": f"random init, {TINY[model] if args.tiny else DEPTH[model]}"}
                rec |= measure(net, calls, refs, row)
                out.append(rec)
                bar.update()
                tqdm.write(f"{model} {row.label}: {rec.get('rel_l2_mean', rec['status'])}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "quality_proxy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(out)
    print(table(out))
    print(f"wrote {args.out_dir / 'quality_proxy.csv'}")
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one line per row label, one column per model (mean rel. L2 error)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| row | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = []
        for m in models:
            r = next((r for r in rows if r["model"] == m and r["label"] == label), None)
            cells.append(f"{r['rel_l2_mean']:.4f}" if r and r["status"] == "ok" else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
