"""Diffusion-transformer step time: unpatched vs every atc_patch method, per model class.

Random-init transformers at their real widths (FLUX.1: 3072 channels, 24 heads of 128;
SD3-medium: 1536 channels, 24 heads of 64) with reduced depth, on 4096 image tokens (a 64x64
token grid = 1024x1024 px) and their text lengths (Flux-dev: 512 T5 tokens; SD3: 77 CLIP +
256 T5 = 333). The current image transformers (QwenImage, Z-Image, FLUX.2, Chroma, CogView4,
HiDream, Sana) at their published width with one block of each kind
(``atc_patch.testing.image_dits``, ``"<name>-width"``), at a realistic size each
(:data:`CURRENT`: QwenImage 1328x1328 = 6889 tokens, Sana 1024x1024 = 1024 tokens through its
/32 autoencoder, the others 1024x1024 = 4096). The video transformers (Wan 2.1 14B, CogVideoX-5b,
LTX-Video 2B, HunyuanVideo) likewise (``atc_patch.testing.video_dits``) on a few latent frames
of their published resolution (:data:`VIDEO`; ``--frames`` sets how many; LTX-Video at its
full 161 frames). One process run times every configuration side
by side on the same model and inputs, in interleaved rounds (the machines are shared and
noisy: compare the ratios, which are taken within a round, and read their spread over rounds).

    # the issue's configuration: Flux 2 double + 4 single blocks, SD3 4 blocks, 3 ratios
    python benchmarks/dit_speed.py
    # the headline (ratio 0.5) on one block of each kind, a quicker CPU run
    python benchmarks/dit_speed.py --double 1 --single 1 --sd3_layers 1 --ratios 0.5
    # the current image transformers, attention only and with the MLP too
    python benchmarks/dit_speed.py --models qwenimage sana --ratios 0.5 --mlp_too \
        --methods unpatched tome_sd atc-average
    # the video transformers (one block of each kind, a few frames)
    python benchmarks/dit_speed.py --models wan cogvideox ltx hunyuanvideo --ratios 0.5 \
        --mlp_too --methods unpatched tome_sd atc-average
    # a smoke run
    python benchmarks/dit_speed.py --tokens 64 --width_div 16 --ratios 0.5 --rounds 1

Step time: one transformer call (batch ``--batch``; 1 = Flux-dev, guidance-distilled, no CFG
batch) after ``--warmup`` calls, median over ``--rounds`` (each round in a shuffled order).
``vs_unpatched`` is the median over rounds of (step / unpatched step), with its min-max range;
with ``--paired`` (default) the unpatched step is timed right before each configuration, so a
load that drifts during the run (shared machines) cancels in the ratio.

Breakdown (rows ``kind=kernel`` / ``kind=attention``): on the first block's real input, the
clustering call of each method (``cluster_tokens`` at ``r = ratio * N``) and the attention
sublayer (projections + joint attention, with rotary on Flux) at ``N`` and at ``N - r`` image
tokens: compare the kernel time with the attention time the merge saves.

Writes ``<out_dir>/dit_speed.csv`` and ``dit_speed.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import atc_patch
from atc_patch.kernel import cluster_tokens
from atc_patch.kernel.scratch import release_workspace
from atc_patch.patch.diffusion.core import metric_projection
from atc_patch.testing import transformer_config, transformer_inputs

METHODS = (
    "unpatched",
    "tome_sd",
    "atc-single",
    "atc-complete",
    "atc-average",
    "tome",
    "kmedoids",
    "dpcknn",
)
# the current image transformers: (image tokens, text tokens) at a realistic size
CURRENT = {
    "qwenimage": (6889, 256),  # 1328x1328: 83x83 packed tokens; Qwen2.5-VL prompt
    "zimage": (4096, 512),  # 1024x1024; Qwen3 caption (padded to a multiple of 32)
    "flux2": (4096, 512),  # 1024x1024; Mistral text
    "chroma": (4096, 512),  # 1024x1024; T5
    "cogview4": (4096, 128),  # 1024x1024; GLM-4 text (padded to a multiple of 16)
    "hidream": (4096, 128),  # 1024x1024; 128 T5 + 128 Llama + 128 Llama per block = 384
    "sana": (1024, 300),  # 1024x1024 through the /32 DC-AE; Gemma-2 text
}
# the video transformers: ((latent frames, height, width) in tokens, text tokens); a few of the
# frames of their published resolution on a CPU (the whole video: gpu_model.py)
VIDEO = {
    "wan": ((2, 30, 52), 512),  # 480x832 (of 81 frames = 21 latent ones); umT5 text
    "cogvideox": ((3, 30, 45), 226),  # 480x720 (of 49 frames = 13 latent ones); T5 text
    "ltx": ((21, 15, 22), 128),  # 704x480 x 161 frames: the whole video; T5 text
    "hunyuanvideo": ((2, 34, 60), 256),  # 544x960 (of 129 frames = 33 latent ones); Llava
}
MODELS = ("flux", "sd3", *CURRENT, *VIDEO)


@dataclass(frozen=True)
class Config:
    method: str  # one of METHODS
    ratio: float
    metric_dim: int | None = None  # the patch option; None = cluster the tokens themselves
    more: bool = False  # also the MLP (Sana: the cross-attention queries); else --merge_mlp

    @property
    def label(self) -> str:
        return (
            self.method
            + (f"@{self.metric_dim}" if self.metric_dim else "")
            + ("+mlp" if self.more else "")
        )

    def kernel_args(self) -> tuple[str, dict]:
        if self.method.startswith("atc-"):
            return "atc", {"linkage": self.method.split("-", 1)[1]}
        return self.method, {}

    def apply(self, model: torch.nn.Module, merge_mlp: bool) -> None:
        if self.method == "unpatched":
            return
        method, opts = self.kernel_args()
        if method == "tome_sd":
            opts["seed"] = 0
        if type(model).__name__.startswith("Sana"):  # a conv MLP: its cross-attention instead
            opts["merge_crossattn"] = self.more or merge_mlp
        else:
            opts["merge_mlp"] = self.more or merge_mlp
        atc_patch.apply_patch(
            model, method=method, ratio=self.ratio, metric_dim=self.metric_dim, **opts
        )


def build(kind: str, a: argparse.Namespace) -> tuple[torch.nn.Module, dict, int]:
    """The model, its inputs and its text length."""
    import diffusers

    if kind in CURRENT:
        return build_current(kind, a)
    if kind in VIDEO:
        return build_video(kind, a)
    name, kw = transformer_config("flux-width" if kind == "flux" else "sd3-width")
    if kind == "flux":
        kw.update(num_layers=a.double, num_single_layers=a.single)
        text = a.text_flux
    else:
        kw.update(num_layers=a.sd3_layers)
        text = a.text_sd3
    if a.width_div > 1:  # smoke runs: same layout, narrower
        kw["num_attention_heads"] = max(1, kw["num_attention_heads"] // a.width_div)
        if kind == "sd3":
            kw["caption_projection_dim"] = kw["num_attention_heads"] * kw["attention_head_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, name)(**kw).eval().to(a.device)
    return model, square_inputs(model, a.tokens or 4096, text, a), text


def build_current(kind: str, a: argparse.Namespace) -> tuple[torch.nn.Module, dict, int]:
    """A current image transformer at its real width, one block of each kind (``--width_div``
    > 1: the tiny configuration), its inputs at ``--tokens`` (default: :data:`CURRENT`)."""
    import diffusers

    name, kw = transformer_config(f"tiny-{kind}" if a.width_div > 1 else f"{kind}-width")
    tokens, text = CURRENT[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, name)(**kw).eval().to(a.device)
    return model, square_inputs(model, a.tokens or tokens, text, a), text


def build_video(kind: str, a: argparse.Namespace) -> tuple[torch.nn.Module, dict, int]:
    """A video transformer at its real width, one block of each kind (``--width_div`` > 1: the
    tiny configuration), on :data:`VIDEO`'s grid (``--frames``: that many latent frames)."""
    import diffusers

    name, kw = transformer_config(f"tiny-{kind}" if a.width_div > 1 else f"{kind}-width")
    (f, h, w), text = VIDEO[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, name)(**kw).eval().to(a.device)
    inputs = transformer_inputs(model, batch=a.batch, frames=a.frames or f, height=h, width=w,
                                seq_len=text)  # fmt: skip
    return model, move(inputs, a.device), text


def tokens_of(kind: str, a: argparse.Namespace) -> int:
    if kind in VIDEO:
        (f, h, w), _ = VIDEO[kind]
        return (a.frames or f) * h * w
    return a.tokens or CURRENT.get(kind, (4096,))[0]


def square_inputs(model: torch.nn.Module, tokens: int, text: int, a: argparse.Namespace) -> dict:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise SystemExit(f"--tokens must be a square number, got {tokens}")
    inputs = transformer_inputs(model, batch=a.batch, height=side, width=side, seq_len=text)
    return move(inputs, a.device)


def move(tree, device: str):
    if torch.is_tensor(tree):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: move(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(move(v, device) for v in tree)
    return tree


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_config(model, inputs: dict, a, cfg: Config, warm: bool) -> float:
    """Seconds of one call of ``model`` patched as ``cfg`` (after the warm-up calls if ``warm``)."""
    cfg.apply(model, a.merge_mlp)
    try:
        for _ in range(a.warmup if warm else 0):
            model(**inputs)
        return timed(functools.partial(model, **inputs), a.device)
    finally:
        atc_patch.remove_patch(model)
        release_workspace()


def breakdown(model, inputs, kind: str, todo: list[Config], a) -> list[dict]:
    """Kernel time per method and attention-sublayer time at N and N - r image tokens."""
    block = model.transformer_blocks[0]
    seen: dict = {}
    hook = block.register_forward_pre_hook(
        lambda m, args, kw: seen.update(args=args, kw=kw), with_kwargs=True
    )
    model(**inputs)
    hook.remove()
    kw = dict(seen["kw"])
    x = seen["args"][0] if seen["args"] else kw["hidden_states"]
    ctx = kw["encoder_hidden_states"]
    rotary = kw.get("image_rotary_emb")
    n = x.shape[1]
    side = int(round(n**0.5))
    rows = []

    def attn_at(keep: int) -> float:
        xs = x[:, :keep]
        extra = {}
        if rotary is not None:  # one (S, D) table: text rows then `keep` image rows
            t = ctx.shape[1]
            extra["image_rotary_emb"] = tuple(r[: t + keep] for r in rotary)
        return timed(lambda: block.attn(hidden_states=xs, encoder_hidden_states=ctx, **extra),
                     a.device)  # fmt: skip

    for ratio in sorted({c.ratio for c in todo if c.method != "unpatched"}):
        r = int(n * ratio)
        attn_at(n)  # warm-up
        full = statistics.median(attn_at(n) for _ in range(a.rounds))
        merged = statistics.median(attn_at(n - r) for _ in range(a.rounds))
        rows.append(dict(model=kind, kind="attention", method="", ratio=ratio,
                         full_s=round(full, 4), merged_s=round(merged, 4),
                         saved_s=round(full - merged, 4)))  # fmt: skip
        for cfg in todo:
            if cfg.method == "unpatched" or cfg.ratio != ratio:
                continue
            method, opts = cfg.kernel_args()
            if method == "tome_sd":
                opts.update(h=side, w=side, generator=torch.Generator().manual_seed(0))
            metric = x
            if cfg.metric_dim:
                metric = x @ metric_projection(x.shape[-1], cfg.metric_dim, x)

            call = functools.partial(cluster_tokens, metric, r, method, **opts)

            call()  # warm-up (the ATC buffers)
            t = statistics.median(timed(call, a.device) for _ in range(a.rounds))
            release_workspace()
            rows.append(dict(model=kind, kind="kernel", method=cfg.label, ratio=ratio,
                             kernel_s=round(t, 4)))  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    steps = [r for r in rows if r["kind"] == "step"]
    models = sorted({r["model"] for r in steps})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in dict.fromkeys(r["method"] for r in steps):
            pts = [(r["ratio"], r["step_s"]) for r in steps if r["model"] == model
                   and r["method"] == method]  # fmt: skip
            if not pts:
                continue
            if method == "unpatched":
                ax.axhline(pts[0][1], color="k", ls="--", label=method)
            else:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=method)
        ax.set_title(model)
        ax.set_xlabel("reduction ratio")
        ax.set_ylabel("step time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()  # not set_grad_enabled(False): main() is also called from the tests
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["flux", "sd3"], choices=MODELS)
    p.add_argument("--double", type=int, default=2, help="Flux double-stream blocks")
    p.add_argument("--single", type=int, default=4, help="Flux single-stream blocks")
    p.add_argument("--sd3_layers", type=int, default=4, help="SD3 joint blocks")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="image tokens, a square number (default: 4096; CURRENT per model)",
    )
    p.add_argument("--frames", type=int, default=None, help="video latent frames (default: VIDEO)")
    p.add_argument("--text_flux", type=int, default=512, help="Flux text tokens (T5)")
    p.add_argument("--text_sd3", type=int, default=333, help="SD3 text tokens (CLIP + T5)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--merge_mlp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--mlp_too",
        action="store_true",
        help="also time every method with merge_mlp (Sana: merge_crossattn), '+mlp'",
    )
    p.add_argument(
        "--metric_dim",
        type=int,
        default=None,
        help="also time --metric_methods with the patch option metric_dim=this",
    )
    p.add_argument("--metric_methods", nargs="+", default=["tome_sd", "atc-single", "atc-average"],
                   choices=METHODS[1:])  # fmt: skip
    p.add_argument("--width_div", type=int, default=1, help="divide the heads (smoke runs)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per config, round 1")
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over all configs")
    p.add_argument(
        "--paired",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time an unpatched call right before every config (ratios per pair)",
    )
    p.add_argument("--no_breakdown", action="store_true", help="skip kernel/attention timing")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out_dir", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    methods = ["unpatched"] + [m for m in a.methods if m != "unpatched"]
    todo = [Config("unpatched", 0.0)] + [Config(m, r) for r in a.ratios for m in methods[1:]]
    if a.metric_dim:
        todo += [Config(m, r, a.metric_dim) for r in a.ratios for m in a.metric_methods]
    if a.mlp_too:
        todo += [dataclasses.replace(c, more=True) for c in todo[1:]]

    rows: list[dict] = []
    for kind in a.models:
        model, inputs, text = build(kind, a)
        times: dict[Config, list[float]] = {c: [] for c in todo}
        rel: dict[Config, list[float]] = {c: [] for c in todo}
        model(**inputs)  # first call: page faults of fresh buffers, paid by no configuration
        per_round = len(todo) - 1 if a.paired else len(todo)
        n = tokens_of(kind, a)
        bar = tqdm(total=per_round * a.rounds, desc=f"{kind} N={n} T={text}")
        unpatched = todo[0]

        measure = functools.partial(measure_config, model, inputs, a)
        for rnd in range(a.rounds):
            order = todo[1:]
            random.Random(rnd).shuffle(order)  # load drifts: no config always runs last
            if not a.paired:
                base = measure(unpatched, rnd == 0)
                times[unpatched].append(base)
                rel[unpatched].append(1.0)
                bar.update()
            for cfg in order:
                if a.paired:  # an unpatched call right before each config: ratio of the pair
                    base = measure(unpatched, False)
                    times[unpatched].append(base)
                    rel[unpatched].append(1.0)
                t = measure(cfg, rnd == 0)
                times[cfg].append(t)
                rel[cfg].append(t / base)
                bar.update()
        bar.close()
        for c in todo:
            rows.append(dict(model=kind, kind="step", method=c.label, ratio=c.ratio,
                             step_s=round(statistics.median(times[c]), 3),
                             step_min_s=round(min(times[c]), 3), step_max_s=round(max(times[c]), 3),
                             vs_unpatched=round(statistics.median(rel[c]), 3),
                             vs_min=round(min(rel[c]), 3),
                             vs_max=round(max(rel[c]), 3), tokens=n))  # fmt: skip
        if not a.no_breakdown and kind not in CURRENT and kind not in VIDEO:
            rows += breakdown(model, inputs, kind, todo, a)
        del model

    for row in rows:  # step time relative to tome_sd at the same ratio
        ref = [r for r in rows if r["kind"] == "step" and r["model"] == row["model"]
               and r["method"] == "tome_sd" and r["ratio"] == row["ratio"]]  # fmt: skip
        if row["kind"] == "step":
            row["vs_tome_sd"] = round(row["step_s"] / ref[0]["step_s"], 3) if ref else ""

    a.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = a.out_dir / "dit_speed.csv"
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, a.out_dir / "dit_speed.png")
    print(f"\nbatch {a.batch}, {a.tokens or 'default'} image tokens, merge_mlp={a.merge_mlp}, "
          f"{torch.get_num_threads()} threads, device {a.device}, "
          f"{a.rounds} rounds")  # fmt: skip
    print(f"{'model':<13}{'method':<18}{'ratio':>6}{'step s':>9}{'min-max s':>16}"
          f"{'vs unpatched (min-max)':>25}{'vs tome_sd':>11}")  # fmt: skip
    for r in rows:
        if r["kind"] == "step":
            print(f"{r['model']:<13}{r['method']:<18}{r['ratio']:>6}{r['step_s']:>9}"
                  f"{r['step_min_s']:>8}-{r['step_max_s']:<7}"
                  f"{r['vs_unpatched']:>10} ({r['vs_min']}-{r['vs_max']})"
                  f"{r['vs_tome_sd']!s:>11}")  # fmt: skip
    for r in rows:
        if r["kind"] == "attention":
            print(f"{r['model']}: attention sublayer of block 0 at ratio {r['ratio']}: "
                  f"{r['full_s']} s -> {r['merged_s']} s (saves {r['saved_s']} s)")  # fmt: skip
        elif r["kind"] == "kernel":
            print(f"{r['model']}:   kernel {r['method']:<13} ratio {r['ratio']}: "
                  f"{r['kernel_s']} s per block")  # fmt: skip
    print(f"wrote {csv_path} and {a.out_dir / 'dit_speed.png'}")


if __name__ == "__main__":
    main()
