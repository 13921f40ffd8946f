"""FID of generated images against a reference set, and the reference-set builder.

The counterpart of the ATC paper's ``compute_fid_scores.py`` and ``create_im_valset``:

    # 1. reference set: N images per class from an ImageNet-style folder (class subfolders),
    #    center-cropped and resized, plus the matching prompts for examples/sd_generate.py
    python benchmarks/fid.py build-ref --src_dir /data/imagenet/val --out_dir ref/ \\
        --per_class 2 --size 512 --class_names imagenet_classes.txt
    # 2. generate one image per prompt, with the patch's options (the GPU settings: --tile 16 16
    #    --plan_scope resolution --reuse_steps 4 [--merge kv]; docs/diffusers.md)
    python examples/sd_generate.py --prompts ref/prompts.txt --output_dir gen/ ...
    # 3. FID with clean-fid's Inception features and resizing (--mode clean)
    python benchmarks/fid.py compute --gen_dir gen/ --ref_dir ref/ --mode clean

Features come from clean-fid (``pip install clean-fid``); the Fréchet distance is
:func:`atc_patch.train.fid.frechet_distance`. clean-fid downloads its Inception weights
(``inception-2015-12-05.pt``) on first use; offline, put that file in the folder clean-fid
reads it from (``/tmp`` on Linux/macOS, the working directory on Windows) beforehand.
"""

from __future__ import annotations

import argparse
import platform
import random
import socket
import sys
from pathlib import Path

import numpy as np

from atc_patch.train.fid import fid_from_features

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)


class MissingWeightsError(RuntimeError):
    """clean-fid's Inception weights are neither on disk nor downloadable."""


def inception_dir() -> Path:
    """Where clean-fid looks for (and downloads) its Inception weights."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def folder_features(folder: Path, mode: str, batch_size: int, device: str, workers: int):
    """``(num_images, 2048)`` clean-fid Inception features of the images in ``folder``."""
    try:
        import torch
        from cleanfid import fid as cfid
    except ImportError as e:
        raise SystemExit("clean-fid is not installed: pip install clean-fid") from e
    weights = inception_dir() / INCEPTION_FILE
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        model = cfid.build_feature_extractor(mode, torch.device(device), use_dataparallel=False)
    except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors
        raise MissingWeightsError(
            f"clean-fid could not load its Inception weights ({type(e).__name__}: {e}).\n"
            f"Offline? Download {INCEPTION_URL}\nand place it at {weights}, then re-run."
        ) from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return cfid.get_folder_features(
        str(folder),
        model,
        num_workers=workers,
        batch_size=batch_size,
        device=torch.device(device),
        mode=mode,
        description=f"{folder.name} ",
        verbose=True,
    )


def compute(args: argparse.Namespace) -> float:
    for d in (args.gen_dir, args.ref_dir):
        if not any(p.suffix.lower() in IMAGE_EXTS for p in d.iterdir()):
            raise SystemExit(f"no images in {d}")
    feats = [
        folder_features(d, args.mode, args.batch_size, args.device, args.num_workers)
        for d in (args.gen_dir, args.ref_dir)
    ]
    score = fid_from_features(np.asarray(feats[0]), np.asarray(feats[1]))
    print(f"FID ({args.mode}) {args.gen_dir} vs {args.ref_dir}: {score:.4f}")
    return score


def _center_square(img, size: int):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.convert("RGB").crop((left, top, left + s, top + s))
    return img.resize((size, size), Image.Resampling.BICUBIC)


def read_class_names(path: Path | None) -> dict[str, str]:
    """``folder name -> class name`` from lines ``<folder> <name ...>`` (e.g. ``n01440764
    tench``); folders not listed use their own name."""
    if path is None:
        return {}
    names = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            names[parts[0]] = parts[1].split(",")[0].strip()
    return names


def build_reference(args: argparse.Namespace) -> list[Path]:
    """Sample ``per_class`` images from every class folder of ``src_dir`` (seeded), save them
    as ``<class>_<i>.png`` (center crop, ``size`` px) in ``out_dir`` and write ``prompts.txt``
    (one prompt per saved image, in file-name order)."""
    classes = sorted(p for p in args.src_dir.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{args.src_dir} has no class subfolders (ImageNet-style layout)")
    if args.max_classes:
        classes = classes[: args.max_classes]
    names = read_class_names(args.class_names)
    rng = random.Random(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    saved, prompts = [], []
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if len(files) < args.per_class:
            print(
                f"warning: {folder.name} has {len(files)} < {args.per_class} images",
                file=sys.stderr,
            )
        for i, src in enumerate(rng.sample(files, min(args.per_class, len(files)))):
            dst = args.out_dir / f"{folder.name}_{i}.png"
            with Image.open(src) as img:
                _center_square(img, args.size).save(dst)
            saved.append(dst)
            name = names.get(folder.name, folder.name.replace("_", " "))
            prompts.append(args.prompt_template.format(name))
    (args.out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"saved {len(saved)} images from {len(classes)} classes to {args.out_dir}")
    return saved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compute", help="FID between two image folders")
    c.add_argument("--gen_dir", type=Path, required=True)
    c.add_argument("--ref_dir", type=Path, required=True)
    c.add_argument(
        "--mode", default="clean", choices=("clean", "legacy_tensorflow", "legacy_pytorch")
    )
    c.add_argument("--batch_size", type=int, default=32)
    c.add_argument("--num_workers", type=int, default=0)
    c.add_argument("--device", default="cpu")
    b = sub.add_parser("build-ref", help="reference set from an ImageNet-style folder")
    b.add_argument("--src_dir", type=Path, required=True, help="one subfolder per class")
    b.add_argument("--out_dir", type=Path, required=True)
    b.add_argument("--per_class", type=int, default=2)
    b.add_argument("--size", type=int, default=512)
    b.add_argument("--max_classes", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--class_names", type=Path, default=None, help="lines: <folder> <name>")
    b.add_argument("--prompt_template", default="A high quality photograph of a {}.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cmd == "build-ref":
        build_reference(args)
        return
    try:
        compute(args)
    except MissingWeightsError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
