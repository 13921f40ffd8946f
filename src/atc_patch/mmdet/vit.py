"""Plain ViT blocks for the ViT-Adapter, able to merge tokens between attention and MLP.

Parameter names follow timm's ``VisionTransformer`` (``norm1``, ``attn.qkv``, ``attn.proj``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``), so DeiT/ViT checkpoints load into ``blocks.*`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..kernel.plan import MergePlan

Reducer = Callable[[Tensor], MergePlan | None]
"""Maps a block's keys ``(B, T, C)`` to a merge plan (``None``: keep every token)."""


class DropPath(nn.Module):
    """Stochastic depth: drop whole residual branches per sample while training."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention that also returns its keys, the clustering metric."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Attend over ``x`` ``(B, T, C)``.

        Args:
            x: tokens ``(B, T, C)``.
            size: ``(B, T, 1)`` tokens behind each token; adds ``log(size)`` to the logits
                (ToMe's proportional attention). ``None`` for plain attention.

        Returns:
            ``(out, keys)``: ``(B, T, C)`` attention output and ``(B, T, C / heads)`` keys
            averaged over heads.
        """
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, C / heads)
        bias = None if size is None else size.log().to(q.dtype).view(b, 1, 1, t)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        return self.proj(out.transpose(1, 2).reshape(b, t, c)), k.mean(1)


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; optionally merges tokens after attention (as ToMe/ATC)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, size: Tensor | None = None, reduce: Reducer | None = None
    ) -> tuple[Tensor, Tensor | None, MergePlan | None]:
        """Run the block on ``x`` ``(B, T, C)``.

        Args:
            x: tokens ``(B, T, C)``.
            size: ``(B, T, 1)`` tokens behind each token (proportional attention and weighted
                merging), or ``None``.
            reduce: called with the attention keys; a returned plan merges ``T -> T'`` tokens
                (size-weighted) between the attention and the MLP.

        Returns:
            ``(x, size, plan)``: ``(B, T', C)`` tokens, their ``(B, T', 1)`` sizes (``None`` if
            ``size`` was ``None`` and nothing merged) and the plan applied (or ``None``).
        """
        y, keys = self.attn(self.norm1(x), size)
        x = x + self.drop_path(self.drop(y))
        plan = reduce(keys) if reduce is not None else None
        if plan is not None:
            x, size = plan.merge_wavg(x, size)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, size, plan
