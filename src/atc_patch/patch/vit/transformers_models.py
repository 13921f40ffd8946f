"""The owners' patched forwards of the transformers family, one per model group, and the
attention-pooling heads that weigh each token by its size (see :mod:`.transformers`).

Each forward takes the original ``forward``'s arguments and returns its output type, with
``N'`` tokens (``N0`` with ``unmerge=True``); it runs under transformers' own decorators
(output capture, config defaults). :data:`FORWARDS` maps the ``_ENCODERS`` table's ``forward``
key to the body::

    FORWARDS["siglip2"](vision_model, patch, pixel_values, pixel_attention_mask, spatial_shapes)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention_dtype
from .transformers_layers import encode, finish, padding_mask

# --- ViT, DeiT, DINOv2, CLIP, SigLIP ------------------------------------------------------------


def _vit_forward(
    self, patch, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
    attention_mask=None, **kwargs,
):  # fmt: skip
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
    x = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
    mask = padding_mask(self, patch, x, attention_mask)
    out = self.layernorm(finish(patch, encode(self, patch, self.layers, x, mask, kwargs))[0])
    pooled = self.pooler(out) if self.pooler is not None else None
    return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=pooled)


def _dinov2_forward(self, patch, hidden_states, attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutput

    tokens = encode(self, patch, self.layer, hidden_states, attention_mask, kwargs)
    return BaseModelOutput(last_hidden_state=finish(patch, tokens)[0])


def _clip_forward(self, patch, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
    x = finish(patch, encode(self, patch, self.encoder.layers, x, None, kwargs))[0]
    return BaseModelOutputWithPooling(
        last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0])
    )


def _siglip_forward(self, patch, pixel_values, interpolate_pos_encoding=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.embeddings(pixel_values, interpolate_pos_encoding)
    x, size = finish(patch, encode(self, patch, self.encoder.layers, x, None, kwargs))
    x = self.post_layernorm(x)
    size = size if patch.config.prop_attn else None
    pooled = _attention_pool(self.head, x, size) if self.use_head else None
    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


# --- DINOv3, SigLIP2 (NaFlex), AIMv2 ------------------------------------------------------------


def _dinov3_forward(self, patch, hidden_states, position_embeddings=None, **kwargs):
    """The ``DINOv3ViTEncoder``: the rotary ``(cos, sin)`` of the patch tokens follow the plan."""
    from transformers.modeling_outputs import BaseModelOutput

    tokens = encode(self, patch, self.layer, hidden_states, None, kwargs, pos=position_embeddings)
    return BaseModelOutput(last_hidden_state=finish(patch, tokens)[0])


def _siglip2_forward(self, patch, pixel_values, pixel_attention_mask, spatial_shapes, **kwargs):
    """NaFlex patches ``(B, L, P*P*C)``: padding (``pixel_attention_mask == 0``) never merges
    with a real patch, and the pooling head leaves it out."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.embeddings(pixel_values, spatial_shapes)
    mask = padding_mask(self, patch, x, pixel_attention_mask)
    tokens = encode(self, patch, self.encoder.layers, x, mask, kwargs)
    x, size = finish(patch, tokens)
    x = self.post_layernorm(x)
    pooled = None
    if self.use_head:
        same = pixel_attention_mask is None or x.shape[1] == pixel_attention_mask.shape[1]
        valid = pixel_attention_mask if same else tokens.valid  # the tokens' own padding
        pooled = _attention_pool(self.head, x, size if patch.config.prop_attn else None, valid)
    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


def _aimv2_forward(self, patch, pixel_values, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.embeddings(pixel_values)
    x, size = finish(patch, encode(self, patch, self.encoder.layers, x, None, kwargs))
    x = self.rms_norm(x)
    size = size if patch.config.prop_attn else None
    pooled = _aimv2_pool(self.head, x, size) if self.use_head else None
    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


FORWARDS: dict[str, Callable[..., Any]] = {
    "vit": _vit_forward,
    "dinov2": _dinov2_forward,
    "clip": _clip_forward,
    "siglip": _siglip_forward,
    "dinov3": _dinov3_forward,
    "siglip2": _siglip2_forward,
    "aimv2": _aimv2_forward,
}


# --- pooling heads ------------------------------------------------------------------------------


def _attention_pool(
    head: nn.Module, x: Tensor, size: Tensor | None, valid: Tensor | None = None
) -> Tensor:
    """SigLIP's / SigLIP2's ``MultiheadAttentionPoolingHead`` with ``log(size)`` on its keys and
    the padding (``valid == 0``, SigLIP2) left out: ``(B, C)``."""
    if size is None:
        return head(x) if valid is None else head(x, valid)
    bias = size.log().to(attention_dtype(x)).transpose(1, 2)  # (B, 1, N)
    if valid is not None:
        bias = bias.masked_fill(~valid.bool()[:, None], -torch.inf)
    probe = head.probe.repeat(x.shape[0], 1, 1)
    mask = bias.repeat_interleave(head.attention.num_heads, 0)  # (B * heads, 1, N)
    h = head.attention(probe, x, x, attn_mask=mask)[0]
    return (h + head.mlp(head.layernorm(h)))[:, 0]


def _aimv2_pool(head: nn.Module, x: Tensor, size: Tensor | None) -> Tensor:
    """AIMv2's ``Aimv2AttentionPoolingHead`` with ``log(size)`` on its keys: ``(B, C)``."""
    if size is None:
        return head(x)
    b, n, c = x.shape
    heads = head.num_heads
    key = head.k_proj(x).reshape(b, n, heads, c // heads).transpose(1, 2)
    value = head.v_proj(x).reshape(b, n, heads, c // heads).transpose(1, 2)
    query = head.cls_token.expand(b, -1, -1).reshape(b, 1, heads, c // heads).transpose(1, 2)
    bias = size.log().to(attention_dtype(x)).transpose(1, 2)[:, None]  # (B, 1, 1, N)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    return head.output_proj(out.transpose(1, 2).reshape(b, 1, c).mean(dim=1))
