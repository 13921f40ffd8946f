"""Z-Image: one sequence ``[image (+ padding), caption (+ padding)]`` through shared weights.

The image-only ``noise_refiner`` blocks and the main ``layers`` merge the image tokens (the
first ``F x H/p x W/p`` of the sequence) before ``attention`` and, with ``merge_mlp``, before
``feed_forward``; the image's padding (to a multiple of 32 tokens) and the caption never merge,
and the caption-only ``context_refiner`` is not patched. The batched ``freqs_cis`` table
``(B, S, D/2)`` (complex) and the padding mask ``(B, S)`` follow the merge. Every image of a
batch must have the same size (one token range for the batch); Z-Image-Omni's nested inputs
(reference images and SigLIP tokens in the sequence) are not supported.
"""

from __future__ import annotations

import functools

from ...config import DiffusionConfig
from ..core import Call
from ..merge import JointMask, Rotary, Span
from ._table import Args, Blocks, Model, fixed_grid

ZIMAGE_ROTARY = Rotary(arg=(None, "freqs_cis"), parts=None, batched=True, after_text=False)


def _zimage(c: DiffusionConfig) -> dict[str, Span]:  # ZImageTransformerBlock
    attn = Span(mask=JointMask(), rotary=ZIMAGE_ROTARY)
    return {
        **({"attention": attn} if c.merge_attn else {}),
        **({"feed_forward": Span()} if c.merge_mlp else {}),
    }


def zimage_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A Z-Image call on latents ``x``, a list of ``(C, F, H, W)``: ``F/pf x H/p x W/p``
    image tokens at the start of every sequence (the same for the whole batch)."""
    x = where.get(args, kwargs, "x")
    if x and isinstance(x[0], (list, tuple)):
        raise ValueError(
            "token merging does not support Z-Image-Omni's nested inputs (reference images and "
            "SigLIP tokens in the sequence); remove the patch for this call"
        )
    sizes = {tuple(int(s) for s in t.shape[1:]) for t in x}
    if len(sizes) != 1:
        raise ValueError(
            f"token merging needs every image of a Z-Image batch at one size, got {sorted(sizes)}"
        )
    f, h, w = sizes.pop()
    p = where.get(args, kwargs, "patch_size") or 2
    pf = where.get(args, kwargs, "f_patch_size") or 1
    f, h, w = f // pf, h // p, w // p
    grid = functools.partial(fixed_grid, (h, w)) if f == 1 else None
    return Call(grid, where.get(args, kwargs, "t"), count=f * h * w)


MODELS = {
    "ZImageTransformer2DModel": Model(
        (Blocks("noise_refiner", _zimage), Blocks("layers", _zimage)), zimage_call
    ),
}
