"""The ``dit`` family: diffusers' diffusion transformers (the classes of :mod:`.dit_models`).

Every chosen block (``blocks=[...]``, indices in execution order; default every block) runs its
attention (with ``merge_mlp`` the MLP, with ``merge_crossattn`` the cross-attention queries) on
its merged image tokens. Text, reference-image and padding tokens never merge; rotary tables
and attention masks follow the merge. Each class is a table entry
(:class:`~.dit_models.Model`): which sublayers of which blocks run on merged tokens, where a
block's text and image tokens are, and how a call's token grid is read::

    apply_patch(pipe, "atc", ratio=0.5, blocks=[0, 1])     # pipe or pipe.transformer
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from torch import nn

from ..config import DiffusionConfig
from . import BlockSpec, enter_call, patch, unpatch
from .core import check_grid_options
from .dit_models import MODELS, Args, Blocks, Model

NAME = "dit"
CONFIG = DiffusionConfig
WHAT = "a diffusers diffusion transformer"
UNUSED = {
    "max_downsample": "a diffusion transformer has one token resolution; pick blocks with "
    "blocks=[...] (indices in execution order)"
}


def root_of(model: Any) -> nn.Module | None:
    """``model`` if it is one of :data:`~.dit_models.MODELS`, or a pipeline's ``.transformer``
    (a pipeline's other transformers, e.g. Wan 2.2's ``transformer_2``, are found by
    :func:`~atc_patch.patch.find_roots`)."""
    if "diffusers" not in sys.modules:
        return None
    import diffusers

    m = getattr(model, "transformer", model)
    classes = tuple(c for c in (getattr(diffusers, n, None) for n in MODELS) if c is not None)
    return m if isinstance(m, classes) else None


def _model_name(root: nn.Module) -> str:
    return next(c.__name__ for c in type(root).__mro__ if c.__name__ in MODELS)


def transformer_blocks(root: nn.Module) -> list[nn.Module]:
    """The blocks of ``root`` in execution order (what ``blocks=`` indexes)."""
    return [b for b, _ in _table(root)]


def _table(root: nn.Module) -> list[tuple[nn.Module, Blocks]]:
    model = MODELS[_model_name(root)]
    return [(b, group) for group in model.blocks for b in group.of(root)]


def apply(root: nn.Module, config: DiffusionConfig) -> dict[str, Any]:
    """Patch the chosen blocks; report their number and the model class."""
    name = _model_name(root)
    model = MODELS[name]
    _check(name, model, config)
    table = _table(root)
    chosen = config.blocks if config.blocks is not None else tuple(range(len(table)))
    bad = [i for i in chosen if i >= len(table)]
    if bad:
        raise ValueError(f"blocks: index {bad[0]} out of range; this model has {len(table)} blocks")
    picked = []
    for i in chosen:
        block, group = table[i]
        spans = tuple((n, s) for n, s in group.spans(config).items() if getattr(block, n, None))
        if spans:
            spec = BlockSpec(config, i, spans, text=group.text, joint_input=group.joint_input)
            picked.append((block, spec))
    if not picked:
        raise ValueError(
            f"blocks={list(chosen)} with merge_attn={config.merge_attn}, merge_mlp="
            f"{config.merge_mlp}: no sublayer of the selected blocks runs on merged tokens"
        )
    patch(root, picked, functools.partial(_enter, model, Args.of(root)))
    return {"num_blocks": len(picked), "model": name}


def _check(name: str, model: Model, config: DiffusionConfig) -> None:
    if config.merge_crossattn and not model.cross_attention:
        crossed = ", ".join(
            n.split("Transformer")[0] for n, m in MODELS.items() if m.cross_attention
        )
        raise ValueError(
            f"merge_crossattn applies to {crossed} (cross-attention to text), not {name}: its "
            "text enters through joint attention (merge_attn) or adaLN conditioning"
        )
    check_grid_options(config, model.video, name)
    if config.merge_mlp and model.no_mlp:
        raise ValueError(f"merge_mlp=True cannot apply to {name}: {model.no_mlp}")
    if config.merge == "kv" and model.no_kv:
        raise ValueError(f"merge='kv' cannot apply to {name}: {model.no_kv}")


def remove(root: nn.Module) -> None:
    unpatch(root)


def _enter(model: Model, where: Args, root: nn.Module, args: tuple, kwargs: dict) -> None:
    """The transformer's forward pre-hook: a call, with what its entry reads from it."""
    enter_call(root, model.read(where, args, kwargs))
