"""Write the scikit-learn digits as image datasets in the ATC paper's on-disk layouts.

Seeded and offline (needs scikit-learn); the images are the real 8x8 digit scans (grey PNG,
pixel ``p`` in 0..16 stored as ``round(p * 255 / 16)``)::

    python examples/make_digit_datasets.py --output_dir data/digits

* ``<out>/imagefolder/{train,val}/<digit>/<i>.png``: the split the shipped digits ViT was
  trained and tested on (``atc_patch.demo.digits``), as an ImageNet-style ImageFolder.
* ``<out>/coco/{train2014,val2014}/*.png`` and
  ``<out>/coco/annotations/instances_{train,val}2014.json``: 2x2 mosaics (16x16) of digits,
  one COCO "annotation" per tile (category = digit, bbox = the tile), so each image's target
  is the multi-hot set of digits it shows. Train mosaics use train-split digits only, val
  mosaics val-split digits only.
* ``<out>/nuswide/images/*.png`` + ``<out>/nuswide/nus_wid_data.csv``: the same mosaics in the
  ASL NUS-WIDE csv layout (``filepath,label,split_name`` with labels like ``"['3', '7']"``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = [str(d) for d in range(10)]


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shipped model's split: uint8 ``(N, 8, 8)`` images in 0..16 and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.uint8)
    return tuple(
        train_test_split(images, d.target, test_size=0.3, random_state=0, stratify=d.target)
    )  # x_tr, x_te, y_tr, y_te


def to_png(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(pixels.astype(np.float64) * 255 / 16).astype(np.uint8), "L")


def write_imagefolder(out: Path, x: np.ndarray, y: np.ndarray, split: str) -> None:
    for i, (img, label) in enumerate(zip(x, y)):
        folder = out / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        to_png(img).save(folder / f"{i:05d}.png")


def mosaics(x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator):
    """``count`` 16x16 mosaics and the 4 tile labels of each (tile order: row-major)."""
    idx = rng.integers(0, len(x), size=(count, 4))
    tiles = x[idx]  # (count, 4, 8, 8)
    top = np.concatenate([tiles[:, 0], tiles[:, 1]], axis=2)
    bottom = np.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)
    return np.concatenate([top, bottom], axis=1), y[idx]


def write_coco(out: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder = out / f"{split}2014"
    folder.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    records, anns = [], []
    for i, (img, tile_labels) in enumerate(zip(images, labels)):
        name = f"COCO_{split}2014_{i:012d}.png"
        to_png(img).save(folder / name)
        records.append({"id": i + 1, "file_name": name, "width": 16, "height": 16})
        for t, label in enumerate(tile_labels):
            x0, y0 = 8 * (t % 2), 8 * (t // 2)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x0, y0, 8, 8],
                    "area": 64,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": d + 1, "name": NAMES[d], "supercategory": "digit"} for d in range(10)]
    data = {"images": records, "annotations": anns, "categories": cats}
    (out / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))


def write_nuswide(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "nus_wid_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "label", "split_name"])
        for split, (images, labels) in splits.items():
            for i, (img, tile_labels) in enumerate(zip(images, labels)):
                path = f"images/{split}_{i:05d}.png"
                to_png(img).save(out / path)
                names = sorted({NAMES[int(v)] for v in tile_labels})
                w.writerow([path, str(names), split])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="data/digits")
    p.add_argument("--train_mosaics", type=int, default=1000)
    p.add_argument("--val_mosaics", type=int, default=300)
    p.add_argument("--limit", type=int, default=None, help="digits per split (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    x_tr, x_te, y_tr, y_te = load_split()
    if args.limit:
        x_tr, y_tr, x_te, y_te = (
            x_tr[: args.limit],
            y_tr[: args.limit],
            x_te[: args.limit],
            y_te[: args.limit],
        )
    write_imagefolder(out / "imagefolder", x_tr, y_tr, "train")
    write_imagefolder(out / "imagefolder", x_te, y_te, "val")
    rng = np.random.default_rng(args.seed)
    train = mosaics(x_tr, y_tr, args.train_mosaics, rng)
    val = mosaics(x_te, y_te, args.val_mosaics, rng)
    write_coco(out / "coco", "train", *train)
    write_coco(out / "coco", "val", *val)
    write_nuswide(out / "nuswide", {"train": train, "val": val})
    print(
        f"wrote {len(x_tr)}+{len(x_te)} digits and {len(train[0])}+{len(val[0])} mosaics "
        f"under {out}"
    )


if __name__ == "__main__":
    main()
