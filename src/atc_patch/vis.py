"""Draw token clusters over an image, like the figures of the ToMe and ATC papers.

    atc_patch.apply_patch(model, method="atc", r=8, trace_source=True)
    model(img_tensor[None])
    vis = make_visualization(
        pil_image, last_source(model)[0], patch_size=16, class_token=model.num_prefix_tokens
    )

By default every cluster is filled with the mean colour of the pixels it covers and outlined in
its own colour (the ToMe and ATC papers' figures). With ``fill="cluster"`` every cluster gets
one solid colour of its own, also where it is not spatially connected, so the number of
clusters reads at a glance. Needs numpy and Pillow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .patch.vit import last_source

__all__ = ["FILLS", "last_source", "make_visualization"]

FILLS = ("mean", "cluster")


def make_visualization(
    image: Any,
    source: Tensor,
    patch_size: int = 16,
    class_token: bool | int = True,
    seed: int = 0,
    fill: str = "mean",
) -> Any:
    """Return a PIL image showing which patches were merged together.

    Args:
        image: the input image, a ``PIL.Image`` or an ``(H, W, 3)`` uint8 array, at the
            resolution the model saw (``H // patch_size`` x ``W // patch_size`` patches).
        source: ``(N_out, N0)`` or ``(1, N_out, N0)`` source map (see
            :func:`~atc_patch.last_source`); row ``i`` marks the input tokens merged
            into output token ``i``.
        patch_size: pixels per patch side.
        class_token: ``True`` if the first column of ``source`` is a class token; an ``int``
            gives the number of leading non-patch columns (class, distillation and register
            tokens, ``model.num_prefix_tokens``); ``False``/``0`` when there is none.
        seed: seed of the random outline colours (``fill="mean"``).
        fill: ``"mean"``: each cluster filled with the mean colour of its pixels and outlined
            in a random colour of its own; ``"cluster"``: each cluster in one solid colour of
            its own (distinct hues), outlined in dark grey where it meets another cluster.

    Returns:
        An RGB ``PIL.Image`` of the same size as ``image``.

    Raises:
        ValueError: for a source map that does not fit the image's patch grid (naming the
            ``class_token`` to pass when the map has more leading tokens than given), a
            batched map, a non-RGB image or an unknown ``fill``.
    """
    from PIL import Image

    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")

    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {pixels.shape}")
    pixels = pixels.astype(np.float64) / 255.0
    labels = _patch_labels(source, int(class_token), pixels.shape[:2], patch_size)
    pix_labels = _upsample(labels, pixels.shape[:2])

    k = int(pix_labels.max()) + 1
    flat = pix_labels.ravel()
    counts = np.bincount(flat, minlength=k).astype(np.float64)
    mean = (
        np.stack(
            [np.bincount(flat, weights=pixels[..., c].ravel(), minlength=k) for c in range(3)], -1
        )
        / np.maximum(counts, 1.0)[:, None]
    )
    if fill == "cluster":
        edge = _edges(pix_labels, border=False)
        out = np.where(edge[..., None], 0.2, cluster_colors(k)[pix_labels])
    else:
        colors = np.random.default_rng(seed).random((k, 3))
        edge = _edges(pix_labels)
        out = np.where(edge[..., None], colors[pix_labels], mean[pix_labels])
    return Image.fromarray(np.rint(np.clip(out, 0.0, 1.0) * 255).astype(np.uint8))


def cluster_colors(k: int) -> np.ndarray:
    """``(k, 3)`` distinct RGB colours in ``[0, 1]``: hues spread by the golden angle, with
    alternating saturation and brightness so neighbours in the sequence differ clearly."""
    import colorsys

    return np.array(
        [
            colorsys.hsv_to_rgb(
                (i * 0.618033988749895) % 1.0, 0.75 - 0.3 * (i % 2), 0.95 - 0.25 * (i // 2 % 2)
            )
            for i in range(k)
        ]
    ).reshape(k, 3)


def _patch_labels(
    source: Tensor, prefix: int, image_hw: tuple[int, int], patch_size: int
) -> np.ndarray:
    """``(ph, pw)`` array: the output token each patch was merged into."""
    if not isinstance(source, Tensor):
        raise TypeError(f"source must be a torch.Tensor, got {type(source).__name__}")
    if source.dim() == 3:
        if source.shape[0] != 1:
            raise ValueError(f"pass the source map of one image, got batch {source.shape[0]}")
        source = source[0]
    if source.dim() != 2:
        raise ValueError(f"source must be (N_out, N0) or (1, N_out, N0), got {tuple(source.shape)}")
    ph, pw = image_hw[0] // patch_size, image_hw[1] // patch_size
    patches = source.detach()[:, prefix:].float().cpu()
    if patches.shape[1] != ph * pw:
        msg = (
            f"source has {patches.shape[1]} patch columns after {prefix} prefix token(s), but a "
            f"{image_hw[0]}x{image_hw[1]} image with patch_size={patch_size} has {ph}x{pw}"
        )
        leading = source.shape[1] - ph * pw
        if leading >= 0 and leading != prefix:
            msg += (
                f"; the map has {leading} leading token(s) before the patches (class, "
                f"distillation and register tokens): pass class_token={leading}, i.e. "
                "class_token=model.num_prefix_tokens"
            )
        raise ValueError(msg)
    return torch.argmax(patches, dim=0).view(ph, pw).numpy()


def _upsample(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(ph, pw)`` labels to ``(H, W)`` pixels."""
    rows = np.minimum(np.arange(hw[0]) * labels.shape[0] // hw[0], labels.shape[0] - 1)
    cols = np.minimum(np.arange(hw[1]) * labels.shape[1] // hw[1], labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _edges(labels: np.ndarray, border: bool = True) -> np.ndarray:
    """``(H, W)`` bool: pixels with a 4-neighbour in another cluster (or, with ``border``, on
    the image border)."""
    padded = np.pad(labels, 1, constant_values=-1) if border else np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy : dy + labels.shape[0], dx : dx + labels.shape[1]] != centre
    return edge
