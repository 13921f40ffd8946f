"""CPU throughput of the RoPE and NaFlex ViTs: unpatched vs ToMe vs ATC, side by side in one run.

Every model of ``_rope_vits.ROPE_VITS`` (timm ``Eva`` DINOv3-L/16 at 512², timm ``NaFlexVit``
SigLIP2-so400m on a NaFlex batch of 256 slots, transformers ``DINOv3ViTModel`` at 512²,
``Siglip2VisionModel`` on 256 slots, ``Aimv2VisionModel`` L/14 at 448²) is built at its real
width with ``--depth`` of its blocks (random init, float32). The NaFlex batches alternate an
image filling the 256 slots and one filling 3/4 of them (the rest padding). Configurations:
the rows of ``_rope_vits.RopeViT.rows`` for ``--depth`` blocks (``keep_rate=0.7`` at a quarter, half
and three quarters of the blocks; ToMe's constant ``r``, scaled so that the reduced model ends
with the token count of the full one), ToMe and ATC (average linkage). One process times them
round-robin, every round in a shuffled order; images/s over the kept rounds, and the speed-up
over the unpatched model as the median and quartiles of the per-round ratios (the spread).

    python benchmarks/vit_speed.py                          # every model, depth 4, batch 2
    python benchmarks/vit_speed.py --models hf_aimv2_l --rounds 12 --threads 2
    python benchmarks/vit_speed.py --tiny --rounds 2        # a smoke run (narrow models)

Writes ``<out_dir>/vit_speed.csv`` and prints the table. Measured on this machine's CPU; for the
modelled GPU step time of the same models at full depth see ``gpu_model.py --models ...``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import random
import time
from pathlib import Path
from typing import Any

import torch
from _rope_vits import ROPE_VITS, build_rope_vit, rope_vit_inputs
from throughput import ratio_spread
from tqdm import tqdm

import atc_patch
from atc_patch.demo.argtypes import fraction, positive_int


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(ROPE_VITS), default=list(ROPE_VITS))
    p.add_argument("--depth", type=positive_int, default=4, help="blocks of each model")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=8, help="timed rounds")
    p.add_argument("--throw_out", type=fraction, default=0.25, help="rounds dropped as warm-up")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--tiny", action="store_true", help="narrow models (smoke runs)")
    p.add_argument("--out_dir", type=Path, default=Path("bench_out"))
    return p.parse_args(argv)


def naflex_batch(model: torch.nn.Module, batch: int, slots: int) -> dict[str, Any]:
    """A timm NaFlex batch (timm's ``Patchify`` + ``NaFlexCollator``): images of
    ``slots`` patches and of 3/4 of them, alternating."""
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import Patchify

    p = model.embeds.patch_size[0]
    side = int(slots**0.5) * p
    gen = torch.Generator().manual_seed(0)
    shapes = [(side, side * (4 - i % 2) // 4) for i in range(batch)]
    samples = [(Patchify(p)(torch.randn(3, h, w, generator=gen)), 0) for h, w in shapes]
    out, _ = NaFlexCollator(max_seq_len=slots)(samples)
    return {"x": {k: out[k] for k in ("patches", "patch_coord", "patch_valid")}}


def inputs_for(name: str, model: torch.nn.Module, a: argparse.Namespace) -> dict[str, Any]:
    if name == "naflex_so400m":
        return naflex_batch(model, a.batch, 16 if a.tiny else 256)
    return rope_vit_inputs(name, model, a.batch, "cpu", a.tiny)


def final_tokens(model: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """Tokens leaving the last block."""
    with torch.inference_mode():
        if "x" in inputs:
            x = inputs["x"]
            if isinstance(x, dict):
                out = model.forward_features(x["patches"], x["patch_coord"], x["patch_valid"])
                return out["patches"].shape[1]
            return model.forward_features(x).shape[1]
        return model(**inputs).last_hidden_state.shape[1]


def configs(name: str, a: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, dict]]:
    """``{label: (model, options)}``: the unpatched model and patched copies of it."""
    base = build_rope_vit(name, depth=a.depth, tiny=a.tiny)
    rows = ROPE_VITS[name].rows(*((2, 16) if a.tiny else (a.depth,)))
    out = {}
    for label, method, options in rows:
        if "backend" in options:  # on the CPU "auto" is the torch path already
            continue
        model = base if method is None else copy.deepcopy(base)
        if method is not None:
            atc_patch.apply_patch(model, method, **options)
        out[label] = (model, dict(options, method=method or ""))
    return out


def call(model: torch.nn.Module, inputs: dict[str, Any]) -> None:
    if "x" in inputs:
        model(inputs["x"])
    else:
        model(**inputs)


def measure(name: str, a: argparse.Namespace, bar: tqdm) -> list[dict]:
    cfgs = configs(name, a)
    inputs = inputs_for(name, cfgs["unpatched"][0], a)
    tokens = {k: final_tokens(m, inputs) for k, (m, _) in cfgs.items()}
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    order, rng = list(cfgs), random.Random(0)
    with torch.inference_mode():
        for _ in range(a.rounds):
            rng.shuffle(order)
            for label in order:
                start = time.perf_counter()
                call(cfgs[label][0], inputs)
                times[label].append(time.perf_counter() - start)
                bar.update(1)
    skip = int(a.rounds * a.throw_out)
    times = {k: t[skip:] for k, t in times.items()}
    speed = {k: a.batch * len(t) / sum(t) for k, t in times.items()}
    spec, model = ROPE_VITS[name], cfgs["unpatched"][0]
    width = getattr(model, "embed_dim", None) or model.config.hidden_size
    rows = []
    for label, (_, options) in cfgs.items():
        q1, med, q3 = ratio_spread(times[label], times["unpatched"])
        rows.append(
            {
                "model": name,
                "title": spec.title,
                "class": type(model).__name__,
                "width": width,
                "depth": len(model.blocks) if hasattr(model, "blocks") else a.depth,
                "tokens_in": tokens["unpatched"],
                "batch": a.batch,
                "threads": torch.get_num_threads(),
                "config": label,
                "options": ", ".join(f"{k}={v}" for k, v in options.items()),
                "tokens_out": tokens[label],
                "images_per_s": round(speed[label], 3),
                "vs_unpatched": round(speed[label] / speed["unpatched"], 3),
                "vs_unpatched_q1": round(q1, 3),
                "vs_unpatched_median": round(med, 3),
                "vs_unpatched_q3": round(q3, 3),
                "rounds_kept": len(times[label]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows: list[dict] = []
    per_model = 1 + 4  # unpatched and the CPU rows of RopeViT.rows
    with tqdm(total=len(a.models) * per_model * a.rounds, desc="forwards (round-robin)") as bar:
        for name in a.models:
            bar.set_postfix_str(name)
            part = measure(name, a, bar)
            rows += part
            for r in part:
                tqdm.write(
                    f"{r['title']:<30} {r['config']:<16} {r['tokens_in']:>5} -> "
                    f"{r['tokens_out']:>5} {r['images_per_s']:>8.3f} img/s  "
                    f"{r['vs_unpatched_median']:.3f} [{r['vs_unpatched_q1']:.3f}, "
                    f"{r['vs_unpatched_q3']:.3f}]"
                )
    a.out_dir.mkdir(parents=True, exist_ok=True)
    path = a.out_dir / "vit_speed.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
