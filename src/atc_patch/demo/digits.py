"""The small ViT that ships with atc_patch, and the digits test split it is evaluated on.

A timm ``VisionTransformer`` on scikit-learn's 8x8 digits with one token per pixel (64 patch
tokens + a class token) and a 3x3 convolutional token embedding (:class:`PixelEmbed`). Weights
and test split are ``safetensors`` files in ``atc_patch/demo/data`` (no pickle), written by
``examples/train_digits.py``; docs/demo.md tells how it was trained. Needs timm and
safetensors (the ``timm`` extra)::

    from atc_patch.demo.digits import load_model, load_test_split, normalize
    model, info = load_model()                # timm VisionTransformer, eval mode
    images, labels = load_test_split()        # uint8 (540, 1, 8, 8) in 0..16, int64 (540,)
    logits = model(normalize(images))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

WEIGHTS_FILE = "digits_vit.safetensors"
TEST_FILE = "digits_test.safetensors"
# Pixels are 0..16 in the dataset; the model sees (pixel / PIXEL_MAX - MEAN) / STD.
PIXEL_MAX, MEAN, STD = 16.0, 0.5, 0.5


class PixelEmbed(PatchEmbed):
    """timm ``PatchEmbed`` with ``patch_size=1`` whose projection is a ``k x k`` convolution.

    ``(B, C, H, W) -> (B, H * W, embed_dim)``: one token per pixel, as with ``PatchEmbed``.
    """

    def __init__(self, *args: Any, kernel_size: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.patch_size != (1, 1):
            raise ValueError(f"PixelEmbed needs patch_size=1, got {self.patch_size}")
        conv = self.proj
        self.proj = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=conv.bias is not None,
        )


def build_model(config: dict[str, Any]) -> nn.Module:
    """``timm.models.vision_transformer.VisionTransformer(**config)`` with the pixel embedding."""
    return VisionTransformer(**config, embed_layer=PixelEmbed)


@dataclass(frozen=True)
class ModelInfo:
    """What the shipped weights record about themselves (``safetensors`` metadata)."""

    config: dict[str, Any]
    test_correct: int
    test_size: int
    metadata: dict[str, str]

    @property
    def test_accuracy(self) -> float:
        return self.test_correct / self.test_size


def data_path(name: str) -> Path:
    """Path of a file in the installed ``atc_patch/demo/data`` directory."""
    return Path(str(resources.files("atc_patch.demo") / "data" / name))


def read_info(metadata: dict[str, str]) -> ModelInfo:
    """Parse the ``safetensors`` metadata written by ``examples/train_digits.py``."""
    return ModelInfo(
        config=json.loads(metadata["config"]),
        test_correct=int(metadata["test_correct"]),
        test_size=int(metadata["test_size"]),
        metadata=dict(metadata),
    )


def load_model(path: str | Path | None = None) -> tuple[nn.Module, ModelInfo]:
    """Build the digits ViT and load its weights (``safetensors``: tensors only, no code).

    Returns the model in eval mode and the :class:`ModelInfo` stored with the weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else data_path(WEIGHTS_FILE)
    with safe_open(str(path), framework="pt") as f:
        info = read_info(f.metadata())
    model = build_model(info.config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), info


def load_test_split(path: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """The held-out digits: uint8 images ``(N, 1, 8, 8)`` with values 0..16, int64 labels."""
    from safetensors.torch import load_file

    data = load_file(str(Path(path) if path is not None else data_path(TEST_FILE)))
    return data["images"], data["labels"]


def normalize(images: Tensor) -> Tensor:
    """uint8 digits (0..16) -> the float input of the model, in [-1, 1]."""
    return (images.float() / PIXEL_MAX - MEAN) / STD


@torch.no_grad()
def count_correct(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> int:
    """Number of ``images`` (uint8) that ``model`` classifies correctly."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i : i + batch_size]))
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct
