"""The diffusers items of the "demanding new user" issue: gradient checkpointing, pipeline vs
UNet records, settings that merge nothing, option validation, empty batches, pickling and the
documented feed-forward chunking. Tiny random-init UNets, CPU, nothing downloaded."""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import atc_patch
from atc_patch.patch.diffusers import METHOD_OPTIONS, METHODS, transformer_blocks
from atc_patch.testing import build_tiny_pipeline, build_unet, unet_inputs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "diffusers.md"
_UNET = build_unet("tiny-sd")


# Small models gain nothing from intra-op threads; on a shared CPU they lose 10x to them.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


def fresh_unet() -> torch.nn.Module:
    return copy.deepcopy(_UNET)


def method_opts(method: str) -> dict:
    return {"atc": dict(linkage="complete"), "tome_sd": dict(seed=5)}.get(method, {})


def sample(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def is_patched(unet) -> bool:
    return any(type(m).__name__.startswith("ATC") for m in unet.modules())


# ---------------------------------------------------------------------------------------------
# 1. gradient checkpointing: the recomputation sees the first pass's grid and random draws
# ---------------------------------------------------------------------------------------------
def _grads(unet, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    unet.zero_grad(set_to_none=True)
    loss = unet(**inputs).sample.square().mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)], ids=["16x16", "16x24"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method, hw):
    unet = fresh_unet().train()
    atc_patch.apply_patch(unet, method=method, ratio=0.5, max_downsample=2, **method_opts(method))
    inputs = unet_inputs(unet, batch=2, height=hw[0], width=hw[1])
    block = transformer_blocks(unet)[0][1]
    calls = []
    block.register_forward_pre_hook(lambda m, a: calls.append(1))

    loss, ref = _grads(unet, inputs)
    assert len(calls) == 1
    unet.enable_gradient_checkpointing()
    loss_ckpt, got = _grads(unet, inputs)
    assert len(calls) == 3  # first pass + the recomputation in backward()
    assert torch.equal(loss_ckpt, loss)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    unet.disable_gradient_checkpointing()
    atc_patch.remove_patch(unet)
    assert not is_patched(unet)
    assert not any(
        type(vars(m).get("_gradient_checkpointing_func")).__name__ == "CheckpointWithCallState"
        for m in unet.modules()
    )


def test_gradient_checkpointing_with_a_user_generator_leaves_it_as_an_unchecked_run_does():
    unet = fresh_unet().train()
    g = torch.Generator().manual_seed(11)
    atc_patch.apply_patch(unet, method="tome_sd", ratio=0.5, generator=g, max_downsample=2)
    inputs = unet_inputs(unet, batch=2, height=16, width=24)
    _, ref = _grads(unet, inputs)
    after_ref = g.get_state()
    g.manual_seed(11)
    unet.enable_gradient_checkpointing()  # after patching, as a training script would
    _, got = _grads(unet, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(g.get_state(), after_ref)  # backward() drew nothing from g


def test_custom_reentrant_checkpoint_function_replays_too():
    from torch.utils.checkpoint import checkpoint

    def reentrant(module, *args):  # calls the module itself, in the reentrant variant
        return checkpoint(module, *args, use_reentrant=True)

    unet = fresh_unet().train()
    atc_patch.apply_patch(unet, method="tome_sd", ratio=0.5, seed=2)
    inputs = unet_inputs(unet, batch=2, height=16, width=24)
    inputs["sample"].requires_grad_(True)  # the reentrant variant needs a grad-requiring input
    _, ref = _grads(unet, inputs)
    unet.enable_gradient_checkpointing(reentrant)
    _, got = _grads(unet, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 2. a pipeline and its UNet: patch either, read or remove from either
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_on", ["pipe", "unet"])
@pytest.mark.parametrize("remove_on", ["pipe", "unet"])
def test_pipeline_and_unet_records_agree_whichever_was_patched(pipe, patch_on, remove_on):
    target = {"pipe": pipe, "unet": pipe.unet}
    atc_patch.apply_patch(target[patch_on], method="tome_sd", ratio=0.4, seed=1)
    settings = atc_patch.patch_settings(pipe)
    assert settings is not None and settings == atc_patch.patch_settings(pipe.unet)
    assert settings["method"] == "tome_sd" and settings["ratio"] == 0.4
    atc_patch.apply_patch(target[remove_on], method="atc", ratio=0.3)  # re-patch from either
    assert atc_patch.patch_settings(pipe)["method"] == "atc"
    assert atc_patch.patch_settings(pipe.unet)["method"] == "atc"
    atc_patch.remove_patch(target[remove_on])
    assert atc_patch.patch_settings(pipe) is None and atc_patch.patch_settings(pipe.unet) is None
    assert not is_patched(pipe.unet)
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# 3. settings that merge nothing, options of another method
# ---------------------------------------------------------------------------------------------
def test_tome_sd_with_1x1_windows_raises():
    with pytest.raises(ValueError, match="sx=sy=1 merges nothing"):
        atc_patch.apply_patch(fresh_unet(), method="tome_sd", sx=1, sy=1)
    atc_patch.apply_patch(fresh_unet(), method="tome_sd", sx=1, sy=2)  # 2-token windows merge


def test_tome_sd_window_larger_than_a_block_grid_warns_and_runs_unmerged():
    unet = fresh_unet()
    inputs = unet_inputs(unet, batch=2, height=16, width=24)
    ref = sample(unet, inputs)
    atc_patch.apply_patch(unet, method="tome_sd", sx=4, sy=12, max_downsample=2, seed=0)
    with pytest.warns(UserWarning, match=r"downsample 2 has a 8x12 token grid, smaller than"):
        out = sample(unet, inputs)  # stride 1 (16x24) merges, stride 2 (8x12) cannot
    assert not torch.allclose(out, ref, atol=1e-4)
    atc_patch.apply_patch(unet, method="tome_sd", sx=32, sy=32, seed=0)
    with pytest.warns(UserWarning, match=r"16x24 token grid, smaller than one sy x sx = 32x32"):
        assert torch.equal(sample(unet, inputs), ref)  # nothing merged anywhere


@pytest.mark.parametrize(
    "method,opts,kept",
    [("tome", {}, 192), ("tome_sd", dict(seed=0), 96), ("tome_sd", dict(sx=1, sy=2), 192)],
)
def test_a_ratio_beyond_the_method_cap_warns_with_what_is_removed(method, opts, kept):
    unet = fresh_unet()
    block = transformer_blocks(unet)[0][1]
    seen = []
    block.attn1.to_q.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    inputs = unet_inputs(unet, batch=2, height=16, width=24)  # 384 tokens at stride 1
    atc_patch.apply_patch(unet, method=method, ratio=0.9, **opts)
    with pytest.warns(UserWarning, match=rf"asks for 345 of a block's 384 tokens.*{384 - kept}"):
        sample(unet, inputs)
    assert seen == [kept]
    atc_patch.apply_patch(unet, method="atc", ratio=0.9)  # ATC reaches any ratio
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(unet, inputs)
    assert seen == [384 - 345]


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
@pytest.mark.parametrize(
    "option",
    [
        dict(sx=4),
        dict(sy=1),
        dict(use_rand=False),
        dict(seed=3),
        dict(generator=torch.Generator()),
    ],  # fmt: skip
    ids=lambda o: next(iter(o)),
)
def test_tome_sd_only_options_are_rejected_by_other_methods(method, option):
    unet = fresh_unet()
    name = next(iter(option))
    valid = re.escape(str(sorted(METHOD_OPTIONS[method])))
    with pytest.raises(ValueError, match=rf"\['{name}'\].*valid options: {valid}.*tome_sd"):
        atc_patch.apply_patch(unet, method=method, ratio=0.5, **option)
    assert atc_patch.patch_settings(unet) is None and not is_patched(unet)


# ---------------------------------------------------------------------------------------------
# 4. unknown options and numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [("r", 8), ("keep_rate", 0.5), ("reduction_loc", [1])])
def test_vit_options_raise_value_error_naming_the_diffusers_option(name, value):
    hint = {"reduction_loc": "max_downsample"}.get(name, "ratio")
    pattern = rf"\['{name}'\] .* valid options: \[.*'ratio'.*\] \({name}: diffusion models .*{hint}"
    with pytest.raises(ValueError, match=pattern):
        atc_patch.apply_patch(fresh_unet(), method="atc", **{name: value})


def test_integral_numbers_of_any_type_are_accepted_and_reported_as_used():
    unet = fresh_unet()
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
    assert set(s) == {*METHOD_OPTIONS["atc"], "num_blocks", "method", "family"}
    assert s["linkage"] == "average" and s["max_downsample"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        dict(sx=2.5),
        dict(sx="2"),
        dict(sx=True),
        dict(max_downsample=1.5),
        dict(max_downsample="2"),
        dict(ratio="0.5"),
        dict(ratio=True),
        dict(ratio=float("nan")),
        dict(use_rand=1),
        dict(merge_mlp="yes"),
        dict(seed=1.5),
        dict(seed="1"),
        dict(seed=1, generator=torch.Generator()),
        dict(generator=5),
    ],  # fmt: skip
)
def test_bad_values_raise_value_error(bad):
    unet = fresh_unet()
    with pytest.raises(ValueError):
        atc_patch.apply_patch(unet, method="tome_sd", **bad)
    assert atc_patch.patch_settings(unet) is None and not is_patched(unet)


def test_none_means_the_default():
    unet = fresh_unet()
    atc_patch.apply_patch(unet, method="tome", linkage=None, seed=None, max_downsample=None)
    assert atc_patch.patch_settings(unet)["max_downsample"] == 1


# ---------------------------------------------------------------------------------------------
# 5. an empty batch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_gives_the_unpatched_empty_result(method):
    """diffusers' default SDPA processor itself cannot run B=0 (``view(0, -1, ...)``), the
    classic ``AttnProcessor`` can: with it, the patched UNet returns what the unpatched does."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = fresh_unet()
    unet.set_attn_processor(AttnProcessor())
    inputs = unet_inputs(unet, batch=0, height=16, width=24)
    ref = sample(unet, inputs)
    assert ref.shape == (0, 4, 16, 24)
    atc_patch.apply_patch(unet, method=method, ratio=0.5, max_downsample=4)
    out = sample(unet, inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype


# ---------------------------------------------------------------------------------------------
# 6. pickle, torch.save, deepcopy
# ---------------------------------------------------------------------------------------------
def _roundtrips(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return {
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buf, weights_only=False),
        "deepcopy": copy.deepcopy(model),
    }


@pytest.mark.parametrize("method", ["atc", "tome_sd"])
def test_patched_unet_and_pipeline_unet_roundtrip_into_working_patched_models(pipe, method):
    atc_patch.apply_patch(pipe, method=method, ratio=0.5, max_downsample=2, **method_opts(method))
    try:
        inputs = unet_inputs(pipe.unet, batch=2, height=16, width=24)
        expected = sample(pipe.unet, inputs)
        settings = atc_patch.patch_settings(pipe)
        for how, copied in [*_roundtrips(pipe.unet).items(), ("pipe deepcopy", None)]:
            unet = copy.deepcopy(pipe).unet if copied is None else copied
            assert atc_patch.patch_settings(unet) == settings, how
            assert torch.equal(sample(unet, inputs), expected), how
            own = {id(m) for m in unet.modules()}  # stored module references are the copy's
            assert all(id(m) in own for m in vars(unet)["_atc_diffusers_ckpt_owners"]), how
            atc_patch.remove_patch(unet)  # the copy's own hooks and classes
            assert not is_patched(unet) and not unet._forward_pre_hooks, how
            assert not torch.allclose(sample(unet, inputs), expected, atol=1e-4), how
            assert torch.equal(sample(pipe.unet, inputs), expected), how  # original untouched
            assert atc_patch.patch_settings(pipe) == settings, how
    finally:
        atc_patch.remove_patch(pipe)


def test_save_pretrained_of_a_patched_unet_loads_unpatched(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = fresh_unet()
    inputs = unet_inputs(unet, batch=2)
    ref = sample(unet, inputs)
    atc_patch.apply_patch(unet, method="atc", ratio=0.5)
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert atc_patch.patch_settings(loaded) is None and not is_patched(loaded)
    assert torch.equal(sample(loaded, inputs), ref)


def test_deepcopy_does_not_share_the_user_generator():
    unet = fresh_unet()
    g = torch.Generator().manual_seed(4)
    atc_patch.apply_patch(unet, method="tome_sd", ratio=0.5, generator=g)
    twin = copy.deepcopy(unet)
    inputs = unet_inputs(unet, batch=2)
    state = g.get_state()
    a = sample(twin, inputs)
    assert torch.equal(g.get_state(), state)  # the copy draws from its own generator
    assert torch.equal(sample(unet, inputs), a)  # ... which started where g was


# ---------------------------------------------------------------------------------------------
# 7. docs: feed-forward chunking is per block (set_chunk_feed_forward)
# ---------------------------------------------------------------------------------------------
def test_docs_name_the_chunking_api_diffusers_has():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    text = DOCS.read_text()
    assert "unet.enable_forward_chunking()" not in text  # named only as what is missing
    assert not hasattr(UNet2DConditionModel, "enable_forward_chunking")
    assert "set_chunk_feed_forward(" in text
    assert hasattr(BasicTransformerBlock, "set_chunk_feed_forward")


def test_feed_forward_chunking_with_the_patch_as_documented():
    """Chunking keeps results with merge_mlp=False; with merge_mlp=True a chunked MLP cannot
    follow the merge: it warns and the MLP runs unmerged (= merge_mlp=False)."""
    unet = fresh_unet()
    inputs = unet_inputs(unet, batch=2, height=16, width=24)

    def chunked(on: bool) -> None:
        for d, b in transformer_blocks(unet):  # the patched ones: 384 tokens at stride 1
            if d == 1:
                b.set_chunk_feed_forward(96 if on else None, 1)

    atc_patch.apply_patch(unet, method="atc", ratio=0.5)
    plain = sample(unet, inputs)
    chunked(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(sample(unet, inputs), plain, rtol=1e-5, atol=1e-6)
    chunked(False)
    atc_patch.apply_patch(unet, method="atc", ratio=0.5, merge_mlp=True)
    merged_mlp = sample(unet, inputs)
    assert not torch.allclose(merged_mlp, plain, atol=1e-4)
    chunked(True)
    with pytest.warns(UserWarning, match="merge_mlp=True with feed-forward chunking"):
        torch.testing.assert_close(sample(unet, inputs), plain, rtol=1e-5, atol=1e-6)
