"""Transformers whose text enters through cross-attention or conditioning: PixArt, DiT, Sana.

Self-attention (``attn1``) runs on the block's merged image tokens (a key mask follows with
``amax``); with ``merge_crossattn`` the cross-attention queries too (the text keys never merge);
with ``merge_mlp`` the ``ff``. Sana's ``attn1`` is ReLU linear attention: on merged tokens its
key-value sums run over the clusters, each counted once. Sana's ``ff`` (``GLUMBConv``) runs a
3x3 depthwise convolution over the ``(H, W)`` token grid, which merged tokens do not have, so
``merge_mlp`` is refused there.
"""

from __future__ import annotations

from ...config import DiffusionConfig
from ..merge import Span
from ._table import Blocks, Model, latent_call


def _basic(c: DiffusionConfig) -> dict[str, Span]:  # PixArt / DiT BasicTransformerBlock
    out = {"attn1": Span(mask="keys")} if c.merge_attn else {}
    out.update({"attn2": Span(cross=True)} if c.merge_crossattn else {})  # queries; text keys stay
    return {**out, **({"ff": Span()} if c.merge_mlp else {})}


def _sana(c: DiffusionConfig) -> dict[str, Span]:  # SanaTransformerBlock
    out = {"attn1": Span()} if c.merge_attn else {}
    return {**out, **({"attn2": Span(cross=True)} if c.merge_crossattn else {})}


SANA_MLP = (
    "Sana's feed-forward (GLUMBConv) runs a 3x3 depthwise convolution over the (H, W) token "
    "grid, which merged tokens do not have; merge its self-attention (merge_attn) and "
    "cross-attention queries (merge_crossattn) instead"
)

SANA_KV = (
    "Sana's self-attention is ReLU linear attention (no softmax, no scaled_dot_product_attention "
    "call whose keys could be merged); use merge='tokens'"
)

MODELS = {
    "PixArtTransformer2DModel": Model(
        (Blocks("transformer_blocks", _basic),), latent_call, cross_attention=True
    ),
    "DiTTransformer2DModel": Model((Blocks("transformer_blocks", _basic),), latent_call),
    "SanaTransformer2DModel": Model(
        (Blocks("transformer_blocks", _sana),),
        latent_call,
        cross_attention=True,
        no_mlp=SANA_MLP,
        no_kv=SANA_KV,
    ),
}
