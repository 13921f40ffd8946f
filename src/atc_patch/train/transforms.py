"""Image transforms of the ATC recipes, built from ``timm.data``.

* ImageNet / NABirds (``kind="imagenet"``): ``timm.data.create_transform`` (random resized
  crop, flip, RandAugment ``--aa``, colour jitter, random erasing ``--reprob``); evaluation is
  resize + centre crop with ``crop_pct``.
* COCO / NUS-WIDE (``kind="multilabel"``, as in ASL): square resize, RandAugment, then random
  erasing (standing in for ASL's Cutout); evaluation is a square resize.
* The shipped digits (``kind="digits"``, one channel): square resize, a random 1-pixel shift
  (pad + crop) in training, random erasing if asked, normalised to ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Any

from torchvision import transforms as T

KINDS = ("imagenet", "multilabel", "digits")


def _posterize_at_least_one_bit(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    from timm.data.auto_augment import posterize

    return posterize(img, max(int(bits_to_keep), 1), **kwargs)


def clamp_posterize(transform: Any) -> Any:
    """Make timm's RandAugment posterize keep at least 1 bit (in place; returns ``transform``).

    ``rand-m9-mstd0.5-inc1`` can draw magnitude 10, which timm maps to "keep 0 bits"; Pillow
    >= 11 rejects that (``ValueError: bits must be between or equal to 1 and 8``).
    """
    from timm.data.auto_augment import RandAugment

    steps = getattr(transform, "transforms", [transform])
    for t in steps:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_at_least_one_bit
        elif hasattr(t, "transforms"):
            clamp_posterize(t)
    return transform


def build_transform(
    is_train: bool,
    kind: str,
    input_size: int,
    *,
    aa: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | None = 0.3,
    interpolation: str = "bicubic",
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    crop_pct: float | None = None,
) -> Any:
    """A transform from an RGB ``PIL.Image`` to a normalised ``(C, input_size, input_size)``
    tensor. Raises ``ValueError`` naming :data:`KINDS` for another ``kind``."""
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import str_to_interp_mode

    aa = aa or None
    if kind not in KINDS:
        raise ValueError(f"transform kind must be one of {KINDS}, got {kind!r}")
    if kind == "digits":
        steps = [T.Grayscale(1), T.Resize((input_size, input_size))]
        if is_train:
            steps.append(T.RandomCrop(input_size, padding=1, fill=0))
        steps += [T.ToTensor(), T.Normalize((0.5,), (0.5,))]
        if is_train and reprob > 0:
            steps.append(RandomErasing(reprob, mode=remode, max_count=recount, device="cpu"))
        return T.Compose(steps)
    mean = tuple(mean or IMAGENET_DEFAULT_MEAN)
    std = tuple(std or IMAGENET_DEFAULT_STD)
    if kind == "imagenet":
        return clamp_posterize(
            create_transform(
                input_size=input_size,
                is_training=is_train,
                color_jitter=color_jitter if is_train else None,
                auto_augment=aa if is_train else None,
                interpolation=interpolation,
                re_prob=reprob if is_train else 0.0,
                re_mode=remode,
                re_count=recount,
                mean=mean,
                std=std,
                crop_pct=crop_pct,
            )
        )
    interp = str_to_interp_mode(interpolation if interpolation != "random" else "bicubic")
    steps = [T.Resize((input_size, input_size), interpolation=interp)]
    if is_train and aa:
        from timm.data.auto_augment import rand_augment_transform

        if not aa.startswith("rand"):
            raise ValueError(
                f"multi-label training supports RandAugment (--aa rand-...), got {aa!r}"
            )
        params = {
            "translate_const": int(input_size * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        }
        steps.append(clamp_posterize(rand_augment_transform(aa, params)))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if is_train and reprob > 0:
        steps.append(RandomErasing(reprob, mode=remode, max_count=recount, device="cpu"))
    return T.Compose(steps)
