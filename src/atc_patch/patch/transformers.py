"""Token reduction for Hugging Face ``transformers`` vision encoders, patched in place.

Supported: ``ViTModel``, ``DeiTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
``CLIPVisionModel``, ``SiglipVisionModel`` and the task models holding one (see :data:`_TASKS`),
whose vision encoder is patched. Two kinds of modules are swapped (reversibly):

* the module that runs the layers (the *owner*: ``ViTModel``/``DeiTModel`` themselves, the
  DINOv2 ``encoder``, the CLIP ``encoder``, ``SiglipVisionModel`` for its pooling head) runs
  them itself and threads the per-forward token state (sizes, source map, merged attention
  mask) through them; the schedule is evaluated per forward from the tokens that enter layer 0.
* every layer reduces tokens between attention and MLP when it is given ``r``; called the usual
  way it is transformers' layer. Its attention module is not touched: proportional attention is
  passed as the additive ``attention_mask`` (so ``"eager"``, ``"sdpa"`` and ``"flex_attention"``
  keep working; other backends raise), and the metric, the keys averaged over heads, is the
  same linear map with the head-averaged key weights (``1/heads`` of the key projection's cost).

Protected: the class token (ViT, DINOv2, CLIP), class + distillation tokens (DeiT), class +
register tokens (DINOv2 with registers); none for SigLIP. Outputs: ``last_hidden_state`` holds
the reduced tokens (protected tokens first, then one token per cluster in the kernel's slot
order), or with ``unmerge=True`` one token per input token (each patch gets its cluster's
feature); ``pooler_output`` is the model's own (SigLIP's attention-pooling head with the
``log(size)`` bias); ``hidden_states`` have each layer's own token count.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import CROSS_FAMILY_HINTS, as_bool, check_options
from . import _vit
from ._common import PatchInfo, clear_patch_info, restore_class, set_patch_info, swap_class

FAMILY = "transformers"
OPTIONS = (*_vit.VIT_OPTIONS, "unmerge")
BIAS_BACKENDS = ("eager", "sdpa", "flex_attention")  # take an additive float attention mask
_UNMERGE_ATTR = "_atc_unmerge"


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Submodule names of a transformers pre-norm layer: ``x + post1(attn(norm1(x)))``, then
    ``x + post2(mlp(norm2(x)))``."""

    norm1: str
    attn: str
    post1: tuple[str, ...]
    norm2: str
    mlp: str
    post2: tuple[str, ...]


_VIT_LAYER = _Layer(
    "layernorm_before", "attention", ("dropout",), "layernorm_after", "mlp", ("dropout",)
)
_DINO_LAYER = _Layer(
    "norm1",
    "attention",
    ("layer_scale1", "drop_path"),
    "norm2",
    "mlp",
    ("layer_scale2", "drop_path"),
)
_CLIP_LAYER = _Layer("layer_norm1", "self_attn", (), "layer_norm2", "mlp", ())


@dataclasses.dataclass(frozen=True)
class _Encoder:
    """One supported vision model: where its layers run and which leading tokens are protected."""

    module: str  # transformers.models.<module>.modeling_<module>
    layer: str  # the layer class name
    owner: str  # path from the vision model to the module that runs the layers ("" = itself)
    layers: str  # path from the vision model to its ``nn.ModuleList`` of layers
    mixin: type
    protected: Callable[[Any], int]  # config -> number of protected leading tokens


def _resolve(module: nn.Module, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), module) if path else module


# --- the per-forward loop shared by every owner -------------------------------------------------


def _encode(owner: nn.Module, layers: nn.ModuleList, x: Tensor, mask: Any, kwargs: dict) -> Any:
    """Run ``layers`` on ``(B, N, C)`` tokens with reduction; returns the final ``Tokens``."""
    config = _vit.get_config(owner)
    num_tokens = x.shape[1]
    rs = config.block_r(len(layers), num_tokens)
    if any(rs) and mask is not None and not isinstance(mask, Tensor):
        raise ValueError(
            f"a {type(mask).__name__} attention mask cannot follow merged tokens; pass the padding "
            "mask with attn_implementation 'eager' or 'sdpa'"
        )
    tokens = _vit.Tokens(x, attn_mask=mask)
    for layer, r in zip(layers, rs):
        x, *rest = layer(
            tokens.x, tokens.attn_mask, r=r, size=tokens.size, source=tokens.source, **kwargs
        )
        # A reentrant checkpoint returns a plain tuple whose every tensor is differentiable:
        # rebuild the named tuple, with sizes, source map and mask (never trained) detached.
        tokens = _vit.Tokens(x, *(t.detach() if isinstance(t, Tensor) else t for t in rest))
    if config.trace_source:
        _vit.store_source(owner, tokens, num_tokens)
    return tokens


def _finish(owner: nn.Module, tokens: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, size)`` handed to the model's head: the reduced tokens and their sizes, or with
    ``unmerge`` one row per input token ``(B, N0, C)`` (each a copy of its cluster) and ``None``."""
    if not vars(owner)[_UNMERGE_ATTR] or tokens.source is None:
        return tokens.x, tokens.size
    slot = tokens.source.argmax(1)  # (B, N0): the output token holding each input token
    return tokens.x.gather(1, slot[..., None].expand(-1, -1, tokens.x.shape[-1])), None


def _padding_mask(owner: nn.Module, x: Tensor, attention_mask: Tensor | None) -> Any:
    """transformers' bidirectional mask; ``None`` instead of flex attention's full ``BlockMask``
    when tokens are reduced (the same full attention, and it can follow merges)."""
    from transformers.masking_utils import create_bidirectional_mask

    config = owner.config
    reduces = not _vit.get_config(owner).schedule.is_identity()
    if attention_mask is None and reduces and config._attn_implementation == "flex_attention":
        return None
    return create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=attention_mask)


@functools.cache
def _hf_forward(body: Callable) -> Callable:
    """``body`` with the decorators transformers puts on its ``forward`` (output capture, config
    defaults), applied on first use so importing this module does not import transformers."""
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs

    return merge_with_config_defaults(capture_outputs(tie_last_hidden_states=False)(body))


class _RecordsOutputs:
    """Registers the patched class for transformers' ``output_hidden_states`` capture (keyed on
    the class name), when :func:`swap_class` or unpickling creates it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if hasattr(cls, "_can_record_outputs"):  # a patched model class, not a mixin
            from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

            dict.__setitem__(_CAN_RECORD_REGISTRY, str(cls), cls._can_record_outputs)


# --- owners ---------------------------------------------------------------------------------------


def _vit_forward(
    self,
    pixel_values: Tensor | None = None,
    bool_masked_pos: Tensor | None = None,
    interpolate_pos_encoding: bool | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
    if pixel_values.dtype != expected_dtype:
        pixel_values = pixel_values.to(expected_dtype)
    x = self.embeddings(
        pixel_values,
        bool_masked_pos=bool_masked_pos,
        interpolate_pos_encoding=interpolate_pos_encoding,
    )
    tokens = _encode(self, self.layers, x, _padding_mask(self, x, attention_mask), kwargs)
    sequence_output = self.layernorm(_finish(self, tokens)[0])
    pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
    return BaseModelOutputWithPooling(
        last_hidden_state=sequence_output, pooler_output=pooled_output
    )


def _dinov2_encoder_forward(
    self, hidden_states: Tensor, attention_mask: Any = None, **kwargs: Any
) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    tokens = _encode(self, self.layer, hidden_states, attention_mask, kwargs)
    return BaseModelOutput(last_hidden_state=_finish(self, tokens)[0])


def _siglip_forward(
    self, pixel_values: Tensor, interpolate_pos_encoding: bool | None = False, **kwargs: Any
) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    x, size = _finish(self, _encode(self, self.encoder.layers, x, None, kwargs))
    size = size if _vit.get_config(self).prop_attn else None
    last_hidden_state = self.post_layernorm(x)
    pooler_output = _attention_pool(self.head, last_hidden_state, size) if self.use_head else None
    return BaseModelOutputWithPooling(
        last_hidden_state=last_hidden_state, pooler_output=pooler_output
    )


class _ReducingViTModel(_RecordsOutputs):
    """Mixin for ``ViTModel`` and ``DeiTModel``: the layers run in the model's own forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``(B, 3, H, W)`` -> ``BaseModelOutputWithPooling`` with ``N'`` tokens."""
        return _hf_forward(_vit_forward)(self, *args, **kwargs)


class _ReducingDinov2Encoder(_RecordsOutputs):
    """Mixin for ``Dinov2Encoder`` and ``Dinov2WithRegistersEncoder``."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``(B, N, C)`` embeddings -> ``BaseModelOutput`` with ``N'`` tokens."""
        return _hf_forward(_dinov2_encoder_forward)(self, *args, **kwargs)


class _ReducingSiglipVisionModel(_RecordsOutputs):
    """Mixin for ``SiglipVisionModel``: the layers run here so the pooling head sees the sizes."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``(B, 3, H, W)`` -> ``BaseModelOutputWithPooling`` with ``N'`` tokens."""
        return _hf_forward(_siglip_forward)(self, *args, **kwargs)


class _ReducingCLIPEncoder:
    """Mixin for ``CLIPEncoder`` (output capture stays with ``CLIPVisionModel``)."""

    def forward(self, inputs_embeds: Tensor, attention_mask: Any = None, **kwargs: Any) -> Any:
        """``(B, N, C)`` embeddings -> ``BaseModelOutput`` with ``N'`` tokens."""
        from transformers.modeling_outputs import BaseModelOutput

        tokens = _encode(self, self.layers, inputs_embeds, attention_mask, kwargs)
        return BaseModelOutput(last_hidden_state=_finish(self, tokens)[0])


def _attention_pool(head: nn.Module, x: Tensor, size: Tensor | None) -> Tensor:
    """SigLIP's ``MultiheadAttentionPoolingHead`` with ``log(size)`` on its keys: ``(B, C)``."""
    if size is None:
        return head(x)
    b, n, _ = x.shape
    heads = head.attention.num_heads
    bias = size.log().to(_compute_dtype(x)).transpose(1, 2)  # (B, 1, N)
    probe = head.probe.repeat(b, 1, 1)
    h = head.attention(probe, x, x, attn_mask=bias.repeat_interleave(heads, 0))[0]
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


# --- layers ---------------------------------------------------------------------------------------


class _ReducingLayer:
    """Mixin for the transformers layers of :data:`_LAYERS`: merge between attention and MLP."""

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

        With ``r`` (called by the patched owner): ``(B, N, C)`` tokens with ``size``
        ``(B, N, 1)`` and ``source`` ``(B, N, N0)`` -> :class:`~atc_patch.patch._vit.Tokens`
        with ``N - r`` tokens.
        """
        if r is None or (r == 0 and size is None):  # nothing merged yet, nothing to merge here
            out = super().forward(hidden_states, attention_mask, **kwargs)
            return out if r is None else _vit.Tokens(out, size, source, attention_mask)
        config = _vit.get_config(self)
        names = _LAYERS[_original(self).__name__]
        h = getattr(self, names.norm1)(hidden_states)
        attn = getattr(self, names.attn)
        mask = _attention_mask(attn, attention_mask, _vit.size_bias(size, config.prop_attn), h)
        out = attn(hidden_states=h, attention_mask=mask, **kwargs)[0]
        x = hidden_states + _chain(self, names.post1, out)
        metric = _mean_keys(attn, h) if r > 0 else None
        tokens = _vit.merge_step(config, metric, r, _vit.Tokens(x, size, source, attention_mask))
        y = _chain(
            self, names.post2, getattr(self, names.mlp)(getattr(self, names.norm2)(tokens.x))
        )
        return tokens._replace(x=tokens.x + y)


def _original(module: nn.Module) -> type:
    return vars(module)["_atc_orig_class"]


def _chain(module: nn.Module, names: tuple[str, ...], x: Tensor) -> Tensor:
    for name in names:
        x = getattr(module, name)(x)
    return x


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on, else ``x.dtype``."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _attention_mask(attn: nn.Module, mask: Any, bias: Tensor | None, h: Tensor) -> Any:
    """The layer's ``attention_mask`` with the ``(B, 1, 1, N)`` proportional-attention ``bias``."""
    if bias is None:
        return mask
    impl = attn.config._attn_implementation
    if impl not in BIAS_BACKENDS:
        raise ValueError(
            f"prop_attn=True adds log(size) to the attention logits, which attn_implementation "
            f"{impl!r} cannot take; use one of {BIAS_BACKENDS} "
            "(model.set_attn_implementation('sdpa')) or apply_patch(..., prop_attn=False)"
        )
    mask = _vit.combine_masks(mask, bias, _compute_dtype(h))
    if impl == "flex_attention":  # its score_mod indexes the mask by query too
        n = h.shape[1]
        mask = mask.expand(-1, -1, n, n)
    return mask


def _mean_keys(attn: nn.Module, h: Tensor) -> Tensor:
    """Keys of ``h`` ``(B, N, C)`` averaged over heads, ``(B, N, head_dim)``: ``h`` times the
    head-averaged key weights (the same linear map as averaging the per-head keys)."""
    proj, d = attn.k_proj, attn.head_dim
    weight = proj.weight.view(-1, d, proj.weight.shape[-1]).mean(0)
    bias = None if proj.bias is None else proj.bias.view(-1, d).mean(0)
    return F.linear(h, weight, bias)


# --- the tables -----------------------------------------------------------------------------------

_LAYERS = {
    "ViTLayer": _VIT_LAYER,
    "DeiTLayer": _VIT_LAYER,
    "Dinov2Layer": _DINO_LAYER,
    "Dinov2WithRegistersLayer": _DINO_LAYER,
    "CLIPEncoderLayer": _CLIP_LAYER,
    "SiglipEncoderLayer": _CLIP_LAYER,
}

_ENCODERS = {
    "ViTModel": _Encoder("vit", "ViTLayer", "", "layers", _ReducingViTModel, lambda c: 1),
    "DeiTModel": _Encoder("deit", "DeiTLayer", "", "layers", _ReducingViTModel, lambda c: 2),
    "Dinov2Model": _Encoder(
        "dinov2", "Dinov2Layer", "encoder", "encoder.layer", _ReducingDinov2Encoder, lambda c: 1
    ),
    "Dinov2WithRegistersModel": _Encoder(
        "dinov2_with_registers",
        "Dinov2WithRegistersLayer",
        "encoder",
        "encoder.layer",
        _ReducingDinov2Encoder,
        lambda c: 1 + c.num_register_tokens,
    ),
    "CLIPVisionModel": _Encoder(
        "clip", "CLIPEncoderLayer", "encoder", "encoder.layers", _ReducingCLIPEncoder, lambda c: 1
    ),
    "SiglipVisionModel": _Encoder(
        "siglip",
        "SiglipEncoderLayer",
        "",
        "encoder.layers",
        _ReducingSiglipVisionModel,
        lambda c: 0,
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

SUPPORTED = (
    f"transformers {', '.join(_ENCODERS)} and the task models holding one ({', '.join(_TASKS)})"
)


def _lookup(model: Any, table: dict) -> tuple[str, Any] | None:
    """``(class name, table entry)`` for the first class of ``model``'s MRO in ``table``."""
    for cls in type(model).__mro__:
        entry = table.get(cls.__name__)
        if entry is None:
            continue
        module = entry.module if isinstance(entry, _Encoder) else entry[0]
        if cls.__module__ == f"transformers.models.{module}.modeling_{module}":
            return cls.__name__, entry
    return None


def _vision_model(model: Any) -> tuple[nn.Module, _Encoder] | None:
    """The vision model to patch inside ``model`` (``model`` itself or its encoder attribute)."""
    task = _lookup(model, _TASKS)
    if task is not None:
        model = getattr(model, task[1][1])
    found = _lookup(model, _ENCODERS)
    return None if found is None else (model, found[1])


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
                f"layer {i} of this {type(vision).__name__} is a {type(layer).__name__}; atc_patch "
                f"supports {type(vision).__name__} built from {enc.layer}"
            )
    check_options(
        f"a transformers {type(vision).__name__}", options, OPTIONS, CROSS_FAMILY_HINTS["vit"]
    )
    vit_options = {k: v for k, v in options.items() if k != "unmerge"}
    unmerge = as_bool("unmerge", options.get("unmerge", False))
    config = _vit.make_reduction(method, enc.protected(vision.config), vit_options)
    settings = {**_vit.settings_of(config, vit_options), "unmerge": unmerge}
    if unmerge:  # the source map says where each input token went
        config = dataclasses.replace(config, trace_source=True)
    emb = vision.embeddings
    num_patches = getattr(emb, "num_patches", None) or emb.patch_embeddings.num_patches
    config.block_r(len(layers), num_patches + config.protected)  # schedule errors now
    impl = vision.config._attn_implementation
    if config.prop_attn and not config.schedule.is_identity() and impl not in BIAS_BACKENDS:
        raise ValueError(
            f"prop_attn=True needs an attention implementation that takes an additive mask "
            f"{BIAS_BACKENDS}; this model uses {impl!r}: pass prop_attn=False or call "
            "model.set_attn_implementation('sdpa') first"
        )
    swap_class(owner, enc.mixin)
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
    owner = _resolve(vision, enc.owner)
    for layer in _resolve(vision, enc.layers):
        restore_class(layer)
        _vit.clear_config(layer)
    restore_class(owner)
    _vit.clear_config(owner)
    if _UNMERGE_ATTR in vars(owner):
        object.__delattr__(owner, _UNMERGE_ATTR)
    _vit.clear_config(model)
    clear_patch_info(model)
