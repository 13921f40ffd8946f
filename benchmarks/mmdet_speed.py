"""Forward time of ViT-Adapter backbones and Mask R-CNN with ATC / ToMe token reduction.

Every configuration runs in one process on the same weights (random init, eval, no grad), in
interleaved rounds so machine noise hits all of them alike; the CSV holds the median and the
ratio to the unreduced model of the same size and part.

    python benchmarks/mmdet_speed.py --sizes 512 1024 --out mmdet_speed.csv
    python benchmarks/mmdet_speed.py --model s --ratios 0.7 --linkages average single
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from atc_patch.demo.argtypes import kernel_threads_policy, positive_int
from atc_patch.kernel.threads import set_kernel_threads


@dataclass(frozen=True)
class Variant:
    method: str | None
    linkage: str | None = None
    ratio: float | None = None

    @property
    def name(self) -> str:
        if self.method is None:
            return "none"
        return f"{self.method}{'-' + self.linkage if self.linkage else ''}-{self.ratio}"

    def settings(self) -> dict:
        if self.method is None:
            return dict(method=None)
        return dict(
            method=self.method,
            linkage=self.linkage,
            reduction_loc=[3, 6, 9],
            reduction_ratio=self.ratio,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["t", "s"], default="t", help="ViT-Adapter-T or -S")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square image sizes")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.25], help="keep ratios")
    p.add_argument("--linkages", nargs="+", default=["average"], help="ATC linkages")
    p.add_argument(
        "--parts", nargs="+", choices=["backbone", "detector"], default=["backbone", "detector"]
    )
    p.add_argument("--repeats", type=int, default=3, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
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
    p.add_argument("--out", default="mmdet_speed.csv", help="CSV path")
    return p.parse_args(argv)


def variants(args: argparse.Namespace) -> list[Variant]:
    out = [Variant(None)]
    for ratio in args.ratios:
        out.append(Variant("tome", None, ratio))
        out += [Variant("atc", linkage, ratio) for linkage in args.linkages]
    return out


def build_detector(model: str) -> torch.nn.Module:
    """Mask R-CNN + ViT-Adapter from the packaged config (BN, random init, fixed 100 dets)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from atc_patch.mmdet import config_path

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config_path(f"vit-adapter-{model}-3x"))
    cfg.model.backbone.norm_cfg = dict(type="BN")
    # Keep the top 100 detections whatever their scores, so every variant runs the box and mask
    # heads on the same number of objects (random weights would otherwise change that count).
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    torch.manual_seed(0)
    detector = MODELS.build(cfg.model)
    detector.init_weights()
    return detector.eval()


def forward_fn(detector: torch.nn.Module, part: str, size: int) -> Callable[[], object]:
    """A closure running one forward of ``part`` on a fixed random ``size x size`` image."""
    from mmdet.structures import DetDataSample

    img = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if part == "backbone":
        return lambda: detector.backbone(img)
    shape = (size, size)
    meta = dict(
        img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
        scale_factor=(1.0, 1.0),
    )  # fmt: skip
    return lambda: detector.predict(img, [DetDataSample(metainfo=meta)], rescale=True)


def tokens_after_last_reduction(backbone: torch.nn.Module, size: int) -> int:
    from atc_patch.mmdet import expected_token_counts

    counts = expected_token_counts(backbone.reduction, backbone.depth, (size // 16) ** 2)
    return counts[-1]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_kernel_threads(args.kernel_threads)
    detector = build_detector(args.model)
    backbone = detector.backbone
    rows = []
    jobs = [(size, part) for size in args.sizes for part in args.parts]
    for size, part in tqdm(jobs, desc="sizes x parts", file=sys.stderr):
        run = forward_fn(detector, part, size)
        times: dict[Variant, list[float]] = {v: [] for v in variants(args)}
        rounds = args.warmup + args.repeats
        with torch.no_grad():
            for k in tqdm(range(rounds), desc=f"{part} {size}px", leave=False, file=sys.stderr):
                for v in times:
                    backbone.configure_reduction(**v.settings())
                    start = time.perf_counter()
                    run()
                    if k >= args.warmup:
                        times[v].append(time.perf_counter() - start)
        base = statistics.median(times[Variant(None)])
        for v, ts in times.items():
            backbone.configure_reduction(**v.settings())
            med = statistics.median(ts)
            rows.append(
                dict(
                    model=f"ViT-Adapter-{args.model.upper()}",
                    size=size,
                    part=part,
                    variant=v.name,
                    method=v.method or "none",
                    linkage=v.linkage or "",
                    keep_ratio=v.ratio if v.ratio is not None else 1.0,
                    tokens_first=(size // 16) ** 2,
                    tokens_last=tokens_after_last_reduction(backbone, size),
                    ms_median=round(1000 * med, 1),
                    ms_min=round(1000 * min(ts), 1),
                    speedup=round(base / med, 3),
                )
            )
    backbone.configure_reduction(None)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(
            f"{r['model']:14s} {r['size']:5d} {r['part']:9s} {r['variant']:18s} "
            f"tokens {r['tokens_first']:5d}->{r['tokens_last']:5d}  "
            f"{r['ms_median']:9.1f} ms  x{r['speedup']:.2f}"
        )
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
