"""ViT-Adapter building blocks (Chen et al., "Vision Transformer Adapter for Dense Predictions").

* :class:`SpatialPriorModule`: a small conv stem giving ``c1`` (stride 4) and ``c2, c3, c4``
  (strides 8, 16, 32) features with the ViT's width.
* :class:`Injector`: ViT tokens (stride 16) attend to ``c2..c4`` with multi-scale deformable
  attention and add the result, scaled by a learnable ``gamma``.
* :class:`Extractor`: ``c2..c4`` attend to the ViT tokens, then a depth-wise conv FFN.
* :class:`InteractionBlock`: one injector + extractor pair (plus two extra extractors on the
  last one), wrapped around a group of ViT blocks by :class:`~.vit_adapter.ViTAdapter`.

Deformable attention is ``mmcv.ops.MultiScaleDeformableAttention`` (mmcv 2.x); on CPU it runs
its pure-PyTorch path. Unlike the reference ``MSDeformAttn`` it adds its query as a residual,
so :func:`deform_attn` passes a zero ``identity`` to get the attention output alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from mmcv.cnn import build_norm_layer
from mmcv.ops import MultiScaleDeformableAttention
from torch import Tensor, nn

from .vit import DropPath

Shape = tuple[int, int]


class DeformInputs(NamedTuple):
    """Sampling inputs of one deformable attention: queries' reference points and value levels.

    Attributes:
        reference_points: ``(1, Nq, L, 2)`` normalised ``(x, y)`` query positions in ``[0, 1]``.
        spatial_shapes: ``(L, 2)`` int64 ``(h, w)`` of each value level.
        level_start_index: ``(L,)`` int64 offset of each level in the flattened values.
    """

    reference_points: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor


def _reference_points(shapes: list[Shape], levels: int, device: torch.device) -> Tensor:
    """Cell-centre points of ``shapes`` (flattened, concatenated): ``(1, N, L, 2)``."""
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    ref = torch.cat(points, 0)
    return ref[None, :, None, :].expand(1, ref.shape[0], levels, 2)


def _levels(shapes: list[Shape], device: torch.device) -> tuple[Tensor, Tensor]:
    spatial = torch.as_tensor(shapes, dtype=torch.long, device=device)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    return spatial, start


def deform_inputs(
    grid: Shape, levels: list[Shape], device: torch.device
) -> tuple[DeformInputs, DeformInputs]:
    """Deformable-attention inputs of the injector and of the extractor.

    Args:
        grid: ``(h, w)`` of the ViT token grid (stride 16).
        levels: ``(h, w)`` of ``c2, c3, c4`` (strides 8, 16, 32).

    Returns:
        ``(injector, extractor)``: the injector queries the grid and reads the three levels;
        the extractor queries the three levels and reads the grid.
    """
    spatial, start = _levels(levels, device)
    injector = DeformInputs(_reference_points([grid], len(levels), device), spatial, start)
    spatial, start = _levels([grid], device)
    extractor = DeformInputs(_reference_points(levels, 1, device), spatial, start)
    return injector, extractor


def deform_attn(
    attn: MultiScaleDeformableAttention, query: Tensor, value: Tensor, inputs: DeformInputs
) -> Tensor:
    """Deformable attention output ``(B, Nq, C)`` of ``query`` over ``value`` ``(B, Nv, C)``."""
    b = query.shape[0]
    ref = inputs.reference_points.expand(b, -1, -1, -1)
    return attn(
        query,
        value=value,
        identity=torch.zeros_like(query),
        reference_points=ref,
        spatial_shapes=inputs.spatial_shapes,
        level_start_index=inputs.level_start_index,
    )


def _msda(dim: int, heads: int, levels: int, points: int, ratio: float) -> nn.Module:
    return MultiScaleDeformableAttention(
        embed_dims=dim,
        num_heads=heads,
        num_levels=levels,
        num_points=points,
        dropout=0.0,
        batch_first=True,
        value_proj_ratio=ratio,
    )


class SpatialPriorModule(nn.Module):
    """Conv stem: image ``(B, 3, H, W)`` -> ``c1`` map and ``c2, c3, c4`` token sequences."""

    def __init__(
        self, inplanes: int = 64, embed_dim: int = 384, norm_cfg: dict | None = None
    ) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type="BN")

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                build_norm_layer(norm_cfg, cout)[1],
                nn.ReLU(inplace=True),
            ]

        self.stem = nn.Sequential(
            *conv(3, inplanes, 2), *conv(inplanes, inplanes, 1), *conv(inplanes, inplanes, 1),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        self.conv2 = nn.Sequential(*conv(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``c1`` ``(B, D, H/4, W/4)`` and ``c2, c3, c4`` ``(B, h_i * w_i, D)``."""
        c1 = self.stem(img)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        flat = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3))]
        return self.fc1(c1), flat[0], flat[1], self.fc4(c4).flatten(2).transpose(1, 2)


class ConvFFN(nn.Module):
    """FFN with a 3x3 depth-wise conv over each of the three ``c2..c4`` maps."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, levels: list[Shape]) -> Tensor:
        """``x`` ``(B, sum h_i * w_i, D)`` -> same shape; ``levels`` are the ``(h_i, w_i)``."""
        x = self.fc1(x)
        b, _, c = x.shape
        parts = x.split([h * w for h, w in levels], dim=1)
        parts = [
            self.dwconv(p.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            for p, (h, w) in zip(parts, levels)
        ]
        x = self.drop(self.act(torch.cat(parts, 1)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT tokens ``(B, N, D)`` += ``gamma`` * deformable attention over ``c2..c4``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 3,
        deform_ratio: float = 1.0,
        init_values: float = 0.0,
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _msda(dim, num_heads, n_levels, n_points, deform_ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query: Tensor, feat: Tensor, inputs: DeformInputs) -> Tensor:
        """``query`` ``(B, h * w, D)`` on the full grid, ``feat`` ``(B, sum h_i * w_i, D)``."""
        attn = deform_attn(self.attn, self.query_norm(query), self.feat_norm(feat), inputs)
        return query + self.gamma * attn


class Extractor(nn.Module):
    """``c2..c4`` ``(B, Nc, D)`` += deformable attention over the ViT tokens, then a conv FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        deform_ratio: float = 1.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _msda(dim, num_heads, 1, n_points, deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop) if with_cffn else None
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6) if with_cffn else None
        self.drop_path = DropPath(drop_path)

    def forward(
        self, query: Tensor, feat: Tensor, inputs: DeformInputs, levels: list[Shape]
    ) -> Tensor:
        """``query`` ``(B, sum h_i * w_i, D)``; ``feat`` ``(B, h * w, D)`` on the full grid."""
        query = query + deform_attn(self.attn, self.query_norm(query), self.feat_norm(feat), inputs)
        if self.ffn is not None:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), levels))
        return query


class InteractionBlock(nn.Module):
    """The injector and extractor(s) around one group of ViT blocks."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        init_values: float = 0.0,
        deform_ratio: float = 1.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop: float = 0.0,
        drop_path: float = 0.0,
        extra_extractor: bool = False,
    ) -> None:
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, 3, deform_ratio, init_values)
        ext = dict(
            dim=dim,
            num_heads=num_heads,
            n_points=n_points,
            deform_ratio=deform_ratio,
            with_cffn=with_cffn,
            cffn_ratio=cffn_ratio,
            drop=drop,
            drop_path=drop_path,
        )
        self.extractor = Extractor(**ext)
        self.extra_extractors = (
            nn.ModuleList([Extractor(**ext) for _ in range(2)]) if extra_extractor else None
        )

    def extract(
        self, c: Tensor, x_grid: Tensor, inputs: DeformInputs, levels: list[Shape]
    ) -> Tensor:
        """Update ``c`` ``(B, Nc, D)`` from the ViT tokens on the full grid ``(B, h * w, D)``."""
        c = self.extractor(c, x_grid, inputs, levels)
        for extractor in self.extra_extractors or ():
            c = extractor(c, x_grid, inputs, levels)
        return c
