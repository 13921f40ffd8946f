"""The shape of the ATC paper's main table on the shipped digits ViT, through train_deit.py.

For every method (ATC with each linkage, ToMe) and keep rate, the same fine-tuning recipe
(epochs, seed, learning rate, batch) runs through ``examples/train_deit.py`` with
``--reduction_loc 1 2 3``; its evaluation before the first step is the off-the-shelf accuracy.
Then the 2x2 digit mosaics (``examples/make_digit_datasets.py``) train multi-label with the
ASL loss in the COCO 2014 and NUS-WIDE layouts, and report mAP::

    python examples/make_digit_datasets.py --output_dir data/digits
    python benchmarks/finetune_digits.py --data data/digits --output_dir outputs/finetune_digits

Writes ``classification.csv``, ``multilabel.csv`` and ``finetune_digits.png``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    ("ATC single", "atc", "single"),
    ("ATC complete", "atc", "complete"),
    ("ATC average", "atc", "average"),
    ("ToMe", "tome", None),
]


def load_train_deit():
    spec = importlib.util.spec_from_file_location("train_deit", ROOT / "examples" / "train_deit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe(args: argparse.Namespace) -> list[str]:
    return [
        "--epochs",
        str(args.epochs),
        "--warmup-epochs",
        "1",
        "--lr",
        str(args.lr),
        "--lr_batch_normalizer",
        "64",
        "--batch-size",
        "64",
        "--min-lr",
        "1e-5",
        "--warmup-lr",
        "1e-5",
        "--sched_in_steps",
        "--no-model-ema",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--reprob",
        "0",
        "--drop-path",
        "0",
        "--num_workers",
        "0",
        "--seed",
        str(args.seed),
        "--no_progress",
    ]


def run_one(train_deit, argv: list[str]) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    rows = train_deit.main(argv)["rows"]
    return rows, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/digits")
    p.add_argument("--output_dir", default="outputs/finetune_digits")
    p.add_argument("--keep_rate", type=float, nargs="+", default=[0.25, 0.5, 0.7])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ml_epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip_multilabel", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_deit = load_train_deit()
    data = Path(args.data)

    configs = [(label, m, link, k) for k in args.keep_rate for label, m, link in METHODS]
    rows = []
    for label, method, linkage, keep in tqdm(configs, desc="classification"):
        argv = [
            "--dataset",
            "imagenet",
            "--data",
            str(data / "imagefolder"),
            "--model",
            f"{method}_digits",
            "--input-size",
            "8",
            "--reduction_loc",
            "1",
            "2",
            "3",
            "--keep_rate",
            str(keep),
            "--output_dir",
            "",
        ] + recipe(args)
        if linkage:
            argv += ["--linkage", linkage, "--proportional_attn"]
        log, seconds = run_one(train_deit, argv)
        rows.append(
            {
                "method": label,
                "keep_rate": keep,
                "off_the_shelf": log[0]["val_acc1"],
                "fine_tuned": log[-1]["val_acc1"],
                "seconds": round(seconds, 1),
            }
        )
        tqdm.write(str(rows[-1]))
    _write(out / "classification.csv", rows)

    ml_rows = []
    if not args.skip_multilabel:
        ml = [
            ("coco", "ATC average", "atc", "average"),
            ("coco", "ToMe", "tome", None),
            ("coco", "no reduction", "deit", None),
            ("nuswide", "ATC average", "atc", "average"),
        ]
        for dataset, label, method, linkage in tqdm(ml, desc="multi-label"):
            argv = [
                "--dataset",
                dataset,
                "--data",
                str(data / dataset),
                "--model",
                f"{method}_digits",
                "--input-size",
                "16",
                "--output_dir",
                "",
                "--aa",
                "",
            ] + recipe(args)
            argv[argv.index("--epochs") + 1] = str(args.ml_epochs)
            if method != "deit":
                argv += ["--reduction_loc", "1", "2", "3", "--keep_rate", "0.5"]
            if linkage:
                argv += ["--linkage", linkage, "--proportional_attn"]
            log, seconds = run_one(train_deit, argv)
            ml_rows.append(
                {
                    "dataset": dataset,
                    "method": label,
                    "keep_rate": 1.0 if method == "deit" else 0.5,
                    "mAP_before": log[0]["val_mAP"],
                    "mAP_fine_tuned": log[-1]["val_mAP"],
                    "seconds": round(seconds, 1),
                }
            )
            tqdm.write(str(ml_rows[-1]))
        _write(out / "multilabel.csv", ml_rows)
    _plot(rows, out / "finetune_digits.png")
    print(f"wrote {out}")


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, _, _) in enumerate(METHODS):
        r = [x for x in rows if x["method"] == label]
        k = [x["keep_rate"] for x in r]
        color = f"C{i}"
        ax.plot(k, [x["fine_tuned"] for x in r], "o-", color=color, label=f"{label} fine-tuned")
        ax.plot(
            k,
            [x["off_the_shelf"] for x in r],
            "x--",
            color=color,
            alpha=0.6,
            label=f"{label} off-the-shelf",
        )
    ax.set_xlabel("keep rate (reduction_loc 1 2 3)")
    ax.set_ylabel("digits test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
