"""Token reduction for Hugging Face ``transformers`` vision encoders (ViT, DeiT, DINOv2 with and
without registers, CLIP and SigLIP vision towers) and the task models holding one, in place.

Two kinds of modules are swapped (reversibly):

* the *owner*, the module whose ``forward`` runs the layers (``ViTModel``/``DeiTModel``, the
  DINOv2 encoder, ``CLIPVisionModel``, ``SiglipVisionModel``), runs them itself with the
  per-forward token state (sizes, source map, merged mask) and keeps transformers' output
  capture (``output_hidden_states``/``output_attentions``: each layer's own token count).
* every layer reduces tokens between attention and MLP when it is given ``r``; called the usual
  way it is transformers' layer. The attention module is not touched: proportional attention
  is its additive ``attention_mask`` (``"eager"``, ``"sdpa"``; other backends raise unless
  ``prop_attn=False``), and the metric, the keys averaged over heads, is ``h`` times the
  head-averaged key weights (the same linear map, ``1/heads`` of the key projection's cost).

Protected: class token; DeiT's distillation token; DINOv2's register tokens; none for SigLIP.
``last_hidden_state``: protected tokens first, then one token per cluster in the kernel's slot
order, or with ``unmerge=True`` one token per input token (each a copy of its cluster).
``pooler_output`` is the model's own; SigLIP's attention-pooling head gets the ``log(size)`` bias.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import CROSS_FAMILY_HINTS, as_bool, check_options
from . import _vit
from ._common import PatchInfo, clear_patch_info, restore_class, set_patch_info, swap_class

FAMILY = "transformers"
OPTIONS = (*_vit.VIT_OPTIONS, "unmerge")
# Backends that take the proportional-attention bias as an additive float mask. flex_attention
# is left out: a tensor mask makes it crash on the CPU (torch 2.14, unpatched models too).
BIAS_BACKENDS = ("eager", "sdpa")
_UNMERGE_ATTR = "_atc_unmerge"

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


_ENCODERS = {
    "ViTModel": _Encoder("vit", "ViTLayer", "", "layers", lambda c: 1),
    "DeiTModel": _Encoder("deit", "DeiTLayer", "", "layers", lambda c: 2),
    "Dinov2Model": _Encoder("dinov2", "Dinov2Layer", "encoder", "encoder.layer", lambda c: 1),
    "Dinov2WithRegistersModel": _Encoder(
        "dinov2_with_registers",
        "Dinov2WithRegistersLayer",
        "encoder",
        "encoder.layer",
        lambda c: 1 + c.num_register_tokens,
    ),
    "CLIPVisionModel": _Encoder("clip", "CLIPEncoderLayer", "", "encoder.layers", lambda c: 1),
    "SiglipVisionModel": _Encoder(
        "siglip", "SiglipEncoderLayer", "", "encoder.layers", lambda c: 0
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


def _vision_model(model: Any) -> tuple[nn.Module, _Encoder] | None:
    """The vision model inside ``model`` (or ``model`` itself) and its table entry."""
    task = _lookup(model, _TASKS)
    model = model if task is None else getattr(model, task[1])
    enc = _lookup(model, _ENCODERS)
    return None if enc is None else (model, enc)


def _resolve(module: nn.Module, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), module) if path else module


def matches(model: Any) -> bool:
    """True for a supported transformers model, without importing transformers."""
    return "transformers" in sys.modules and _vision_model(model) is not None


# --- apply / remove -------------------------------------------------------------------------------


def apply(model: nn.Module, method: str = "atc", **options: Any) -> None:
    """Patch ``model`` in place; see :func:`atc_patch.apply_patch` and docs/transformers.md."""
    vision, enc = _vision_model(model)
    owner, layers = _resolve(vision, enc.owner), list(_resolve(vision, enc.layers))
    for i, layer in enumerate(layers):
        if type(layer).__name__ != enc.layer:
            raise TypeError(
                f"layer {i} of this {type(vision).__name__} is a {type(layer).__name__}; "
                f"atc_patch supports {type(vision).__name__} built from {enc.layer}"
            )
    name = f"a transformers {type(vision).__name__}"
    check_options(name, options, OPTIONS, CROSS_FAMILY_HINTS["vit"])
    unmerge = as_bool("unmerge", options.pop("unmerge", False))
    config = _vit.make_reduction(method, enc.protected(vision.config), options)
    settings = {**_vit.settings_of(config, options), "unmerge": unmerge}
    if unmerge:  # the source map says where each input token went
        config = dataclasses.replace(config, trace_source=True)
    emb = vision.embeddings
    num_patches = getattr(emb, "num_patches", None) or emb.patch_embeddings.num_patches
    config.block_r(len(layers), num_patches + config.protected)  # schedule errors now
    if config.prop_attn and not config.schedule.is_identity():
        _check_backend(vision.config._attn_implementation)
    swap_class(owner, _ReducingOwner)
    _vit.set_config(owner, config)
    object.__setattr__(owner, _UNMERGE_ATTR, unmerge)
    for layer in layers:
        swap_class(layer, _ReducingLayer)
        _vit.set_config(layer, config)
    if config.trace_source:
        _vit.enable_trace(model, owner)  # one slot: the owner writes, the model is read
    set_patch_info(model, PatchInfo(FAMILY, method, settings))


def remove(model: nn.Module) -> None:
    """Restore the original classes and drop every attribute :func:`apply` added."""
    vision, enc = _vision_model(model)
    for module in (*_resolve(vision, enc.layers), _resolve(vision, enc.owner), model):
        restore_class(module)
        _vit.clear_config(module)
        vars(module).pop(_UNMERGE_ATTR, None)
    clear_patch_info(model)


def _check_backend(impl: str) -> None:
    if impl not in BIAS_BACKENDS:
        raise ValueError(
            f"prop_attn=True adds log(size) to the attention logits, which attn_implementation "
            f"{impl!r} cannot take; use one of {BIAS_BACKENDS} (model.set_attn_implementation) "
            "or apply_patch(..., prop_attn=False)"
        )


# --- owners ---------------------------------------------------------------------------------------


@functools.cache
def _hf(body: Callable) -> Callable:
    """``body`` with the decorators of transformers' ``forward`` (output capture, config
    defaults), applied on first use: importing this module does not import transformers."""
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs

    return merge_with_config_defaults(capture_outputs(tie_last_hidden_states=False)(body))


class _ReducingOwner:
    """Mixin for the owners: their ``forward`` with the layers run by :func:`_encode`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # transformers finds what a model records by its class name: register the patched class
        # (made by swap_class, or when unpickling).
        super().__init_subclass__(**kwargs)
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

        dict.__setitem__(_CAN_RECORD_REGISTRY, str(cls), cls._can_record_outputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original ``forward``'s inputs and outputs, with ``N'`` tokens."""
        return _hf(_FORWARDS[vars(self)["_atc_orig_class"].__name__])(self, *args, **kwargs)


def _encode(owner: nn.Module, layers: nn.ModuleList, x: Tensor, mask: Any, kwargs: dict) -> Any:
    """Run ``layers`` on ``(B, N, C)`` tokens with reduction; returns the final ``Tokens``."""
    config = _vit.get_config(owner)
    num_tokens = x.shape[1]
    rs = config.block_r(len(layers), num_tokens)
    if any(rs) and mask is not None and not isinstance(mask, Tensor):
        raise ValueError(f"a {type(mask).__name__} attention mask cannot follow merged tokens")
    tokens = _vit.Tokens(x, attn_mask=mask)
    for layer, r in zip(layers, rs):
        x, *rest = layer(x, tokens.attn_mask, r=r, size=tokens.size, source=tokens.source, **kwargs)
        # A reentrant checkpoint returns a plain tuple of differentiable tensors: rebuild the
        # named tuple with the sizes, source map and mask (never trained) detached.
        tokens = _vit.Tokens(x, *(t.detach() if isinstance(t, Tensor) else t for t in rest))
    if config.trace_source:
        _vit.store_source(owner, tokens, num_tokens)
    return tokens


def _finish(owner: nn.Module, tokens: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, size)`` for the model's head: the reduced tokens and their sizes, or with
    ``unmerge`` ``(B, N0, C)``, every input token a copy of its cluster, and ``None``."""
    if not vars(owner)[_UNMERGE_ATTR] or tokens.source is None:
        return tokens.x, tokens.size
    slot = tokens.source.argmax(1)  # (B, N0): the output token holding each input token
    return tokens.x.gather(1, slot[..., None].expand(-1, -1, tokens.x.shape[-1])), None


def _padding_mask(owner: nn.Module, x: Tensor, attention_mask: Tensor | None) -> Any:
    """transformers' bidirectional mask; ``None`` for flex attention's full ``BlockMask`` when
    tokens are reduced (the same attention, and ``None`` can follow the merges)."""
    from transformers.masking_utils import create_bidirectional_mask

    c = owner.config
    if attention_mask is None and c._attn_implementation == "flex_attention":
        if not _vit.get_config(owner).schedule.is_identity():
            return None
    return create_bidirectional_mask(config=c, inputs_embeds=x, attention_mask=attention_mask)


def _vit_forward(
    self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
    attention_mask=None, **kwargs,
):  # fmt: skip
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
    x = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
    tokens = _encode(self, self.layers, x, _padding_mask(self, x, attention_mask), kwargs)
    out = self.layernorm(_finish(self, tokens)[0])
    pooled = self.pooler(out) if self.pooler is not None else None
    return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=pooled)


def _dinov2_encoder_forward(self, hidden_states, attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutput

    tokens = _encode(self, self.layer, hidden_states, attention_mask, kwargs)
    return BaseModelOutput(last_hidden_state=_finish(self, tokens)[0])


def _clip_forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
    x = _finish(self, _encode(self, self.encoder.layers, x, None, kwargs))[0]
    return BaseModelOutputWithPooling(
        last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0])
    )


def _siglip_forward(self, pixel_values, interpolate_pos_encoding=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.embeddings(pixel_values, interpolate_pos_encoding)
    x, size = _finish(self, _encode(self, self.encoder.layers, x, None, kwargs))
    x = self.post_layernorm(x)
    size = size if _vit.get_config(self).prop_attn else None
    pooled = _attention_pool(self.head, x, size) if self.use_head else None
    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


_FORWARDS = {
    "ViTModel": _vit_forward,
    "DeiTModel": _vit_forward,
    "Dinov2Encoder": _dinov2_encoder_forward,
    "Dinov2WithRegistersEncoder": _dinov2_encoder_forward,
    "CLIPVisionModel": _clip_forward,
    "SiglipVisionModel": _siglip_forward,
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


class _ReducingLayer:
    """Mixin for the layers of :data:`_LAYERS`: merge between attention and MLP."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Any = None,
        *,
        r: int | None = None,
        size: Tensor | None = None,
        source: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor | _vit.Tokens:
        """Without ``r``: transformers' layer, ``(B, N, C) -> (B, N, C)``.

        With ``r`` (called by the owner): ``(B, N, C)`` tokens with ``size`` ``(B, N, 1)`` and
        ``source`` ``(B, N, N0)`` -> :class:`~atc_patch.patch._vit.Tokens` with ``N - r`` tokens.
        """
        if r is None or (r == 0 and size is None):  # nothing merged yet, nothing to merge here
            out = super().forward(hidden_states, attention_mask, **kwargs)
            return out if r is None else _vit.Tokens(out, size, source, attention_mask)
        config = _vit.get_config(self)
        n1, a, after_attn, n2, m, after_mlp = _LAYERS[vars(self)["_atc_orig_class"].__name__]
        norm1, attn, norm2, mlp = (getattr(self, name) for name in (n1, a, n2, m))
        h = norm1(hidden_states)
        mask = _attention_mask(attn, attention_mask, _vit.size_bias(size, config.prop_attn), h)
        x = hidden_states + self._atc_chain(after_attn, attn(h, attention_mask=mask, **kwargs)[0])
        metric = _mean_keys(attn, h) if r > 0 else None
        tokens = _vit.merge_step(config, metric, r, _vit.Tokens(x, size, source, attention_mask))
        return tokens._replace(x=tokens.x + self._atc_chain(after_mlp, mlp(norm2(tokens.x))))

    def _atc_chain(self, names: str, x: Tensor) -> Tensor:
        for name in names.split():
            x = getattr(self, name)(x)
        return x


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on, else ``x.dtype``."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _attention_mask(attn: nn.Module, mask: Any, bias: Tensor | None, h: Tensor) -> Any:
    """The layer's ``attention_mask`` plus the ``(B, 1, 1, N)`` proportional-attention ``bias``."""
    if bias is None:
        return mask
    _check_backend(attn.config._attn_implementation)
    return _vit.combine_masks(mask, bias, _compute_dtype(h))


def _mean_keys(attn: nn.Module, h: Tensor) -> Tensor:
    """Keys of ``h`` ``(B, N, C)`` averaged over heads: ``(B, N, head_dim)``."""
    proj, d = attn.k_proj, attn.head_dim
    weight = proj.weight.view(-1, d, proj.weight.shape[-1]).mean(0)
    return F.linear(h, weight, None if proj.bias is None else proj.bias.view(-1, d).mean(0))
