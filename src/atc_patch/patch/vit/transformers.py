"""The transformers family: Hugging Face vision encoders (ViT, DeiT, DINOv2 with and without
registers, CLIP and SigLIP vision towers) and the task models holding one.

The root is the vision model (a task model's ``.vit``, ``.vision_model``, ...): it holds the
record whichever object was given. Instance overrides (every module keeps its class, so
transformers' class-name lookups, output capture, key renaming in ``save_pretrained`` and
``inspect.signature`` see the original):

* the *owner*, the module whose ``forward`` runs the layers (``ViTModel``/``DeiTModel``, the
  DINOv2 encoder, ``CLIPVisionModel``, ``SiglipVisionModel``): ``forward`` runs them with the
  per-forward token state (:mod:`atc_patch.patch.vit`), under transformers' own decorators
  (output capture: every layer's own token count);
* every layer: ``forward`` merges between attention and MLP when the owner gives it ``r``.
  The attention module is untouched: proportional attention is its additive
  ``attention_mask`` (``"eager"``, ``"sdpa"``; other backends raise unless
  ``prop_attn=False``); the metric is the keys averaged over heads, ``h`` times the
  head-averaged key weights (the same linear map at ``1/heads`` of the key projection's cost).

Protected: class token; DeiT's distillation token; DINOv2's register tokens; none for SigLIP.
``last_hidden_state``: protected tokens first, then one token per cluster, or with
``unmerge=True`` one per input token (a copy of its cluster)::

    apply_patch(transformers.ViTForImageClassification(config), "atc", r=8)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._override import original, override, restore_tree
from ..config import PatchInfo, ViTConfig
from . import (
    Tokens,
    TraceSlot,
    ViTPatch,
    check_traceable,
    combine_masks,
    key_padding,
    merge_step,
    size_bias,
    store_source,
)

NAME = "transformers"
CONFIG = ViTConfig
WHAT = "a transformers vision encoder"
# Backends that take the proportional-attention bias as an additive float mask. flex_attention
# is left out: a tensor mask makes it crash on the CPU (torch 2.14, unpatched models too).
BIAS_BACKENDS = ("eager", "sdpa")

# --- the tables: one line per supported class -------------------------------------------------

# layer -> (norm1, attention, after attention, norm2, mlp, after mlp), read as
# x = x + after_attention(attention(norm1(x))); merge; x = x + after_mlp(mlp(norm2(x)))
_VIT = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp", "dropout")
_DINO = ("norm1", "attention", "layer_scale1 drop_path", "norm2", "mlp", "layer_scale2 drop_path")
_CLIP = ("layer_norm1", "self_attn", "", "layer_norm2", "mlp", "")
_LAYERS = {
    "ViTLayer": _VIT,
    "DeiTLayer": _VIT,
    "Dinov2Layer": _DINO,
    "Dinov2WithRegistersLayer": _DINO,
    "CLIPEncoderLayer": _CLIP,
    "SiglipEncoderLayer": _CLIP,
}


class _Encoder(NamedTuple):
    module: str  # transformers.models.<module>.modeling_<module>
    layer: str  # the layer class
    owner: str  # path from the vision model to the owner ("" = itself)
    layers: str  # path from the vision model to the layers
    protected: Callable[[Any], int]  # config -> protected leading tokens
    forward: str  # the owner's forward: a key of _FORWARDS


_ENCODERS = {
    "ViTModel": _Encoder("vit", "ViTLayer", "", "layers", lambda c: 1, "vit"),
    "DeiTModel": _Encoder("deit", "DeiTLayer", "", "layers", lambda c: 2, "vit"),
    "Dinov2Model": _Encoder(
        "dinov2", "Dinov2Layer", "encoder", "encoder.layer", lambda c: 1, "dinov2"
    ),
    "Dinov2WithRegistersModel": _Encoder(
        "dinov2_with_registers",
        "Dinov2WithRegistersLayer",
        "encoder",
        "encoder.layer",
        lambda c: 1 + c.num_register_tokens,
        "dinov2",
    ),
    "CLIPVisionModel": _Encoder(
        "clip", "CLIPEncoderLayer", "", "encoder.layers", lambda c: 1, "clip"
    ),
    "SiglipVisionModel": _Encoder(
        "siglip", "SiglipEncoderLayer", "", "encoder.layers", lambda c: 0, "siglip"
    ),
}

# task model -> (its module, the attribute holding the vision model)
_TASKS = {
    "ViTForImageClassification": ("vit", "vit"),
    "DeiTForImageClassification": ("deit", "deit"),
    "DeiTForImageClassificationWithTeacher": ("deit", "deit"),
    "Dinov2ForImageClassification": ("dinov2", "dinov2"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "dinov2_with_registers"),
    "CLIPModel": ("clip", "vision_model"),
    "CLIPVisionModelWithProjection": ("clip", "vision_model"),
    "CLIPForImageClassification": ("clip", "vision_model"),
    "SiglipModel": ("siglip", "vision_model"),
    "SiglipForImageClassification": ("siglip", "vision_model"),
}


def _lookup(model: Any, table: dict) -> Any:
    """The ``table`` entry of the first class in ``model``'s MRO that transformers defines."""
    for cls in type(model).__mro__:
        entry = table.get(cls.__name__)
        if entry is not None and cls.__module__ == "transformers.models.{0}.modeling_{0}".format(
            entry[0]
        ):
            return entry
    return None


def _resolve(module: nn.Module, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), module) if path else module


# --- the family contract --------------------------------------------------------------------------


def root_of(model: Any) -> nn.Module | None:
    """The vision model ``model`` is, or that its task model holds; ``None`` otherwise."""
    if "transformers" not in sys.modules:
        return None
    task = _lookup(model, _TASKS)
    vision = model if task is None else getattr(model, task[1], None)
    return vision if _lookup(vision, _ENCODERS) is not None else None


def apply(root: nn.Module, config: ViTConfig) -> PatchInfo:
    """Patch the vision model ``root`` in place (checks first, then overrides)."""
    enc = _lookup(root, _ENCODERS)
    owner, layers = _resolve(root, enc.owner), list(_resolve(root, enc.layers))
    for i, layer in enumerate(layers):
        if type(layer).__name__ != enc.layer:
            raise TypeError(
                f"layer {i} of this {type(root).__name__} is a {type(layer).__name__}; "
                f"atc_patch supports {type(root).__name__} built from {enc.layer}"
            )
    protected = enc.protected(root.config)
    slot = TraceSlot() if config.trace_source else None
    patch = ViTPatch(config, protected, f"transformers {type(root).__name__}", slot)
    emb = root.embeddings
    num_patches = getattr(emb, "num_patches", None) or emb.patch_embeddings.num_patches
    patch.check(len(layers), num_patches + protected)
    if config.prop_attn and patch.reduces:
        _check_backend(root.config._attn_implementation)
    override(owner, "forward", _owner_forward, patch, enc.forward)
    for layer in layers:
        override(layer, "forward", _layer_forward, patch, _LAYERS[enc.layer])
    return PatchInfo(NAME, config, {"protected": protected}, state=slot)


def remove(root: nn.Module) -> None:
    """Undo :func:`apply` (also a partial one)."""
    restore_tree(root)


def _check_backend(impl: str) -> None:
    if impl not in BIAS_BACKENDS:
        raise ValueError(
            f"prop_attn=True adds log(size) to the attention logits, which attn_implementation "
            f"{impl!r} cannot take; use one of {BIAS_BACKENDS} (model.set_attn_implementation) "
            "or apply_patch(..., prop_attn=False)"
        )


# --- owners ---------------------------------------------------------------------------------------


_DECORATED: dict[str, Callable] = {}


def _decorated(kind: str) -> Callable:
    """The owner forward ``kind`` with the decorators of transformers' ``forward`` (output
    capture, config defaults), made on first use: importing this module does not import
    transformers."""
    forward = _DECORATED.get(kind)
    if forward is None:
        from transformers.utils.generic import merge_with_config_defaults
        from transformers.utils.output_capturing import capture_outputs

        body = _FORWARDS[kind]
        forward = merge_with_config_defaults(capture_outputs(tie_last_hidden_states=False)(body))
        _DECORATED[kind] = forward
    return forward


def _owner_forward(owner: nn.Module, patch: ViTPatch, kind: str, *args: Any, **kwargs: Any) -> Any:
    """The original ``forward``'s inputs and outputs, with ``N'`` tokens."""
    if patch.is_passthrough:
        return original(owner, "forward")(*args, **kwargs)
    return _decorated(kind)(owner, patch, *args, **kwargs)


def _encode(
    owner: nn.Module, patch: ViTPatch, layers: nn.ModuleList, x: Tensor, mask: Any, kwargs: dict
) -> Tokens:
    """Run ``layers`` on ``(B, N, C)`` tokens with reduction; returns the final ``Tokens``."""
    check_traceable(patch, x)
    num_tokens = x.shape[1]
    steps = patch.block_steps(len(layers), num_tokens)
    if patch.reduces and mask is not None and not isinstance(mask, Tensor):
        raise ValueError(f"a {type(mask).__name__} attention mask cannot follow merged tokens")
    tokens = Tokens(x, attn_mask=mask, valid=key_padding(mask, x.shape[0]))
    for layer, step in zip(layers, steps):
        r = patch.r_for(step, tokens.x.shape[1])
        x, *rest = layer(tokens.x, tokens.attn_mask, r=r, tokens=tokens, **kwargs)
        # A reentrant checkpoint returns a plain tuple of differentiable tensors: rebuild the
        # named tuple with the sizes, source map and masks (never trained) detached.
        tokens = Tokens(x, *(t.detach() if isinstance(t, Tensor) else t for t in rest))
    store_source(patch, tokens, num_tokens)
    return tokens


def _finish(patch: ViTPatch, tokens: Tokens) -> tuple[Tensor, Tensor | None]:
    """``(x, size)`` for the model's head: the reduced tokens and their sizes, or with
    ``unmerge`` ``(B, N0, C)``, every input token a copy of its cluster, and ``None``."""
    if not patch.config.unmerge or tokens.source is None:
        return tokens.x, tokens.size
    slot = tokens.source.argmax(1)  # (B, N0): the output token holding each input token
    return tokens.x.gather(1, slot[..., None].expand(-1, -1, tokens.x.shape[-1])), None


def _padding_mask(owner: nn.Module, patch: ViTPatch, x: Tensor, attention_mask: Any) -> Any:
    """transformers' bidirectional mask; ``None`` for flex attention's full ``BlockMask`` when
    tokens are reduced (the same attention, and ``None`` can follow the merges)."""
    from transformers.masking_utils import create_bidirectional_mask

    c = owner.config
    if attention_mask is None and c._attn_implementation == "flex_attention" and patch.reduces:
        return None
    return create_bidirectional_mask(config=c, inputs_embeds=x, attention_mask=attention_mask)


def _vit_forward(
    self, patch, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
    attention_mask=None, **kwargs,
):  # fmt: skip
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
    x = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
    mask = _padding_mask(self, patch, x, attention_mask)
    out = self.layernorm(_finish(patch, _encode(self, patch, self.layers, x, mask, kwargs))[0])
    pooled = self.pooler(out) if self.pooler is not None else None
    return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=pooled)


def _dinov2_forward(self, patch, hidden_states, attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutput

    tokens = _encode(self, patch, self.layer, hidden_states, attention_mask, kwargs)
    return BaseModelOutput(last_hidden_state=_finish(patch, tokens)[0])


def _clip_forward(self, patch, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
    x = _finish(patch, _encode(self, patch, self.encoder.layers, x, None, kwargs))[0]
    return BaseModelOutputWithPooling(
        last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0])
    )


def _siglip_forward(self, patch, pixel_values, interpolate_pos_encoding=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.embeddings(pixel_values, interpolate_pos_encoding)
    x, size = _finish(patch, _encode(self, patch, self.encoder.layers, x, None, kwargs))
    x = self.post_layernorm(x)
    size = size if patch.config.prop_attn else None
    pooled = _attention_pool(self.head, x, size) if self.use_head else None
    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


_FORWARDS = {
    "vit": _vit_forward,
    "dinov2": _dinov2_forward,
    "clip": _clip_forward,
    "siglip": _siglip_forward,
}


def _attention_pool(head: nn.Module, x: Tensor, size: Tensor | None) -> Tensor:
    """SigLIP's ``MultiheadAttentionPoolingHead`` with ``log(size)`` on its keys: ``(B, C)``."""
    if size is None:
        return head(x)
    bias = size.log().to(_compute_dtype(x)).transpose(1, 2)  # (B, 1, N)
    probe = head.probe.repeat(x.shape[0], 1, 1)
    mask = bias.repeat_interleave(head.attention.num_heads, 0)  # (B * heads, 1, N)
    h = head.attention(probe, x, x, attn_mask=mask)[0]
    return (h + head.mlp(head.layernorm(h)))[:, 0]


# --- layers ---------------------------------------------------------------------------------------


def _layer_forward(
    layer: nn.Module,
    patch: ViTPatch,
    table: tuple[str, ...],
    hidden_states: Tensor,
    attention_mask: Any = None,
    *,
    r: int | None = None,
    tokens: Tokens | None = None,
    **kwargs: Any,
) -> Tensor | Tokens:
    """Without ``r``: transformers' layer, ``(B, N, C) -> (B, N, C)``.

    With ``r`` (called by the owner): ``(B, N, C)`` tokens with the rest of their state in
    ``tokens`` -> :class:`~atc_patch.patch.vit.Tokens` with ``N - r`` tokens.
    """
    if r is None or tokens is None or (r == 0 and tokens.size is None):
        out = original(layer, "forward")(hidden_states, attention_mask, **kwargs)
        return out if tokens is None else tokens._replace(x=out)
    body = functools.partial(_merge_layer, layer, patch, table, r=r, tokens=tokens, **kwargs)
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(body, hidden_states, attention_mask)
    return body(hidden_states, attention_mask)


def _merge_layer(
    layer: nn.Module,
    patch: ViTPatch,
    table: tuple[str, ...],
    hidden_states: Tensor,
    attention_mask: Any,
    *,
    r: int,
    tokens: Tokens,
    **kwargs: Any,
) -> Tokens:
    """The layer with a merge between attention and MLP (see :data:`_LAYERS`)."""
    n1, a, after_attn, n2, m, after_mlp = table
    norm1, attn, norm2, mlp = (getattr(layer, name) for name in (n1, a, n2, m))
    h = norm1(hidden_states)
    mask = _attention_mask(attn, attention_mask, size_bias(tokens.size, patch.config.prop_attn), h)
    x = hidden_states + _chain(layer, after_attn, attn(h, attention_mask=mask, **kwargs)[0])
    metric = _mean_keys(attn, h) if r > 0 else None
    merged = merge_step(patch, metric, r, tokens._replace(x=x, attn_mask=attention_mask))
    return merged._replace(x=merged.x + _chain(layer, after_mlp, mlp(norm2(merged.x))))


def _chain(layer: nn.Module, names: str, x: Tensor) -> Tensor:
    for name in names.split():
        x = getattr(layer, name)(x)
    return x


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on, else ``x.dtype``."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):  # e.g. meta
        return x.dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _attention_mask(attn: nn.Module, mask: Any, bias: Tensor | None, h: Tensor) -> Any:
    """The layer's ``attention_mask`` plus the ``(B, 1, 1, N)`` proportional-attention ``bias``."""
    if bias is None:
        return mask
    _check_backend(attn.config._attn_implementation)
    return combine_masks(mask, bias, _compute_dtype(h))


def _mean_keys(attn: nn.Module, h: Tensor) -> Tensor:
    """Keys of ``h`` ``(B, N, C)`` averaged over heads: ``(B, N, head_dim)``."""
    proj, d = attn.k_proj, attn.head_dim
    weight = proj.weight.view(-1, d, proj.weight.shape[-1]).mean(0)
    return F.linear(h, weight, None if proj.bias is None else proj.bias.view(-1, d).mean(0))
