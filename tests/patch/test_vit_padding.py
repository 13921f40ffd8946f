"""Padding masks keep protecting padded tokens once tokens merge, for every method.

The bottom half of an 8 x 8 patch grid is hidden by the caller's attention mask (timm's
``attn_mask``, transformers' ``attention_mask``): a key hidden from every query is padding.
Unpatched, changing only the hidden pixels leaves the class token exactly as it was; patched
with a reducing schedule it must too (padding never merges into a visible token, and how the
visible tokens are partitioned does not depend on the padding).
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers as T

import atc_patch
from atc_patch.patch.vit import key_padding

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("atc", "tome", "kmedoids", "dpcknn")
N = 1 + 64  # class token + 8 x 8 patches of 4 px


def _pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """Two image batches that differ only in the bottom half (the padded patches)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    x2 = x.clone()
    x2[:, :, 16:] = 5 * torch.randn(2, 3, 16, 32, generator=gen)
    return x, x2


def _timm() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=4
    ).eval()


def _transformers() -> torch.nn.Module:
    cfg = T.ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=4, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return T.ViTModel(cfg, add_pooling_layer=False).eval()


def _timm_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    visible = torch.ones(N, dtype=torch.bool)
    visible[1 + 32 :] = False
    return model.forward_features(x, attn_mask=visible[None, :].expand(N, N))


def _transformers_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(2, N, dtype=torch.long)
    mask[:, 1 + 32 :] = 0
    return model(x, attention_mask=mask).last_hidden_state


FAMILIES = {"timm": (_timm, _timm_tokens), "transformers": (_transformers, _transformers_tokens)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_padded_pixels_never_reach_the_class_token(family, method):
    build, tokens = FAMILIES[family]
    model = build()
    x, x2 = _pixels()
    assert torch.equal(tokens(model, x)[:, 0], tokens(model, x2)[:, 0])  # unpatched
    atc_patch.apply_patch(model, method, r=8)
    out, out2 = tokens(model, x), tokens(model, x2)
    assert out.shape[1] == N - 4 * 8  # merging is on
    assert torch.equal(out[:, 0], out2[:, 0])


def test_key_padding_is_the_keys_hidden_from_every_query():
    visible = torch.tensor([True, True, False, True])
    square = visible[None, :].expand(4, 4).clone()
    square[2, 2] = True  # a query may see itself: still visible to one query, not padding
    assert key_padding(None, 2) is None
    assert key_padding(square, 2).tolist() == [[True, True, True, True]] * 2
    assert key_padding(visible[None, :].expand(4, 4), 2).tolist() == [visible.tolist()] * 2
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~visible, torch.finfo(torch.float32).min)
    assert key_padding(additive, 2).tolist() == [visible.tolist()] * 2
    per_head = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    per_head[1, :, :, 0] = False
    assert key_padding(per_head, 2).tolist() == [[True] * 4, [False, True, True, True]]
