"""Train the small ViT that ships with atc_patch (the demo's model), on scikit-learn's digits.

Reproduces ``src/atc_patch/demo/data/digits_vit.safetensors`` (weights; architecture, split and
test accuracy in the metadata) and ``src/atc_patch/demo/data/digits_test.safetensors`` (the
held-out test split), seeded, on one CPU thread in a few minutes::

    python examples/train_digits.py                         # into src/atc_patch/demo/data
    python examples/train_digits.py --epochs 2 --output_dir /tmp/digits  # a smoke run

The model is a timm ``VisionTransformer`` with one token per pixel (8x8 -> 64 patch tokens +
a class token), see :mod:`atc_patch.demo.digits`. The 1797 images are split 70/30 (stratified,
``random_state=0``); the test split is stored next to the weights so the demo needs neither
scikit-learn nor a download. Needs scikit-learn, timm and safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from atc_patch.demo.digits import MEAN, PIXEL_MAX, STD, build_model, count_correct, normalize

DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "atc_patch" / "data"

# The architecture, stored verbatim in the weights' metadata (atc_patch.demo.digits.build_model).
MODEL_CONFIG = {
    "img_size": 8,
    "patch_size": 1,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "class_token": True,
    "global_pool": "token",
}
TEST_SIZE, SPLIT_SEED = 0.3, 0


def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed train/test split: uint8 images ``(N, 1, 8, 8)`` in 0..16 and int64 labels."""
    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=digits.target
    )
    return (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te).long(),
    )


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each uint8 image by up to ``max_shift`` pixels per axis, filling with background."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


def train(args: argparse.Namespace) -> dict[str, str]:
    """Train, save both files into ``args.output_dir`` and return the weights' metadata."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_split()
    if args.train_subset:  # smoke tests only
        x_tr, y_tr = x_tr[: args.train_subset], y_tr[: args.train_subset]
    model = build_model({**MODEL_CONFIG, "drop_path_rate": args.drop_path})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warmup, then cosine to 0
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), args.batch_size):
            idx = order[i : i + args.batch_size]
            x = random_shift(x_tr[idx], gen, args.shift) if args.shift else x_tr[idx]
            loss = F.cross_entropy(
                model(normalize(x)), y_tr[idx], label_smoothing=args.label_smoothing
            )
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if (epoch + 1) % args.log_every == 0 or epoch + 1 == args.epochs:
            acc = count_correct(model.eval(), x_te, y_te) / len(y_te)
            elapsed = time.perf_counter() - start
            msg = f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  test acc {acc:.4f}"
            print(f"{msg}  {elapsed:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    correct = count_correct(model, x_te, y_te)
    train_args = {k: v for k, v in vars(args).items() if k != "output_dir"}
    meta = {
        "config": json.dumps(MODEL_CONFIG),  # drop_path is training-only: not part of it
        "embedding": "atc_patch.demo.digits.PixelEmbed (3x3 conv, stride 1)",
        "normalize": json.dumps({"pixel_max": PIXEL_MAX, "mean": MEAN, "std": STD}),
        "test_correct": str(correct),
        "test_size": str(len(y_te)),
        "test_accuracy": f"{correct / len(y_te):.6f}",
        "split": f"sklearn load_digits, train_test_split(test_size={TEST_SIZE}, "
        f"random_state={SPLIT_SEED}, stratify=target)",
        "train": json.dumps(train_args),
        "train_seconds": f"{seconds:.0f}",
        "torch": torch.__version__,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "digits_vit.safetensors"), metadata=meta)
    save_file(
        {"images": x_te.contiguous(), "labels": y_te.contiguous()},
        str(out / "digits_test.safetensors"),
        metadata={"split": meta["split"], "pixel_max": str(PIXEL_MAX)},
    )
    print(f"test accuracy {correct / len(y_te):.4f} ({correct}/{len(y_te)}) in {seconds:.0f} s")
    print(f"saved {out / 'digits_vit.safetensors'} and {out / 'digits_test.safetensors'}")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the digits ViT shipped with atc_patch (seeded, CPU)."
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_epochs", type=int, default=1)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--drop_path", type=float, default=0.0)
    p.add_argument("--shift", type=int, default=1, help="random shift augmentation (pixels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument("--train_subset", type=int, default=0, help="train on the first N (smoke test)")
    p.add_argument("--output_dir", default=str(DATA_DIR))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
