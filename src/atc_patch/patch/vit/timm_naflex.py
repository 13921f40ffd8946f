"""timm ``NaFlexVit`` (SigLIP2 NaFlex, RADIO, and any ViT or Eva made with ``use_naflex=True``):
variable patch counts per image, padded to one length (:data:`~.timm.MODELS` entry).

A NaFlex batch is a dict (or ``patches, patch_coord, patch_valid``): ``patches (B, L, P*P*C)``,
``patch_coord (B, L, 2)``, ``patch_valid (B, L)``; the rest of a sample's ``L`` slots is
padding, hidden from every query by the model's own attention mask. The padding is the token
state's ``valid`` (:class:`~atc_patch.patch.vit.Tokens`): a padded patch never merges with a
real one (the kernel's mask), so changing only padded patches changes nothing a real token
sees. The model's ``forward``, ``forward_features`` (the dict ``{"patches", "patch_valid"}``
with the validity of the reduced tokens) and ``forward_intermediates`` (every intermediate
unmerged to the ``L`` slots, aligned with the input ``patch_valid``) run the blocks with the
mask, the validity and the rotary tables following every merge. Blocks: ``Block`` (the
VisionTransformer entry's) or ``EvaBlock`` (:mod:`.timm_eva`)::

    model = timm.create_model("naflexvit_so400m_patch16_siglip")
    apply_patch(model, "atc", r=16)
    logits = model({"patches": ..., "patch_coord": ..., "patch_valid": ...})
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._override import original, override
from . import Tokens, ViTPatch, check_traceable, key_padding, refuse_script
from .timm import (
    check_blocks,
    check_format,
    forward_head,
    intermediates_out,
    patch_blocks,
    run_blocks,
    take_indices,
    vit_blocks,
)
from .timm_eva import eva_blocks


def patch_model(vit: nn.Module, patch: ViTPatch) -> None:
    """The ``NaFlexVit`` entry: checks, then the model's and its blocks' overrides."""
    table = {**vit_blocks(), **eva_blocks()}
    check_blocks(vit, table)
    patch.check(len(vit.blocks), _num_patches(vit) + patch.protected)
    override(vit, "forward", _forward, patch)
    override(vit, "forward_features", _forward_features, patch)
    override(vit, "forward_intermediates", _forward_intermediates, patch)
    override(vit, "__prepare_scriptable__", refuse_script, patch)
    patch_blocks(vit, patch, table, bool(vit.rope is not None and vit.rope_is_mixed))


def _num_patches(vit: nn.Module) -> int:
    """Patches at the model's own size: its position grid, else its default input size."""
    grid = vit.embeds.pos_embed_grid_size
    if grid is None:
        size = getattr(vit, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-2:]
        grid = vit.embeds.dynamic_feat_size(tuple(size))
    return int(grid[0] * grid[1])


# --- the model ---------------------------------------------------------------------------------


def _forward(
    vit: nn.Module,
    patch: ViTPatch,
    x: Tensor | dict[str, Tensor],
    patch_coord: Tensor | None = None,
    patch_valid: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """timm's forward (images or a NaFlex batch); the pooling weighs each token by its size
    and leaves padding out (:func:`~.timm.forward_head`)."""
    if patch.is_passthrough:
        return original(vit, "forward")(x, patch_coord, patch_valid, attn_mask)
    patches, patch_coord, patch_valid, attn_mask = _inputs(x, patch_coord, patch_valid, attn_mask)
    tokens, _, _ = _run(vit, patch, patches, patch_coord, patch_valid, attn_mask)
    x = vit.norm(tokens.x)
    valid = _patch_valid(vit, tokens)
    return forward_head(vit, patch, x, tokens, lambda y: vit.forward_head(y, patch_valid=valid))


def _forward_features(
    vit: nn.Module,
    patch: ViTPatch,
    patches: Tensor,
    patch_coord: Tensor | None = None,
    patch_valid: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor | dict[str, Tensor]:
    """``(B, N', C)`` normed reduced tokens; for a NaFlex batch (``patch_coord`` given) the
    dict ``{"patches": tokens, "patch_valid": (B, N' - prefix) validity of each token}``."""
    if patch.is_passthrough:
        return original(vit, "forward_features")(patches, patch_coord, patch_valid, attn_mask)
    tokens, _, _ = _run(vit, patch, patches, patch_coord, patch_valid, attn_mask)
    x = vit.norm(tokens.x)
    if patch_coord is None:
        return x
    return {"patches": x, "patch_valid": _patch_valid(vit, tokens)}


def _forward_intermediates(
    vit: nn.Module, patch: ViTPatch, x: Tensor | dict[str, Tensor],
    indices: int | list[int] | None = None, return_prefix_tokens: bool = False,
    norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
    intermediates_only: bool = False, output_dict: bool = False,
    patch_coord: Tensor | None = None, patch_valid: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Any:  # fmt: skip
    """timm's ``NaFlexVit.forward_intermediates`` with token reduction (same arguments and
    outputs): every intermediate unmerged to the input's ``L`` slots (images: the ``H x W``
    grid), the final features the reduced ``(B, N', C)`` tokens. NaFlex batches: ``"NLC"``
    only, as timm; with ``output_dict`` the ``patch_valid`` of the ``L`` slots."""
    if patch.is_passthrough:
        return original(vit, "forward_intermediates")(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only,
            output_dict, patch_coord, patch_valid, attn_mask,
        )  # fmt: skip
    naflex = isinstance(x, dict)
    check_format(output_fmt, ("NLC",) if naflex else ("NCHW", "NLC"))
    take, last = take_indices(vit, indices, stop_early)
    if naflex:
        patches, patch_coord, patch_valid, attn_mask = _inputs(x, None, patch_valid, attn_mask)
    else:
        patches = x
    tokens, taken, patch_valid = _run(
        vit, patch, patches, patch_coord, patch_valid, attn_mask, take, last
    )
    hw = None if naflex else vit.embeds.dynamic_feat_size(tuple(x.shape[-2:]))
    extra = {} if patch_valid is None else {"patch_valid": patch_valid}
    return intermediates_out(
        vit, tokens, taken, hw, output_fmt, norm, return_prefix_tokens, intermediates_only,
        output_dict, extra,
    )  # fmt: skip


def _inputs(
    x: Any, patch_coord: Tensor | None, patch_valid: Tensor | None, attn_mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(patches, patch_coord, patch_valid, attn_mask)`` of timm's forward arguments (a NaFlex
    dict's entries take priority)."""
    if not isinstance(x, dict):
        return x, patch_coord, patch_valid, attn_mask
    return (
        x["patches"],
        x.get("patch_coord", patch_coord),
        x.get("patch_valid", patch_valid),
        x.get("attn_mask", attn_mask),
    )


def _run(
    vit: nn.Module,
    patch: ViTPatch,
    patches: Tensor,
    patch_coord: Tensor | None,
    patch_valid: Tensor | None,
    attn_mask: Tensor | None,
    take: set[int] | None = None,
    last: int | None = None,
) -> tuple[Tokens, list[Tensor], Tensor | None]:
    """Embed (timm's own ``_forward_embeds``: padding mask, rotary tables, patch dropout) and
    run the blocks. Returns the final tokens, the taken unmerged intermediates and the input
    ``patch_valid`` (after patch dropout)."""
    from timm.layers import apply_keep_indices_nlc

    check_traceable(patch, patches)
    embeds = vit._forward_embeds(patches, patch_coord, patch_valid, attn_mask)
    x, rope, mask = embeds["patches"], embeds["rope_embeds"], embeds["attn_mask"]
    if rope is not None and vit.rope_is_mixed:  # one table per block
        keep = embeds["keep_indices"]
        rope = tuple(
            t if keep is None else apply_keep_indices_nlc(x, t, keep, patch_coord is not None)
            for t in rope
        )
    tokens = Tokens(x, attn_mask=mask, valid=key_padding(mask, x.shape[0]), pos=rope)
    tokens, taken = run_blocks(vit, patch, tokens, take=take, last=last)
    return tokens, taken, embeds["patch_valid"]


def _patch_valid(vit: nn.Module, tokens: Tokens) -> Tensor | None:
    """``(B, N' - prefix)`` validity of the reduced patch tokens (``None``: no padding)."""
    return None if tokens.valid is None else tokens.valid[:, vit.num_prefix_tokens :]
