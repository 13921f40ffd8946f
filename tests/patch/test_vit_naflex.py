"""NaFlex ViTs: timm ``NaFlexVit`` and transformers ``Siglip2VisionModel``, whose batches hold
images of different patch counts padded to one length.

Padded patches never merge into real ones: changing only the padded patches changes nothing
visible (the logits or pooled output, every real token, every intermediate at a real slot), for
every method, as in the unpatched model; every cluster is all real or all padding; the outputs
that carry a validity (``forward_features``' ``patch_valid``, ``forward_intermediates``') say
which is which. The family contract is ``test_contract.py``'s.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import transformers as T

import atc_patch
from atc_patch.patch.vit import last_source

from ._cases import naflex_batch, siglip2_batch

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("atc", "tome", "kmedoids", "dpcknn")
# name -> (timm model, overrides): attention pooling and no prefix (SigLIP2), rotary EvaBlocks
# with class + 4 registers and average pooling (DINOv3), a register token, a key-only mask.
NAFLEX = {
    "siglip": ("naflexvit_base_patch16_siglip", {}),
    "dinov3_rope": ("vit_base_patch16_dinov3", {"use_naflex": True, "init_values": 1.0}),
    "reg1_gap": ("naflexvit_so150m2_patch16_reg1_gap", {}),
    "key_only_mask": ("naflexvit_base_patch16_gap", {"use_key_only_attn_mask": True}),
}
# Three images: 12, 8 and 4 real patches of 16 slots.
SIZES = ((32, 24), (16, 32), (16, 16))


def make(key: str) -> torch.nn.Module:
    name, kw = NAFLEX[key]
    torch.manual_seed(0)
    return timm.create_model(
        name, pretrained=False, depth=3, embed_dim=32, num_heads=2, patch_size=8,
        num_classes=10, **kw,
    ).eval()  # fmt: skip


def _with_new_padding(batch: dict, key: str) -> dict:
    """``batch`` with other values in the padded slots of ``batch[key]`` only."""
    other = copy.deepcopy(batch)
    valid = other["patch_valid" if key == "patches" else "pixel_attention_mask"].bool()
    values = other[key]
    gen = torch.Generator().manual_seed(7)
    values[~valid] = 5 * torch.randn(int((~valid).sum()), values.shape[-1], generator=gen)
    return other


def _visible(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The real ``(B, N, C)`` tokens (``valid`` ``(B, N)``), padding zeroed."""
    return tokens * valid[..., None]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", list(NAFLEX))
@torch.no_grad()
def test_padded_patches_change_nothing_visible(key, method):
    model = make(key)
    p = model.num_prefix_tokens
    x = naflex_batch(SIZES)
    x2 = _with_new_padding(x, "patches")
    assert torch.equal(model(x), model(x2))  # unpatched
    atc_patch.apply_patch(model, method, r=3, trace_source=True)
    out, out2 = model(x), model(x2)
    assert torch.equal(out, out2)
    f, f2 = (
        model.forward_features(b["patches"], b["patch_coord"], b["patch_valid"]) for b in (x, x2)
    )
    assert f["patches"].shape[1] == p + 16 - 9 and torch.equal(f["patch_valid"], f2["patch_valid"])
    valid = torch.cat([torch.ones(len(SIZES), p, dtype=torch.bool), f["patch_valid"]], 1)
    assert torch.equal(_visible(f["patches"], valid), _visible(f2["patches"], valid))
    # every cluster is all real or all padding; the real tokens were merged first
    source = last_source(model)
    real = torch.cat([torch.ones(len(SIZES), p), x["patch_valid"].float()], 1)
    members_real = source @ real[..., None]
    assert torch.equal(members_real[..., 0] > 0, valid)
    assert torch.equal(members_real[..., 0], source.sum(-1) * valid)
    inter, inter2 = (
        model.forward_intermediates(b, output_fmt="NLC", intermediates_only=True) for b in (x, x2)
    )
    for a, b in zip(inter, inter2):
        assert a.shape[1] == 16
        assert torch.equal(_visible(a, x["patch_valid"]), _visible(b, x["patch_valid"]))


@torch.no_grad()
def test_naflex_forward_intermediates_keep_timm_outputs():
    model = make("dinov3_rope")
    x = naflex_batch(SIZES)
    ref = model.forward_intermediates(
        x, output_fmt="NLC", output_dict=True, return_prefix_tokens=True
    )
    atc_patch.apply_patch(model, "atc", r=3)
    out = model.forward_intermediates(
        x, output_fmt="NLC", output_dict=True, return_prefix_tokens=True
    )
    assert list(out) == list(ref)
    assert torch.equal(out["patch_valid"], x["patch_valid"])
    for k in ("image_intermediates", "image_intermediates_prefix"):
        assert [t.shape for t in out[k]] == [t.shape for t in ref[k]]
    assert out["image_features"].shape[1] == ref["image_features"].shape[1] - 9
    with pytest.raises(ValueError, match="NLC"):
        model.forward_intermediates(x, output_fmt="NCHW")
    images = torch.randn(2, 3, 32, 24)  # images: the NCHW grid
    assert model.forward_intermediates(images, intermediates_only=True)[0].shape == (2, 32, 4, 3)


@torch.no_grad()
def test_zero_reduction_is_exact_with_padding():
    for key in NAFLEX:
        model = make(key)
        x = naflex_batch(SIZES)
        ref = model(x), model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        atc_patch.apply_patch(model, "atc", r=0, trace_source=True)
        out = model(x), model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert torch.equal(out[0], ref[0]) and all(map(torch.equal, out[1], ref[1]))


# --- transformers SigLIP2 ----------------------------------------------------------------------


def _siglip2(impl: str) -> torch.nn.Module:
    cfg = T.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_patches=16, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return T.Siglip2VisionModel._from_config(cfg, attn_implementation=impl).eval()


SIGLIP2_SIZES = ((4, 3), (2, 4), (2, 2))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@torch.no_grad()
def test_siglip2_padded_patches_change_nothing_visible(impl, method):
    model = _siglip2(impl)
    x = siglip2_batch(SIGLIP2_SIZES)
    x2 = _with_new_padding(x, "pixel_values")
    valid = x["pixel_attention_mask"].bool()
    ref, ref2 = model(**x), model(**x2)
    assert torch.equal(ref.pooler_output, ref2.pooler_output)  # unpatched
    atc_patch.apply_patch(model, method, r=3, trace_source=True)
    out, out2 = model(**x), model(**x2)
    assert out.last_hidden_state.shape[1] == 16 - 9
    assert torch.equal(out.pooler_output, out2.pooler_output)
    source = last_source(model)
    merged_valid = (source @ valid[..., None].float())[..., 0] > 0
    assert torch.equal(
        _visible(out.last_hidden_state, merged_valid),
        _visible(out2.last_hidden_state, merged_valid),
    )
    assert torch.equal((source @ (~valid)[..., None].float())[..., 0] > 0, ~merged_valid)


@torch.no_grad()
def test_siglip2_pooling_head_leaves_padding_out_and_uses_the_sizes():
    model = _siglip2("sdpa")
    x = siglip2_batch(SIGLIP2_SIZES)
    atc_patch.apply_patch(model, "atc", r=3, trace_source=True)
    out = model(**x)
    source = last_source(model)
    size = source.sum(-1)
    valid = (source @ x["pixel_attention_mask"][..., None].float())[..., 0] > 0
    head = model.head
    bias = size.log().masked_fill(~valid, -torch.inf)[:, None]
    mask = bias.repeat_interleave(head.attention.num_heads, 0)
    probe = head.probe.repeat(len(SIGLIP2_SIZES), 1, 1)
    h = head.attention(probe, out.last_hidden_state, out.last_hidden_state, attn_mask=mask)[0]
    torch.testing.assert_close(out.pooler_output, (h + head.mlp(head.layernorm(h)))[:, 0])
    # unmerge=True: the full grid again, and the head sees the original mask
    atc_patch.apply_patch(model, "atc", r=3, unmerge=True)
    full = model(**x)
    assert full.last_hidden_state.shape[1] == 16 and torch.isfinite(full.pooler_output).all()


@torch.no_grad()
def test_siglip2_without_padding():
    # nothing padded: transformers makes no mask at all, so nothing is masked
    model = _siglip2("sdpa")
    x = siglip2_batch(((4, 4), (2, 8)))
    ref = model(**x)
    atc_patch.apply_patch(model, "atc", r=0, trace_source=True)
    assert torch.equal(model(**x).pooler_output, ref.pooler_output)
    atc_patch.apply_patch(model, "tome", r=3)
    assert model(**x).last_hidden_state.shape[1] == 7


def test_siglip2_two_tower_model_and_its_classifier():
    vision = _siglip2("sdpa")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    pair = T.Siglip2Model(T.Siglip2Config(text_config=text, vision_config=vision.config.to_dict()))
    atc_patch.apply_patch(pair.eval(), "atc", r=3)
    assert atc_patch.patch_settings(pair.vision_model)["family"] == "transformers"
    with torch.no_grad():
        feats = pair.get_image_features(**siglip2_batch(SIGLIP2_SIZES))
    assert torch.isfinite(feats.pooler_output if hasattr(feats, "pooler_output") else feats).all()
    # the classifier pools the (B, L) pixel mask over the full grid: not a supported holder
    classifier = T.Siglip2ForImageClassification(pair.config)
    with pytest.raises(TypeError, match="supported"):
        atc_patch.apply_patch(classifier, "atc", r=3)
