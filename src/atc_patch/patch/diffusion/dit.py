"""The ``dit`` family: diffusers Flux, SD3, PixArt and DiT transformers.

Every chosen block (``blocks=[...]``, indices in execution order; default every block) runs its
attention (with ``merge_mlp`` the MLP, with ``merge_crossattn`` PixArt's cross-attention
queries) on its merged image tokens. Text tokens never merge: Flux's and SD3's text stream
enters the joint attention as it is, a Flux single-stream block's text rows are a prefix the
plan does not cover, PixArt's text is in cross-attention keys. Flux's rotary tables follow the
merge (:func:`~.merge.merge_rotary`). ``tome_sd``'s grid is the latent grid of patches (SD3,
PixArt, DiT) or read from Flux's ``img_ids``::

    apply_patch(pipe, "atc", ratio=0.5, blocks=[0, 1])     # pipe or pipe.transformer
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DiffusionConfig
from . import BlockSpec, Call, Span, enter_call, patch, unpatch

NAME = "dit"
CONFIG = DiffusionConfig
WHAT = "a diffusers diffusion transformer"
UNUSED = {
    "max_downsample": "a diffusion transformer has one token resolution; pick blocks with "
    "blocks=[...] (indices in execution order)"
}
Spans = Callable[[DiffusionConfig], dict[str, Span]]


def _flux_double(c: DiffusionConfig) -> dict[str, Span]:
    # attn returns (image, text) or (image, text, ip-adapter image): positions 0 and 2 are image.
    attn = {"attn": Span(outputs=(0, 2), mask="reject", rotary=True)} if c.merge_attn else {}
    return {**attn, **({"ff": Span()} if c.merge_mlp else {})}


def _flux_single(c: DiffusionConfig) -> dict[str, Span]:
    # attn and proj_mlp read the same tokens; proj_out(cat(attn, mlp)) is per token, so with both
    # merged the unmerge moves after proj_out (the same result, proj_out on fewer tokens).
    if c.merge_attn and c.merge_mlp:
        return {
            "attn": Span(unmerge_out=False, mask="reject", rotary=True),
            "proj_mlp": Span(unmerge_out=False),
            "proj_out": Span(merge_in=False),
        }
    if c.merge_attn:
        return {"attn": Span(mask="reject", rotary=True)}
    return {"proj_mlp": Span()} if c.merge_mlp else {}


def _joint(c: DiffusionConfig) -> dict[str, Span]:  # SD3 JointTransformerBlock
    # attn2: SD3.5's image-only self-attention.
    # attn: JointAttnProcessor2_0 puts the image keys before the text keys.
    joint = Span(mask="reject", image_keys="first")
    attn = {"attn": joint, "attn2": Span(mask="keys")} if c.merge_attn else {}
    return {**attn, **({"ff": Span()} if c.merge_mlp else {})}


def _basic(c: DiffusionConfig) -> dict[str, Span]:  # PixArt / DiT BasicTransformerBlock
    out = {"attn1": Span(mask="keys")} if c.merge_attn else {}
    out.update({"attn2": Span()} if c.merge_crossattn else {})  # queries; the text keys stay
    return {**out, **({"ff": Span()} if c.merge_mlp else {})}


@dataclass(frozen=True)
class _Model:
    """A transformer class: its blocks in execution order as ``(attribute, spans, prefix)``
    (``prefix``: the argument holding never-merged tokens in front of the image tokens),
    whether its grid comes from ``img_ids``, whether it has cross-attention."""

    blocks: tuple[tuple[str, Spans, tuple[int, str] | None], ...]
    ids: bool = False
    cross_attention: bool = False


MODELS = {
    "FluxTransformer2DModel": _Model(
        (
            ("transformer_blocks", _flux_double, None),
            ("single_transformer_blocks", _flux_single, (1, "encoder_hidden_states")),
        ),
        ids=True,
    ),
    "SD3Transformer2DModel": _Model((("transformer_blocks", _joint, None),)),
    "PixArtTransformer2DModel": _Model(
        (("transformer_blocks", _basic, None),), cross_attention=True
    ),
    "DiTTransformer2DModel": _Model((("transformer_blocks", _basic, None),)),
}


def root_of(model: Any) -> nn.Module | None:
    """``model`` if it is one of :data:`MODELS`, or a pipeline's ``.transformer``."""
    if "diffusers" not in sys.modules:
        return None
    import diffusers

    m = getattr(model, "transformer", model)
    return m if isinstance(m, tuple(getattr(diffusers, n) for n in MODELS)) else None


def _model_name(root: nn.Module) -> str:
    return next(c.__name__ for c in type(root).__mro__ if c.__name__ in MODELS)


def transformer_blocks(root: nn.Module) -> list[nn.Module]:
    """The blocks of ``root`` in execution order (what ``blocks=`` indexes)."""
    return [b for b, _, _ in _table(root)]


def _table(root: nn.Module) -> list[tuple[nn.Module, Spans, tuple[int, str] | None]]:
    model = MODELS[_model_name(root)]
    return [(b, spans, prefix) for attr, spans, prefix in model.blocks for b in getattr(root, attr)]


@dataclass(frozen=True)
class _Where:
    """Where a root call's arguments are: positions of ``timestep`` and ``img_ids`` (Flux,
    else ``None``), and the patch size of the latent grid (the others)."""

    timestep: int
    ids: int | None
    patch: int


def apply(root: nn.Module, config: DiffusionConfig) -> dict[str, Any]:
    """Patch the chosen blocks; report their number and the model class."""
    name = _model_name(root)
    model = MODELS[name]
    table = _table(root)
    chosen = config.blocks if config.blocks is not None else tuple(range(len(table)))
    bad = [i for i in chosen if i >= len(table)]
    if bad:
        raise ValueError(f"blocks: index {bad[0]} out of range; this model has {len(table)} blocks")
    if config.merge_crossattn and not model.cross_attention:
        raise ValueError(
            f"merge_crossattn applies to PixArt (cross-attention to text), not {name}: its "
            "text enters through joint attention (merge_attn) or adaLN conditioning"
        )
    picked = []
    for i in chosen:
        block, spans_of, prefix = table[i]
        spans = tuple((n, s) for n, s in spans_of(config).items() if getattr(block, n, None))
        if spans:
            picked.append((block, BlockSpec(config, i, spans, prefix=prefix)))
    if not picked:
        raise ValueError(
            f"blocks={list(chosen)} with merge_attn={config.merge_attn}, merge_mlp="
            f"{config.merge_mlp}: no sublayer of the selected blocks runs on merged tokens"
        )
    params = list(inspect.signature(type(root).forward).parameters)[1:]
    where = _Where(
        params.index("timestep"),
        params.index("img_ids") if model.ids else None,
        int(getattr(root.config, "patch_size", 1) or 1),
    )
    patch(root, picked, functools.partial(_enter, where))
    return {"num_blocks": len(picked), "model": name}


def remove(root: nn.Module) -> None:
    unpatch(root)


def _arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name)


def _enter(where: _Where, root: nn.Module, args: tuple, kwargs: dict) -> None:
    """The transformer's forward pre-hook: a call, with its grid and timestep."""
    if where.ids is not None:
        grid = functools.partial(_ids_grid, _arg(args, kwargs, where.ids, "img_ids"))
    else:
        x = _arg(args, kwargs, 0, "hidden_states")
        hw = (int(x.shape[-2]) // where.patch, int(x.shape[-1]) // where.patch)
        grid = functools.partial(_latent_grid, hw)
    enter_call(root, Call(grid, _arg(args, kwargs, where.timestep, "timestep")))


def _latent_grid(hw: tuple[int, int], n: int, downsample: int) -> tuple[int, int]:
    if hw[0] * hw[1] != n:
        raise ValueError(
            f"method='tome_sd': the {n} image tokens of a block are not the {hw[0]}x{hw[1]} "
            "grid of this call's latents"
        )
    return hw


def _ids_grid(ids: Tensor | None, n: int, downsample: int) -> tuple[int, int]:
    """``(h, w)`` of Flux's ``img_ids`` ``(N, 3)`` / ``(1, N, 3)`` (rows, columns in columns 1
    and 2), which must be one raster grid. Their values are read once per ``img_ids`` tensor
    (kept on it); where they cannot be read (``meta``, ``torch.compile``) the grid is the
    square one (``meta``: the most square factorisation; compiled: checked on the device)."""
    ids = ids[0] if ids is not None and ids.dim() == 3 else ids
    if ids is None or ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 3:
        raise ValueError(
            f"method='tome_sd' needs img_ids (N, 3) for the {n} image tokens to find their grid"
        )
    if ids.is_meta:
        h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        return h, n // h
    if torch.compiler.is_compiling():
        side = torch.sym_int(torch.sym_sqrt(n) + 0.5)  # also for a dynamic token count
        if side * side != n:
            raise ValueError(
                f"method='tome_sd' under torch.compile reads Flux's grid from the token count "
                f"(img_ids cannot be read in a graph): {n} tokens are not a square grid; run "
                "eagerly or use another method"
            )
        torch._assert_async(_is_raster(ids, side))
        return side, side
    cached = vars(ids).get("_atc_grid")
    if cached is None or cached[0] != ids._version:
        cached = (ids._version, _raster_grid(ids, n))
        ids._atc_grid = cached
    return cached[1]


def _is_raster(ids: Tensor, w: int) -> Tensor:
    """A 0-d bool tensor: ``ids`` rows and columns number the tokens in raster order."""
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    rows, cols = rows - rows.min(), cols - cols.min()
    return (rows * w + cols == torch.arange(ids.shape[0], device=ids.device)).all()


def _raster_grid(ids: Tensor, n: int) -> tuple[int, int]:
    cols = ids[:, 2].round().long()
    w = int(cols.max() - cols.min()) + 1
    if n % w or not bool(_is_raster(ids, w)):
        raise ValueError(
            "method='tome_sd': img_ids are not one raster grid of image tokens (e.g. extra "
            "reference-image tokens); use another method, which needs no grid"
        )
    return n // w, w
