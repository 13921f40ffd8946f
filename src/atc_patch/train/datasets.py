"""The ATC paper's four datasets in their official on-disk layouts (the ``train`` extra).

``build_dataset(name, root, split, transform)`` returns ``(dataset, num_classes)``; items are
``(image, target)`` where ``image`` is what ``transform`` makes of an RGB ``PIL.Image`` and
``target`` is an ``int`` class (ImageNet, NABirds) or a float multi-hot ``(num_classes,)``
tensor (COCO, NUS-WIDE). Layouts (``root`` is ``--data``):

* ``imagenet`` (and any ImageFolder): ``root/train/<class>/<image>`` and
  ``root/val/<class>/<image>`` (the usual ImageNet-1K folders; classes in sorted order).
* ``nabirds``: ``root/images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
  ``classes.txt``, ``hierarchy.txt`` and ``root/images/<path from images.txt>``. The class ids
  are not contiguous; they are mapped to ``0 .. C-1`` in increasing id order.
* ``coco``: ``root/train2014``, ``root/val2014`` and
  ``root/annotations/instances_{train,val}2014.json`` (read with pycocotools). Only images with
  at least one annotation are used, and the categories map to ``0 .. C-1`` (C = 80) in
  increasing category id, as in the ATC/ASL code.
* ``nuswide`` (the ASL release): ``root/nus_wid_data.csv`` with a header and the columns
  ``filepath,label,split_name``: an image path relative to ``root``, a label list written as
  ``"['clouds', 'sky']"`` and ``train`` or ``val``. The classes are the sorted set of label
  names over the whole file (81 for NUS-WIDE).

A folder in the wrong layout raises :class:`LayoutError` naming the files it expected.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

DATASETS = ("imagenet", "imagefolder", "nabirds", "coco", "nuswide")
MULTI_LABEL = ("coco", "nuswide")
SPLITS = ("train", "val")
Transform = Callable[[Image.Image], Any] | None


class LayoutError(FileNotFoundError):
    """A dataset folder is not in the layout its loader reads; the message names the files."""


def _need(paths: list[Path], dataset: str, layout: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise LayoutError(
            f"{dataset}: missing {', '.join(missing)}; the {dataset} layout is: {layout}"
        )


def _split(split: str) -> str:
    split = {"validation": "val", "test": "val"}.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'validation'), got {split!r}")
    return split


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def image_folder(root: str | Path, split: str, transform: Transform = None) -> Dataset:
    """``torchvision.datasets.ImageFolder`` over ``root/<split>/<class>/<image>``."""
    from torchvision.datasets import ImageFolder

    split = _split(split)
    folder = Path(root) / split
    layout = f"{root}/{{train,val}}/<class>/<image> (e.g. ImageNet val/n01440764/*.JPEG)"
    _need([folder], "imagenet", layout)
    if not any(p.is_dir() for p in folder.iterdir()):
        raise LayoutError(f"imagenet: {folder} has no class folders; the layout is: {layout}")
    return ImageFolder(str(folder), transform=transform, loader=_rgb)


class NABirds(Dataset):
    """NABirds in its official layout; targets ``0 .. C-1`` (class ids in increasing order)."""

    FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    LAYOUT = (
        "root/images.txt ('<image_id> <path>'), root/image_class_labels.txt ('<image_id> "
        "<class_id>'), root/train_test_split.txt ('<image_id> <1 train|0 test>'), "
        "root/classes.txt ('<class_id> <name>'), root/hierarchy.txt ('<child_id> <parent_id>'), "
        "root/images/<path>"
    )

    def __init__(self, root: str | Path, split: str = "train", transform: Transform = None):
        self.root = Path(root)
        self.transform = transform
        files = [self.root / f for f in (*self.FILES, "hierarchy.txt")] + [self.root / "images"]
        _need(files, "nabirds", self.LAYOUT)
        paths = dict(self._pairs("images.txt"))
        labels = {k: int(v) for k, v in self._pairs("image_class_labels.txt")}
        is_train = {k: v == "1" for k, v in self._pairs("train_test_split.txt")}
        self.label_map = {c: i for i, c in enumerate(sorted(set(labels.values())))}
        self.class_names = dict(self._pairs("classes.txt"))
        self.class_hierarchy = dict(self._pairs("hierarchy.txt"))
        want_train = _split(split) == "train"
        self.samples = [
            (img_id, paths[img_id], self.label_map[labels[img_id]])
            for img_id in paths
            if is_train[img_id] == want_train
        ]

    def _pairs(self, name: str) -> list[tuple[str, str]]:
        out = []
        for n, line in enumerate((self.root / name).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2:
                raise LayoutError(f"nabirds: {self.root / name} line {n} is not '<id> <value>'")
            out.append((parts[0], parts[1]))
        return out

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        _, path, target = self.samples[index]
        img = _rgb(self.root / "images" / path)
        return (self.transform(img) if self.transform else img), target


class CocoMultiLabel(Dataset):
    """COCO 2014 as multi-label classification: ``(image, (80,) float multi-hot)``."""

    LAYOUT = (
        "root/{train2014,val2014}/<file_name> and root/annotations/instances_{train,val}2014.json"
    )

    def __init__(self, root: str | Path, split: str = "train", transform: Transform = None):
        try:
            from pycocotools.coco import COCO
        except ImportError as e:
            raise ImportError(
                "the COCO loader needs pycocotools: pip install 'atc-patch[train]'"
            ) from e
        import contextlib
        import io

        split = _split(split)
        self.root = Path(root)
        self.image_dir = self.root / f"{split}2014"
        ann_file = self.root / "annotations" / f"instances_{split}2014.json"
        _need([self.image_dir, ann_file], "coco", self.LAYOUT)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(ann_file))
        self.ids = list(self.coco.imgToAnns.keys())
        self.cat2label = {c: i for i, c in enumerate(sorted(self.coco.cats))}
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.cat2label)

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> torch.Tensor:
        """The ``(num_classes,)`` float multi-hot target of image ``index``."""
        out = torch.zeros(self.num_classes)
        for ann in self.coco.imgToAnns[self.ids[index]]:
            out[self.cat2label[ann["category_id"]]] = 1.0
        return out

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        info = self.coco.loadImgs(self.ids[index])[0]
        img = _rgb(self.image_dir / info["file_name"])
        return (self.transform(img) if self.transform else img), self.target(index)


def parse_label_list(text: str) -> list[str]:
    """``"['clouds', 'sky']"`` -> ``['clouds', 'sky']`` (``"[]"`` -> ``[]``)."""
    names = [t.strip("[]'\"\n ") for t in text.split(",")]
    return [n for n in names if n]


class NUSWide(Dataset):
    """NUS-WIDE as released by ASL (``nus_wid_data.csv``): ``(image, (81,) float multi-hot)``."""

    CSV = "nus_wid_data.csv"
    LAYOUT = (
        "root/nus_wid_data.csv with header 'filepath,label,split_name' and rows like "
        "\"images/0001.jpg,\"['clouds', 'sky']\",train\" (split_name train|val); image paths "
        "are relative to root"
    )

    def __init__(self, root: str | Path, split: str = "train", transform: Transform = None):
        self.root = Path(root)
        self.transform = transform
        csv_path = self.root / self.CSV
        _need([csv_path], "nuswide", self.LAYOUT)
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        header, rows = rows[0], [r for r in rows[1:] if r]
        if len(header) < 3 or "label" not in header or any(len(r) < 3 for r in rows):
            raise LayoutError(
                f"nuswide: {csv_path} is not in the ASL format; expected {self.LAYOUT}"
            )
        col = header.index("label")
        path_col, split_col = (
            (0, 2) if col == 1 else (header.index("filepath"), header.index("split_name"))
        )
        names = sorted({n for r in rows for n in parse_label_list(r[col])})
        self.classes = names
        index = {n: i for i, n in enumerate(names)}
        want = _split(split)
        self.samples = []
        for r in rows:
            if r[split_col] not in SPLITS:
                raise LayoutError(f"nuswide: split_name must be train or val, got {r[split_col]!r}")
            if r[split_col] == want:
                self.samples.append((r[path_col], [index[n] for n in parse_label_list(r[col])]))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, index: int) -> torch.Tensor:
        out = torch.zeros(self.num_classes)
        out[self.samples[index][1]] = 1.0
        return out

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        img = _rgb(self.root / self.samples[index][0])
        return (self.transform(img) if self.transform else img), self.target(index)


def build_dataset(
    name: str, root: str | Path, split: str, transform: Transform = None
) -> tuple[Dataset, int]:
    """``(dataset, num_classes)`` for one of :data:`DATASETS` (``ValueError`` naming them)."""
    key = name.lower()
    if key in ("imagenet", "imagefolder"):
        ds = image_folder(root, split, transform)
        return ds, len(ds.classes)
    if key == "nabirds":
        ds = NABirds(root, split, transform)
    elif key == "coco":
        ds = CocoMultiLabel(root, split, transform)
    elif key == "nuswide":
        ds = NUSWide(root, split, transform)
    else:
        raise ValueError(f"unknown dataset {name!r}; valid: {DATASETS}")
    return ds, ds.num_classes


def is_multi_label(name: str) -> bool:
    return name.lower() in MULTI_LABEL
