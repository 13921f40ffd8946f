"""Inference throughput of a ViT: unpatched vs ToMe vs a kernel method, in one run.

The counterpart of the ATC repository's ``benchmark_merging_method.py``, for timm models
(``--model``) and Hugging Face transformers vision encoders (``--hf_model vit|dinov2|clip|
siglip``, built from their base-size configs). Batch sizes are given as powers of two
(``--batch_sizes 0 1 5`` = 1, 2, 32). The configurations are timed round-robin (one forward of
each in turn, in a shuffled order every round), so drift of a shared machine hits them alike;
throughput is ``batch * kept_runs / time`` after throwing out the first ``--throw_out``
fraction of runs, and each ratio is also given as the median and quartiles of its per-round
ratios (the spread).

    python benchmarks/throughput.py --model deit_small_patch16_224 --input_size 224 \\
        --batch_sizes 5 --runs 40 --keep_rate 0.7 --reduction_loc 3 6 9 \\
        --method atc --linkage average --output_dir bench_out
    python benchmarks/throughput.py --hf_model vit --r 8 --batch_sizes 3 --runs 20 --threads 2
    python benchmarks/throughput.py --output_dir out --model atc_small_patch16_224 \
        --input_size 224 --runs 2000 --throw_out 0.25 --reduction_ratio 0.5 \
        --batch_sizes 0 1 2 3 4 5 6 7 8 9 10 --linkage complete   # the reference README's

Writes ``<output_dir>/throughput_<model>.csv`` and ``.png`` and prints the table with ratios
to the unpatched model and to ToMe. Models are random-init (no weights are downloaded).
"""

from __future__ import annotations

import argparse
import copy
import csv
import random
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import atc_patch
from atc_patch.demo.argtypes import fraction, non_negative_int, positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="deit_small_patch16_224",
        help="timm model name; atc_/tome_{tiny,small,base}_patch16_224 (the reference's names) "
        "time timm's DeiT of that size with that method",
    )
    p.add_argument(
        "--hf_model", choices=list(HF_MODELS), default=None, help="a transformers model instead"
    )
    p.add_argument("--input_size", type=positive_int, default=224)
    p.add_argument("--runs", type=positive_int, default=40, help="timed forwards per configuration")
    p.add_argument(
        "--throw_out", type=fraction, default=0.25, help="fraction of runs discarded as warm-up"
    )
    p.add_argument(
        "--batch_sizes", type=non_negative_int, nargs="+", default=[5], help="powers of two"
    )
    p.add_argument("--method", default=None, choices=["atc", "tome", "kmedoids", "dpcknn"])
    p.add_argument(
        "--linkage",
        nargs="+",
        default=None,
        choices=list(atc_patch.LINKAGES),
        help="ATC linkage(s), one configuration each (default: average; every one for --hf_model)",
    )
    p.add_argument("--r", type=int, default=None, help="tokens removed per block")
    p.add_argument(
        "--keep_rate",
        "--reduction_ratio",
        dest="keep_rate",
        type=float,
        default=None,
        help="fraction of tokens kept at each --reduction_loc (the reference's --reduction_ratio)",
    )
    p.add_argument("--reduction_loc", type=int, nargs="+", default=None)
    p.add_argument("--prop_attn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--output_dir", default="bench_out")
    args = p.parse_args(argv)
    args.timm_model = args.model
    named = re.fullmatch(r"(atc|tome)_(tiny|small|base)_patch16_(\d+)", args.model)
    if named is not None:  # the reference's registry names: timm's DeiT + that method
        if args.method not in (None, named[1]):
            p.error(f"--model {args.model} times method {named[1]}, not --method {args.method}")
        args.method, args.timm_model = named[1], f"deit_{named[2]}_patch16_{named[3]}"
    args.method = args.method or "atc"
    if args.r is None and args.keep_rate is None:
        args.keep_rate = 0.7
    if args.keep_rate is not None:
        args.reduction_loc = args.reduction_loc or [3, 6, 9]
    if args.linkage is None:
        args.linkage = list(atc_patch.LINKAGES) if args.hf_model else ["average"]
    if args.hf_model:
        args.model = f"hf_{args.hf_model}"
    return args


# --hf_model: (config class, model class, config overrides) of the base-size checkpoints
HF_MODELS = {
    "vit": ("ViTConfig", "ViTForImageClassification", {}),  # google/vit-base-patch16-224
    "dinov2": ("Dinov2Config", "Dinov2Model", {}),  # facebook/dinov2-base at 224 px (256 patches)
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", {"patch_size": 16}),  # clip-vit-base-patch16
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", {}),  # google/siglip-base-patch16-224
}


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    """The unpatched random-init model (``--hf_model`` or the timm ``--model``)."""
    torch.manual_seed(0)
    if args.hf_model is None:
        import timm

        return timm.create_model(args.timm_model, pretrained=False, img_size=args.input_size).eval()
    import transformers

    config_cls, model_cls, overrides = HF_MODELS[args.hf_model]
    config = getattr(transformers, config_cls)(image_size=args.input_size, **overrides)
    return getattr(transformers, model_cls)(config).eval()


def build_configs(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """``{label: model}``: the unpatched model, ToMe and ``--method`` (each ``--linkage`` for
    ATC), sharing the same weights."""
    base = build_base(args)
    schedule = (
        {"r": args.r}
        if args.r is not None
        else {"keep_rate": args.keep_rate, "reduction_loc": args.reduction_loc}
    )
    configs = {"unpatched": base}
    methods = [("tome", {})]
    if args.method == "atc":
        methods += [("atc", {"linkage": linkage}) for linkage in args.linkage]
    elif args.method != "tome":
        methods.append((args.method, {}))
    for method, extra in methods:
        model = copy.deepcopy(base)
        atc_patch.apply_patch(model, method=method, prop_attn=args.prop_attn, **schedule, **extra)
        label = method if not extra else f"{method}({extra['linkage']})"
        configs[label] = model
    return configs


def final_tokens(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Number of tokens leaving the last block for input ``x``."""
    with torch.inference_mode():
        if hasattr(model, "forward_features"):  # timm
            return model.forward_features(x[:1]).shape[1]
        return model(x[:1], output_hidden_states=True).hidden_states[-1].shape[1]


def measure(
    configs: dict[str, torch.nn.Module], batch: int, args: argparse.Namespace, bar: tqdm
) -> dict[str, list[float]]:
    """Seconds per forward of every configuration at one batch size, timed round-robin in a
    shuffled order each round; the first ``--throw_out`` fraction of rounds is dropped."""
    x = torch.randn(batch, 3, args.input_size, args.input_size)
    times: dict[str, list[float]] = {k: [] for k in configs}
    order = list(configs)
    rng = random.Random(0)
    with torch.inference_mode():
        for _ in range(args.runs):
            rng.shuffle(order)
            for label in order:
                start = time.perf_counter()
                configs[label](x)
                times[label].append(time.perf_counter() - start)
            bar.update(1)
    skip = int(args.runs * args.throw_out)
    return {k: t[skip:] for k, t in times.items()}


def ratio_spread(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Quartiles (25 %, median, 75 %) of the per-round speed-ups ``den[i] / num[i]``."""
    ratios = [d / n for n, d in zip(num, den)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return q1, q2, q3


def write_outputs(rows: list[dict], out_dir: Path, model_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"throughput_{model_name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["config"] for r in rows):
        pts = [(r["batch_size"], r["images_per_s"]) for r in rows if r["config"] == label]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"{model_name} throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"throughput_{model_name}.png", dpi=120)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = build_configs(args)
    probe = torch.randn(1, 3, args.input_size, args.input_size)
    tokens = {k: final_tokens(m, probe) for k, m in configs.items()}
    batches = [2**b for b in args.batch_sizes]
    rows = []
    with tqdm(total=len(batches) * args.runs, desc="forwards (round-robin)") as bar:
        for batch in batches:
            times = measure(configs, batch, args, bar)
            speed = {k: batch * len(t) / sum(t) for k, t in times.items()}
            for label, ips in speed.items():
                unp = ratio_spread(times[label], times["unpatched"])
                tome = ratio_spread(times[label], times["tome"])
                rows.append(
                    {
                        "model": args.model,
                        "input_size": args.input_size,
                        "batch_size": batch,
                        "threads": torch.get_num_threads(),
                        "config": label,
                        "final_tokens": tokens[label],
                        "images_per_s": round(ips, 2),
                        "vs_unpatched": round(ips / speed["unpatched"], 3),
                        "vs_tome": round(ips / speed["tome"], 3),
                        "vs_unpatched_q1": round(unp[0], 3),
                        "vs_unpatched_median": round(unp[1], 3),
                        "vs_unpatched_q3": round(unp[2], 3),
                        "vs_tome_q1": round(tome[0], 3),
                        "vs_tome_median": round(tome[1], 3),
                        "vs_tome_q3": round(tome[2], 3),
                    }
                )
    head = f"{'batch':>5} {'config':<16} {'tokens':>6} {'img/s':>9}"
    print(f"\n{head} {'vs unpatched [q1, q3]':>24} {'vs tome [q1, q3]':>24}")
    for r in rows:
        unp = f"{r['vs_unpatched']:.3f} [{r['vs_unpatched_q1']:.3f}, {r['vs_unpatched_q3']:.3f}]"
        tome = f"{r['vs_tome']:.3f} [{r['vs_tome_q1']:.3f}, {r['vs_tome_q3']:.3f}]"
        print(
            f"{r['batch_size']:>5} {r['config']:<16} {r['final_tokens']:>6} "
            f"{r['images_per_s']:>9.2f} {unp:>24} {tome:>24}"
        )
    write_outputs(rows, Path(args.output_dir), args.model)
    return rows


if __name__ == "__main__":
    main()
