"""``ViTAdapter``: a plain ViT with a spatial-prior adapter, four FPN-ready maps, token reduction.

Forward pass for an image ``(B, 3, H, W)`` (``H``, ``W`` multiples of 32), grid
``h, w = H / 16, W / 16``:

1. The spatial prior module gives ``c1`` (stride 4) and ``c2, c3, c4`` (strides 8, 16, 32);
   the ViT embeds ``h * w`` patch tokens (plus interpolated position embeddings).
2. For each interaction stage ``[first, last]`` of ``interaction_indexes``:

   a. **injector** - the ViT tokens are unmerged to the full ``h x w`` grid, queried against
      ``c2..c4`` with deformable attention, and merged back onto the current clusters (mean of
      each cluster's grid cells; without proportional attention merged again step by step,
      each step a plain mean, as the reference);
   b. **blocks** ``first .. last`` - a block listed in ``reduction_loc`` clusters its tokens by
      their attention keys after its attention (ATC or ToMe on the shared kernel) and merges
      each cluster size-weighted into one token before its MLP, keeping
      ``int(reduction_ratio * T)`` of its ``T`` tokens (aiming at the compounded targets when
      ToMe could not reach an earlier one, see :mod:`atc_patch.mmdet.reduction`). Merged
      tokens carry their size (proportional attention). Reductions compound across blocks and
      stages;
   c. **extractor** - ``c2..c4`` query the ViT tokens unmerged to the full grid.
3. ``c2`` is upsampled into ``c1``; the ViT tokens, unmerged to the full grid, are resized and
   added to ``c1..c4``; four norms give the outputs.

This is the setup of the ATC paper's detection experiments. With ``method=None`` (or a keep
ratio of 1.0, or an empty ``reduction_loc``) no plan is made and the forward is the plain
ViT-Adapter, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor, nn

from .adapter import InteractionBlock, SpatialPriorModule, deform_inputs
from .reduction import Reduction, TokenGrid, make_reduction
from .vit import Block, Reducer


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv: ``(B, 3, H, W)`` -> ``(B, h * w, D)``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


def _check_stages(indexes: Sequence[Sequence[int]], depth: int) -> list[tuple[int, int]]:
    stages = [tuple(int(i) for i in s) for s in indexes]
    expected_first = 0
    for s in stages:
        if len(s) != 2 or s[0] != expected_first or s[1] < s[0]:
            raise ValueError(
                "interaction_indexes must be consecutive [first, last] block ranges covering "
                f"0..{depth - 1}, e.g. [[0, 2], [3, 5], [6, 8], [9, 11]]; got {list(indexes)}"
            )
        expected_first = s[1] + 1
    if expected_first != depth:
        raise ValueError(f"interaction_indexes must end at block {depth - 1}, got {list(indexes)}")
    return stages  # type: ignore[return-value]


class ViTAdapter(BaseModule):
    """ViT-Adapter backbone for mmdet 3 with optional ATC / ToMe token reduction.

    ViT-Adapter-T: ``embed_dim=192, depth=12, num_heads=3``; -S: ``384, 12, 6`` (both with
    ``deform_num_heads=6``). Outputs four ``embed_dim``-channel maps at strides 4, 8, 16, 32.

    Args:
        pretrain_size: image size the position embeddings were trained at (14 x 14 for 224).
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT.
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (stochastic depth rises
            linearly over the blocks; the extractors use ``drop_path_rate``).
        conv_inplane: width of the spatial prior module.
        n_points, deform_num_heads, deform_ratio: deformable attention (points per head and
            level, heads, value-projection ratio).
        init_values: initial injector ``gamma``.
        interaction_indexes: ``[first, last]`` block range of each interaction stage.
        with_cffn, cffn_ratio: extractor conv FFN and its hidden ratio.
        add_vit_feature: add the ViT tokens to the output maps.
        use_extra_extractor: two extra extractors on the last stage.
        norm_cfg: mmcv norm of the spatial prior module and the output norms (the reference uses
            ``SyncBN``; ``BN`` is the default here so a single CPU process runs).
        method: ``None`` (no reduction), ``"atc"`` or ``"tome"``.
        linkage: ATC linkage, ``"single" | "complete" | "average"`` (default ``"average"``).
        reduction_loc: blocks that reduce their tokens.
        reduction_ratio: fraction of the current tokens kept at each location (one value or one
            per location).
        proportional_attn: proportional attention for merged tokens.
        keep_rate_mode: ``"target"`` (default) or ``"reference"``: what a location does after
            one whose target the method could not reach (:mod:`atc_patch.mmdet.reduction`).
        init_cfg: mmengine init config (e.g. ``dict(type='Pretrained', checkpoint=...)``).
    """

    def __init__(
        self,
        pretrain_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        init_values: float = 0.0,
        interaction_indexes: Sequence[Sequence[int]] = ((0, 2), (3, 5), (6, 8), (9, 11)),
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        add_vit_feature: bool = True,
        use_extra_extractor: bool = True,
        norm_cfg: dict | None = None,
        method: str | None = None,
        linkage: str | None = None,
        reduction_loc: Sequence[int] | None = (3, 6, 9),
        reduction_ratio: float | Sequence[float] | None = None,
        proportional_attn: bool = True,
        init_cfg: dict | None = None,
        keep_rate_mode: str = "target",
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if patch_size != 16:
            raise ValueError(f"ViTAdapter needs patch_size=16 (stride-16 tokens), got {patch_size}")
        self.stages = _check_stages(interaction_indexes, depth)
        self.interaction_indexes = [list(s) for s in self.stages]
        self.embed_dim = embed_dim
        self.depth = depth
        self.pretrain_grid = pretrain_size // patch_size
        self.add_vit_feature = add_vit_feature
        self.configure_reduction(
            method, linkage, reduction_loc, reduction_ratio, proportional_attn, keep_rate_mode
        )

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # Slot 0 is the (unused) class-token position, so DeiT/ViT checkpoints load unchanged.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)
        )

        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(conv_inplane, embed_dim, norm_cfg)
        self.interactions = nn.ModuleList(
            InteractionBlock(
                embed_dim,
                num_heads=deform_num_heads,
                n_points=n_points,
                init_values=init_values,
                deform_ratio=deform_ratio,
                with_cffn=with_cffn,
                cffn_ratio=cffn_ratio,
                drop=drop_rate,
                drop_path=drop_path_rate,
                extra_extractor=use_extra_extractor and i == len(self.stages) - 1,
            )
            for i in range(len(self.stages))
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        norm_cfg = norm_cfg or dict(type="BN")
        self.norm1, self.norm2, self.norm3, self.norm4 = (
            build_norm_layer(norm_cfg, embed_dim)[1] for _ in range(4)
        )
        self._reset_parameters()

    # ---------------------------------------------------------------- token reduction settings
    def configure_reduction(
        self,
        method: str | None = None,
        linkage: str | None = None,
        reduction_loc: Sequence[int] | None = (3, 6, 9),
        reduction_ratio: float | Sequence[float] | None = None,
        proportional_attn: bool = True,
        keep_rate_mode: str = "target",
    ) -> None:
        """Validate and set the token reduction (``ValueError`` naming valid choices)."""
        self.reduction: Reduction | None = make_reduction(
            method,
            linkage,
            reduction_loc,
            reduction_ratio,
            proportional_attn,
            self.depth,
            keep_rate_mode,
        )
        self.method = method
        self.linkage = None if self.reduction is None else self.reduction.linkage
        if self.reduction is not None:  # validated: a list of Python ints
            reduction_loc = list(self.reduction.reduction_loc)
        self.reduction_loc = reduction_loc
        self.reduction_ratio = reduction_ratio
        self.proportional_attn = proportional_attn
        self.keep_rate_mode = keep_rate_mode

    def active_reduction(self) -> Reduction | None:
        """The reduction the forward uses: the one it was built or configured with
        (:attr:`reduction`), or the one ``atc_patch.apply_patch`` set while it is patched."""
        return self.reduction

    def reduction_settings(self) -> dict[str, Any]:
        """The backbone's reduction keys as given (``method=None`` when it does not reduce);
        while patched by ``atc_patch.apply_patch``, the patch's."""
        return dict(
            method=self.method,
            linkage=self.linkage,
            reduction_loc=self.reduction_loc,
            reduction_ratio=self.reduction_ratio,
            proportional_attn=self.proportional_attn,
            keep_rate_mode=self.keep_rate_mode,
        )

    # ------------------------------------------------------------------------------- init
    def _reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.level_embed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m is not self.patch_embed.proj:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for stage in self.interactions:  # deformable attention keeps its own (grid) init
            for m in stage.modules():
                if hasattr(m, "sampling_offsets"):
                    m.init_weights()

    # ---------------------------------------------------------------------------- forward
    def _pos_embed(self, h: int, w: int) -> Tensor:
        """Position embeddings ``(1, h * w, D)`` interpolated from the pretraining grid."""
        g = self.pretrain_grid
        pos = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if (h, w) != (g, g):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    @staticmethod
    def _reducer(reduction: Reduction | None, block: int, num_patches: int) -> Reducer | None:
        """What block ``block`` calls with its keys to get its merge plan (``None``: no merge);
        ``num_patches`` is this forward's ``h * w`` grid (it sets the targets)."""
        if reduction is None or reduction.keep_ratio(block) is None:
            return None
        return partial(reduction.plan, block, num_patches=num_patches)

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Image ``(B, 3, H, W)``, ``H, W`` multiples of 32 -> four ``(B, D, H/s, W/s)`` maps,
        ``s = 4, 8, 16, 32``."""
        b, _, hi, wi = img.shape
        if hi % 32 or wi % 32:
            raise ValueError(f"ViTAdapter needs H and W divisible by 32, got {(hi, wi)}")
        levels = [(hi // 8, wi // 8), (hi // 16, wi // 16), (hi // 32, wi // 32)]
        c1, c2, c3, c4 = self.spm(img)
        c = torch.cat(
            [c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], 1
        )

        x, (h, w) = self.patch_embed(img)
        x = self.pos_drop(x + self._pos_embed(h, w))
        inject, extract = deform_inputs((h, w), levels, img.device)

        reduction = self.active_reduction()
        tokens = TokenGrid()  # per-forward state: the current tokens as clusters of the grid
        size = None  # (B, T, 1) grid cells behind each token once tokens are merged
        weighted = self.reduction is None or self.reduction.proportional_attn
        for stage, (first, last) in zip(self.interactions, self.stages):
            x = tokens.from_grid(stage.injector(tokens.to_grid(x), c, inject), weighted)
            for i in range(first, last + 1):
                x, size, plan = self.blocks[i](x, size, self._reducer(reduction, i, h * w))
                if plan is not None:
                    tokens.compose(plan)
                if reduction is not None and not reduction.proportional_attn:
                    size = None
            c = stage.extract(c, tokens.to_grid(x), extract, levels)

        c2, c3, c4 = (
            part.transpose(1, 2).reshape(b, self.embed_dim, hh, ww)
            for part, (hh, ww) in zip(c.split([hh * ww for hh, ww in levels], 1), levels)
        )
        c1 = self.up(c2) + c1
        if self.add_vit_feature:
            x3 = tokens.to_grid(x).transpose(1, 2).reshape(b, self.embed_dim, h, w)
            c1 = c1 + F.interpolate(x3, scale_factor=4, mode="bilinear", align_corners=False)
            c2 = c2 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
            c3 = c3 + x3
            c4 = c4 + F.interpolate(x3, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)
