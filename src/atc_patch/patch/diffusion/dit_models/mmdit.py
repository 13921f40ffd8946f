"""MMDiT-style transformers: SD3, QwenImage, CogView4 and HiDream (image and text streams with
their own weights, meeting in a joint attention).

Each block merges its image stream before the joint attention (the text stream enters whole)
and, with ``merge_mlp``, before the image MLP. Position tables and masks follow the merge:
QwenImage's image table ``(N, D / 2)`` (complex), CogView4's image-only ``(cos, sin)``, HiDream's
batched rotation matrices over ``[image, text]`` and its padding mask (non-square images are
padded to a fixed token count; the padding never merges). QwenImage-Edit's reference images
(``img_shapes[i][1:]``) never merge. CogView4 runs one ``ff`` on the image tokens, then on the
text: only the first call merges. HiDream's blocks are the ``.block`` of its ``HiDreamBlock``
wrappers; its MoE feed-forward runs on merged tokens like any MLP.
"""

from __future__ import annotations

import functools
from math import prod
from typing import Any

from ...config import DiffusionConfig
from ..core import Call
from ..merge import JointMask, Rotary, Span
from ._table import Args, Blocks, Model, fixed_grid, latent_call


def _sd3(c: DiffusionConfig) -> dict[str, Span]:  # JointTransformerBlock
    # attn2: SD3.5's image-only self-attention.
    # attn: JointAttnProcessor2_0 puts the image keys before the text keys.
    joint = Span(mask="reject", image_keys="first")
    attn = {"attn": joint, "attn2": Span(mask="keys")} if c.merge_attn else {}
    return {**attn, **({"ff": Span()} if c.merge_mlp else {})}


QWEN_ROTARY = Rotary(parts=(0,), after_text=False)  # (image (N, D/2), text (T, D/2)), complex


def _qwen(c: DiffusionConfig) -> dict[str, Span]:  # QwenImageTransformerBlock
    # encoder_hidden_states_mask is the text's: the processor appends ones for the image tokens.
    attn = {"attn": Span(rotary=QWEN_ROTARY)} if c.merge_attn else {}
    return {**attn, **({"img_mlp": Span()} if c.merge_mlp else {})}


def _cogview4(c: DiffusionConfig) -> dict[str, Span]:  # CogView4TransformerBlock
    # The (B, T) text mask is rebuilt into (B, 1, T + N', T + N') from the token counts.
    attn = {"attn1": Span(rotary=Rotary(after_text=False))} if c.merge_attn else {}
    return {**attn, **({"ff": Span(once=True)} if c.merge_mlp else {})}


HIDREAM_ROTARY = Rotary(parts=None, batched=True, after_text=False)  # (B, N + T, 1, D/2, 2, 2)
HIDREAM_MASK = JointMask(arg=(1, "hidden_states_masks"))  # (B, N_pad [+ T]), multiplies keys


def _hidream(c: DiffusionConfig) -> dict[str, Span]:  # HiDreamImage(Single)TransformerBlock
    # double: returns (image, text); its processor puts the image keys before the text keys
    attn = Span(
        mask=HIDREAM_MASK,
        rotary=HIDREAM_ROTARY,
        image_keys="first",
        text=(2, "norm_encoder_hidden_states"),
    )
    out = {"attn1": attn} if c.merge_attn else {}
    return {**out, **({"ff_i": Span()} if c.merge_mlp else {})}


def qwen_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A QwenImage call: the generated image is ``img_shapes[0][0]`` ``(frames, h, w)`` (packed
    tokens), the first of the image stream; further shapes are reference images."""
    shapes = where.get(args, kwargs, "img_shapes")
    grid, count = None, None
    if shapes:
        first = shapes[0] if isinstance(shapes[0][0], (tuple, list)) else shapes
        f, h, w = (int(v) for v in first[0])
        count = f * h * w
        grid = functools.partial(fixed_grid, (h, w)) if f == 1 else None
    return Call(grid, where.get(args, kwargs, "timestep"), count=count)


def hidream_call(where: Args, args: tuple, kwargs: dict) -> Call:
    """A HiDream call: ``(H / p) x (W / p)`` image tokens from latents ``(B, C, H, W)`` (or
    ``img_sizes`` for patchified input, read on the host); a non-square image is padded to a
    fixed token count, and the padding follows the image tokens."""
    x = where.get(args, kwargs, "hidden_states")
    if x.dim() == 4:
        hw = (int(x.shape[-2]) // where.patch, int(x.shape[-1]) // where.patch)
    else:
        sizes = where.get(args, kwargs, "img_sizes")
        hw = (int(sizes[0][0]), int(sizes[0][1]))
    return Call(
        functools.partial(fixed_grid, hw), where.get(args, kwargs, "timesteps"), count=prod(hw)
    )


def _hidream_blocks(spans: Any) -> tuple[Blocks, ...]:
    return (
        Blocks("double_stream_blocks", spans, inner="block"),
        Blocks("single_stream_blocks", spans, inner="block"),
    )


MODELS = {
    "SD3Transformer2DModel": Model((Blocks("transformer_blocks", _sd3),), latent_call),
    "QwenImageTransformer2DModel": Model((Blocks("transformer_blocks", _qwen),), qwen_call),
    "CogView4Transformer2DModel": Model((Blocks("transformer_blocks", _cogview4),), latent_call),
    "HiDreamImageTransformer2DModel": Model(_hidream_blocks(_hidream), hidream_call),
}
