"""The transformers family: Hugging Face vision encoders (ViT, DeiT, DINOv2 with and without
registers, CLIP and SigLIP vision towers, DINOv3, SigLIP2 NaFlex, AIMv2) and the task models
holding one.

The root is the vision model (a task model's ``.vit``, ``.vision_model``, ...): it holds the
record whichever object was given. Each class is a table entry: :data:`_ENCODERS` (where its
layers are, which module runs them, its protected tokens, its owner's forward in
:mod:`.transformers_models`) and :data:`_LAYERS` (the layer's sublayers). Instance overrides
(every module keeps its class, so transformers' class-name lookups, output capture, key renaming
in ``save_pretrained`` and ``inspect.signature`` see the original):

* the *owner*, the module whose ``forward`` runs the layers (``ViTModel``/``DeiTModel``, the
  DINOv2/DINOv3 encoder, ``CLIPVisionModel``, ``SiglipVisionModel``, ...): ``forward`` runs
  them with the per-forward token state (:mod:`.transformers_layers`), under transformers' own
  decorators (output capture: every layer's own token count);
* every layer: ``forward`` merges between attention and MLP when the owner gives it ``r``.
  The attention module is untouched: proportional attention is its additive
  ``attention_mask`` (``"eager"``, ``"sdpa"``; other backends raise unless
  ``prop_attn=False``); rotary ``position_embeddings`` (DINOv3) follow every merge; the metric
  is the keys averaged over heads, ``h`` times the head-averaged key weights (the same linear
  map at ``1/heads`` of the key projection's cost).

Protected: class token; DeiT's distillation token; DINOv2's and DINOv3's register tokens; none
for SigLIP, SigLIP2 and AIMv2. SigLIP2's padded patches never merge with real ones.
``last_hidden_state``: protected tokens first, then one token per cluster, or with
``unmerge=True`` one per input token (a copy of its cluster)::

    apply_patch(transformers.ViTForImageClassification(config), "atc", r=8)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from .._override import original, override, restore_tree
from ..config import PatchInfo, ViTConfig
from . import TraceSlot, ViTPatch
from .transformers_layers import check_backend, layer_forward
from .transformers_models import FORWARDS

NAME = "transformers"
CONFIG = ViTConfig
WHAT = "a transformers vision encoder"

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
    "DINOv3ViTLayer": ("norm1", "attention", "layer_scale1 drop_path", "norm2", "mlp",
                       "layer_scale2 drop_path"),
    "Siglip2EncoderLayer": _CLIP,
    "Aimv2EncoderLayer": ("rms_norm1", "attention", "", "rms_norm2", "ffn", ""),
}  # fmt: skip


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
    "DINOv3ViTModel": _Encoder(
        "dinov3_vit", "DINOv3ViTLayer", "model", "model.layer",
        lambda c: 1 + c.num_register_tokens, "dinov3",
    ),
    "Siglip2VisionModel": _Encoder(
        "siglip2", "Siglip2EncoderLayer", "", "encoder.layers", lambda c: 0, "siglip2"
    ),
    "Aimv2VisionModel": _Encoder(
        "aimv2", "Aimv2EncoderLayer", "", "encoder.layers", lambda c: 0, "aimv2"
    ),
}  # fmt: skip

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
    "Siglip2Model": ("siglip2", "vision_model"),
    "Aimv2Model": ("aimv2", "vision_model"),
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
    patch.check(len(layers), _num_patches(root) + protected)
    if config.prop_attn and patch.reduces:
        check_backend(root.config._attn_implementation)
    override(owner, "forward", _owner_forward, patch, enc.forward)
    for layer in layers:
        override(layer, "forward", layer_forward, patch, _LAYERS[enc.layer])
    return PatchInfo(NAME, config, {"protected": protected}, state=slot)


def remove(root: nn.Module) -> None:
    """Undo :func:`apply` (also a partial one)."""
    restore_tree(root)


def _num_patches(root: nn.Module) -> int:
    """Patches at the model's own input size (SigLIP2: its ``num_patches`` slots)."""
    emb = root.embeddings
    num = getattr(emb, "num_patches", None)
    num = num or getattr(getattr(emb, "patch_embeddings", None), "num_patches", None)
    if num:
        return int(num)
    c = root.config
    size, patch = c.image_size, c.patch_size
    h, w = (size, size) if isinstance(size, int) else size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return (h // ph) * (w // pw)


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

        body = FORWARDS[kind]
        forward = merge_with_config_defaults(capture_outputs(tie_last_hidden_states=False)(body))
        _DECORATED[kind] = forward
    return forward


def _owner_forward(owner: nn.Module, patch: ViTPatch, kind: str, *args: Any, **kwargs: Any) -> Any:
    """The original ``forward``'s inputs and outputs, with ``N'`` tokens."""
    if patch.is_passthrough:
        return original(owner, "forward")(*args, **kwargs)
    return _decorated(kind)(owner, patch, *args, **kwargs)
