"""The options of the diffusion families: one meaning in both (``DiffusionConfig``), checked
before the model is touched, an unreachable ``ratio`` warns with what is kept, a setting that
cannot reduce raises."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import atc_patch
from atc_patch.patch.diffusion import core
from atc_patch.testing import transformer_inputs, unet_inputs

from ._models import model_of

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs_of(model, kind: str, h: int, w: int) -> dict:
    """UNet: ``h x w`` latents; transformers: an ``h x w`` grid of image tokens."""
    if kind == "tiny-sd":
        return unet_inputs(model, batch=2, height=h, width=w)
    return transformer_inputs(model, batch=2, height=h, width=w)


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def first_attention(model) -> torch.nn.Module:
    """The first patched block's image self-attention."""
    if hasattr(model, "down_blocks"):
        return model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    return model.transformer_blocks[0].attn


def tokens_at_to_q(model, inputs) -> int:
    seen = []
    handle = first_attention(model).to_q.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[0] * a[0].shape[1])
    )
    try:
        run(model, inputs)
    finally:
        handle.remove()
    return sum(seen) // 2  # per sample (Flux runs its merged attention once per sample)


# ---------------------------------------------------------------------------------------------
# what cannot reduce raises, what cannot be reached warns
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux", "tiny-sd3"])
def test_tome_sd_with_1x1_windows_raises(kind):
    model = model_of(kind)
    with pytest.raises(ValueError, match="sx=sy=1 merges nothing"):
        atc_patch.apply_patch(model, method="tome_sd", sx=1, sy=1)
    assert atc_patch.patch_settings(model) is None
    atc_patch.apply_patch(model, method="tome_sd", sx=1, sy=2)  # 2-token windows merge


@pytest.mark.parametrize(
    "kind,method,opts,n,kept",
    [
        ("tiny-sd", "tome", {}, 384, 192),
        ("tiny-sd", "tome_sd", {}, 384, 96),
        ("tiny-sd", "tome_sd", dict(sx=1, sy=2), 384, 192),
        ("tiny-flux", "tome", {}, 64, 32),
        ("tiny-flux", "tome_sd", {}, 64, 16),
        ("tiny-sd3", "tome_sd", {}, 64, 16),
    ],
)
def test_a_ratio_beyond_the_method_cap_warns_once_with_what_is_kept(kind, method, opts, n, kept):
    model = model_of(kind)
    inputs = inputs_of(model, kind, *((16, 24) if kind == "tiny-sd" else (8, 8)))
    r = int(n * 0.9)
    atc_patch.apply_patch(model, method=method, ratio=0.9, **opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per message
        assert tokens_at_to_q(model, inputs) == kept
        run(model, inputs)  # every patched block, two calls: one warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert re.search(rf"asks for {r} of a block's {n} tokens.*removes {n - kept} and keeps "
                     rf"{kept}", messages[0])  # fmt: skip
    atc_patch.apply_patch(model, method="atc", ratio=0.9)  # ATC reaches any ratio
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokens_at_to_q(model, inputs) == n - r


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_tome_sd_window_larger_than_a_block_grid_warns_and_runs_unmerged(kind):
    model = model_of(kind)
    inputs = inputs_of(model, kind, 16, 24) if kind == "tiny-sd" else inputs_of(model, kind, 8, 6)
    ref = run(model, inputs)
    grid = "16x24" if kind == "tiny-sd" else "8x6"
    atc_patch.apply_patch(model, method="tome_sd", sx=32, sy=32, seed=0)
    with pytest.warns(UserWarning, match=rf"{grid} token grid, smaller than one sy x sx = 32x32"):
        assert torch.equal(run(model, inputs), ref)  # nothing merged anywhere
    if kind == "tiny-sd":  # stride 1 (16x24) merges, stride 2 (8x12) cannot
        atc_patch.apply_patch(model, method="tome_sd", sx=4, sy=12, max_downsample=2, seed=0)
        with pytest.warns(UserWarning, match=r"downsample 2 has a 8x12 token grid"):
            assert not torch.allclose(run(model, inputs), ref, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# shared options mean the same in both families
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit"])
def test_backend_and_metric_dim_are_taken_reported_and_used(kind, monkeypatch):
    model = model_of(kind)
    seen = []
    kernel = core.cluster_tokens

    def recording(metric, r, method="atc", **kw):
        seen.append((metric.shape[-1], kw.get("backend")))
        return kernel(metric, r, method, **kw)

    monkeypatch.setattr(core, "cluster_tokens", recording)
    atc_patch.apply_patch(model, method="atc", ratio=0.5, backend="torch", metric_dim=4)
    settings = atc_patch.patch_settings(model)
    assert settings["backend"] == "torch" and settings["metric_dim"] == 4
    run(model, inputs_of(model, kind, 8, 8))
    assert seen and all(s == (4, "torch") for s in seen)
    with pytest.raises(ValueError, match="backend applies to method='atc' only"):
        atc_patch.apply_patch(model, method="tome", backend="triton")


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
@pytest.mark.parametrize(
    "option",
    [dict(sx=4), dict(sy=1), dict(use_rand=False), dict(seed=3), dict(generator=torch.Generator())],
    ids=lambda o: next(iter(o)),
)
def test_tome_sd_only_options_are_rejected_by_other_methods(kind, method, option):
    model = model_of(kind)
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"\['{name}'\].*valid options: .*tome_sd"):
        atc_patch.apply_patch(model, method=method, ratio=0.5, **option)
    assert atc_patch.patch_settings(model) is None
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, **option)  # tome_sd takes them


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
@pytest.mark.parametrize("name,value", [("r", 8), ("keep_rate", 0.5), ("reduction_loc", [1])])
def test_vit_options_raise_naming_the_diffusion_option(kind, name, value):
    hint = {"reduction_loc": "max_downsample"}.get(name, "ratio")
    pattern = rf"\['{name}'\] .* valid options: \[.*'ratio'.*\] \({name}: diffusion models .*{hint}"
    with pytest.raises(ValueError, match=pattern):
        atc_patch.apply_patch(model_of(kind), method="atc", **{name: value})


@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-sd3", "tiny-dit"])
def test_merge_crossattn_needs_cross_attention(kind):
    model = model_of(kind)
    with pytest.raises(ValueError, match="merge_crossattn applies to PixArt"):
        atc_patch.apply_patch(model, method="atc", merge_crossattn=True)
    assert atc_patch.patch_settings(model) is None
    atc_patch.apply_patch(model_of("tiny-pixart"), method="atc", merge_crossattn=True)


def test_integral_numbers_of_any_type_are_accepted_and_reported_as_used():
    unet = model_of("tiny-sd")
    atc_patch.apply_patch(
        unet, method="tome_sd", ratio=np.float32(0.25), max_downsample=np.int64(2), sx=2.0,
        sy=np.int32(1), seed=np.int64(3), use_rand=True, merge_mlp=False,
    )  # fmt: skip
    s = atc_patch.patch_settings(unet)
    expected = dict(ratio=0.25, max_downsample=2, sx=2, sy=1, seed=3, use_rand=True)
    assert {k: s[k] for k in expected} == expected
    assert all(type(s[k]) is type(v) for k, v in expected.items())
    assert s["generator"] is None and s["num_blocks"] == 6
    atc_patch.apply_patch(unet, method="atc", ratio=0.5)
    s = atc_patch.patch_settings(unet)  # only what ATC uses
    assert "sx" not in s and "seed" not in s and "blocks" not in s
    assert s["linkage"] == "average" and s["max_downsample"] == 1


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
@pytest.mark.parametrize(
    "bad",
    [
        dict(sx=2.5), dict(sx="2"), dict(sx=True), dict(sx=0), dict(ratio="0.5"),
        dict(ratio=True), dict(ratio=float("nan")), dict(ratio=1.0), dict(ratio=-0.1),
        dict(use_rand=1), dict(merge_mlp="yes"), dict(seed=1.5), dict(seed="1"),
        dict(seed=1, generator=torch.Generator()), dict(generator=5), dict(metric_dim=0),
        dict(linkage="single"), dict(merge_attn=False),
    ],
)  # fmt: skip
def test_bad_values_raise_value_error_and_change_nothing(kind, bad):
    model = model_of(kind)
    with pytest.raises(ValueError):
        atc_patch.apply_patch(model, method="tome_sd", **bad)
    assert atc_patch.patch_settings(model) is None


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_none_means_the_default(kind):
    model = model_of(kind)
    atc_patch.apply_patch(model, method="tome", linkage=None, seed=None, metric_dim=None)
    assert atc_patch.patch_settings(model)["metric_dim"] is None


def test_a_duplicate_block_leaves_flux_untouched():
    """issue 20, item 1 (d01): ``blocks=(1, 1)`` patched block 1 and then raised, for good."""
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux", 6, 4)
    ref = run(model, inputs)
    with pytest.raises(ValueError, match="twice"):
        atc_patch.apply_patch(model, method="atc", ratio=0.5, blocks=(1, 1))
    assert atc_patch.patch_settings(model) is None
    assert torch.equal(run(model, inputs), ref)
    atc_patch.apply_patch(model, method="atc", ratio=0.5)  # valid settings work
    assert atc_patch.patch_settings(model)["num_blocks"] == 4


def test_an_unsupported_diffusers_transformer_is_a_type_error():
    import diffusers

    other = diffusers.Transformer2DModel(
        num_attention_heads=1, attention_head_dim=8, in_channels=32
    )
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        atc_patch.apply_patch(other)
