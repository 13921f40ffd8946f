"""The timm DeiT a state dict belongs to, read from its tensors, and that DeiT rebuilt.

A checkpoint loads (and :func:`atc_patch.save_pretrained` writes) only what this module can
rebuild: timm's ``deit_{tiny,small,base}[_distilled]_patch16_224`` at any image size and
number of classes. :func:`check_state_dict` says why anything else cannot::

    arch = infer_architecture(state_dict)       # Architecture(size='small', ...)
    model = build_deit(arch, state_dict)        # timm VisionTransformer, eval mode
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from .releases import DEPTH, SIZES


class Architecture(NamedTuple):
    """The DeiT a state dict belongs to (read from the tensors, not from names)."""

    size: str
    embed_dim: int
    num_heads: int
    num_classes: int
    img_size: int
    distilled: bool = False

    @property
    def timm_name(self) -> str:
        return f"deit_{self.size}_{'distilled_' if self.distilled else ''}patch16_224"

    @property
    def num_patches(self) -> int:
        return (self.img_size // 16) ** 2


_SUPPORTED = "DeiT " + ", ".join(f"{n} (width {d})" for n, (d, _) in SIZES.items())
_TRANSFORMERS_PREFIXES = ("vit.", "embeddings.", "encoder.layer.", "vision_model.", "dinov2.")


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """Size from the patch embedding width, classes from the head, image size from the
    position embeddings, the distilled DeiT when there is a ``dist_token``.

    Raises:
        ValueError: ViT-Adapter weights (load those through mmdet), a Hugging Face transformers
            model, or a ViT that is not a DeiT-Tiny/Small/Base with 16 x 16 patches and 12
            blocks.
    """
    keys = list(state_dict)
    if any(k.startswith(("backbone.", "spm.", "interactions.")) for k in keys):
        raise ValueError(
            "these are ViT-Adapter (mmdet) weights: load them with mmdet, e.g. "
            "load_from='atc://<file>' after importing atc_patch.mmdet (docs/pretrained.md)"
        )
    if any(k.startswith(_TRANSFORMERS_PREFIXES) for k in keys):
        raise ValueError(
            "these are Hugging Face transformers weights (keys like "
            f"{next(k for k in keys if k.startswith(_TRANSFORMERS_PREFIXES))!r}): checkpoints "
            f"here hold timm DeiTs ({_SUPPORTED}); save a transformers model with its own "
            "save_pretrained"
        )
    try:
        proj = state_dict["patch_embed.proj.weight"]
        head = state_dict["head.weight"]
        pos = state_dict["pos_embed"]
    except KeyError as e:
        raise ValueError(
            f"not a timm VisionTransformer state dict (no {e.args[0]!r}); keys: {keys[:8]}"
        ) from None
    dim = int(proj.shape[0])
    by_dim = {d: name for name, (d, _) in SIZES.items()}
    depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    if dim not in by_dim or tuple(proj.shape[2:]) != (16, 16) or depth != DEPTH:
        raise ValueError(
            f"weights of a ViT with width {dim}, patch {tuple(proj.shape[2:])} and {depth} "
            f"blocks; supported: {_SUPPORTED} with 16 x 16 patches and 12 blocks"
        )
    distilled = "dist_token" in state_dict  # DeiT distillation (train_deit.py --teacher-*)
    grid = int(round((pos.shape[1] - 1 - distilled) ** 0.5))
    size = by_dim[dim]
    return Architecture(size, dim, SIZES[size][1], int(head.shape[0]), grid * 16, distilled)


def _timm_deit(arch: Architecture) -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(
            arch.timm_name, pretrained=False, num_classes=arch.num_classes, img_size=arch.img_size
        )


# Keys that tell which timm option made a state dict differ from a DeiT's.
_DIFFERENCES = (
    ("reg_token", "register tokens (reg_tokens=...)"),
    ("fc_norm.", "global_pool='avg' (an fc_norm instead of the class-token norm)"),
    (".ls1.", "layer scale (DeiT-III, init_values=...)"),
    (".ls2.", "layer scale (DeiT-III, init_values=...)"),
    (".q_norm.", "qk_norm"),
    ("cls_token", "a class token missing (class_token=False)"),
)


def check_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """The architecture of ``state_dict`` if :func:`build_deit` can load it exactly.

    Raises:
        ValueError: naming what differs from timm's DeiT (register tokens, ``global_pool``,
            layer scale, position embeddings without a class slot, another model family...).
    """
    arch = infer_architecture(state_dict)
    own = {k: tuple(v.shape) for k, v in _timm_deit(arch).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    if own == theirs:
        return arch
    odd = sorted(set(own) ^ set(theirs))
    reasons = [f"it has {why}" for key, why in _DIFFERENCES if any(key in k for k in odd)]
    shapes = [k for k in set(own) & set(theirs) if own[k] != theirs[k]]
    if "pos_embed" in shapes and theirs["pos_embed"][1] == own["pos_embed"][1] - 1:
        reasons.append("it has position embeddings without a class-token slot (no_embed_class)")
    elif "pos_embed" in shapes:
        reasons.append(f"it has {theirs['pos_embed'][1]} position embeddings")
    reasons = list(dict.fromkeys(reasons)) or ["it has other parameters"]
    raise ValueError(
        f"{', '.join(reasons)}: not the timm {arch.timm_name} that checkpoints here hold "
        f"(keys only in one of them: {odd[:4]}; shapes that differ: {sorted(shapes)[:4]}). "
        f"Supported: the ATC releases' models, timm {_SUPPORTED} with 16 x 16 patches, 12 "
        "blocks, a class token and optionally a distillation token"
    )


def build_deit(arch: Architecture, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """timm's DeiT for ``arch`` holding ``weights`` (float32, eval mode).

    Built on the meta device and given the loaded tensors, so no random init is spent.
    """
    model = _timm_deit(arch)
    weights = {
        k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in weights.items()
    }
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def eval_pretrained_cfg(dataset: str | None, num_classes: int, img_size: int = 224) -> dict:
    """timm ``pretrained_cfg`` data settings of the reference evaluation for ``dataset``.

    ImageNet and NABirds: bicubic resize of the short side to ``img_size / 0.875`` and a
    centre crop; COCO and NUS-WIDE: bicubic resize of the whole image to ``img_size`` square
    (no crop). Both normalise with the ImageNet mean/std. ``timm.data.resolve_data_config``
    and ``create_transform`` turn it into the reference transform.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    squash = dataset in ("coco", "nus")
    return {
        "num_classes": num_classes,
        "input_size": (3, img_size, img_size),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0 if squash else 0.875,
        "crop_mode": "squash" if squash else "center",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
    }
