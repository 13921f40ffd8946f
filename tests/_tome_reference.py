"""An independent, straightforward re-statement of ToMe's published algorithm (Bolya et al.,
ICLR 2023, ``tome/merge.py`` and ``tome/patch/timm.py``), used to check ``method="tome"``.

Nothing here imports atc_patch: the forward passes below run a timm or torchvision ViT's own
submodules by hand with ToMe's bipartite soft matching, size-weighted merging and
proportional attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def bipartite_soft_matching(
    metric: Tensor, r: int, class_token: bool = False, distill_token: bool = False
) -> Callable[[Tensor, str], Tensor]:
    """ToMe's matching: ``metric`` ``(B, N, C)`` -> ``merge(x, mode)`` removing ``r`` tokens."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted average."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, size: Tensor | None) -> Tensor:
    """``(B, H, N, D)`` explicit softmax attention with ToMe's proportional attention."""
    attn = (q @ k.transpose(-2, -1)) * scale
    if size is not None:
        attn = attn + size.log()[:, None, None, :, 0]
    return attn.softmax(dim=-1) @ v


def timm_vit_forward(
    model, x: Tensor, rs: list[int], class_token: bool, distill_token: bool = False
) -> Tensor:
    """A timm ``VisionTransformer`` (no LayerScale/qk-norm) run as ToMe's patch runs it;
    average pooling weighs each token by its size, as ToMe's MAE patch (``tome/patch/mae.py``)
    pools."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = None
    for blk, r in zip(model.blocks, rs):
        attn = blk.attn
        h = blk.norm1(x)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = _attend(q, k, v, attn.scale, size).transpose(1, 2).reshape(b, n, c)
        x = x + attn.proj(out)
        if r > 0:
            merge = bipartite_soft_matching(k.mean(1), r, class_token, distill_token)
            x, size = merge_wavg(merge, x, size)
        x = x + blk.mlp(blk.norm2(x))
    x = model.norm(x)
    if size is None or model.global_pool != "avg":
        return model.forward_head(x)
    p = model.num_prefix_tokens
    x = (x[:, p:] * size[:, p:]).sum(dim=1) / size[:, p:].sum(dim=1)
    return model.head(model.fc_norm(x))


def torchvision_vit_forward(model, x: Tensor, rs: list[int]) -> Tensor:
    """A torchvision ``VisionTransformer`` run as ToMe's patch would run it."""
    x = model._process_input(x)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + model.encoder.pos_embedding
    size = None
    for blk, r in zip(model.encoder.layers, rs):
        mha = blk.self_attention
        h = blk.ln_1(x)
        b, n, c = h.shape
        heads = mha.num_heads
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        out = _attend(q, k, v, (c // heads) ** -0.5, size).transpose(1, 2).reshape(b, n, c)
        x = x + mha.out_proj(out)
        if r > 0:
            merge = bipartite_soft_matching(k.mean(1), r, class_token=True)
            x, size = merge_wavg(merge, x, size)
        x = x + blk.mlp(blk.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0])
