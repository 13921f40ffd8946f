"""The ``unet`` family: diffusers UNets in the SD 1.x and SDXL layouts (tiny, random init, CPU).

What the contract test does not cover: which blocks are patched at which resolution, parity
with the ``tomesd`` package, what diffusers passes to a block, processors, feed-forward
chunking, empty batches, pipelines, the example and the benchmark.
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch

import atc_patch
from atc_patch.patch.diffusion.unet import transformer_blocks
from atc_patch.testing import build_tiny_pipeline, unet_inputs

from ._models import model_of

pytestmark = pytest.mark.usefixtures("one_thread")


def unet_of(kind: str = "tiny-sd") -> torch.nn.Module:
    return model_of(kind)


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


class RecordingProcessor(torch.nn.Module):
    """A custom processor with its own ``cross_attention_kwargs`` argument (``gain``); records
    how many query tokens it is given and scales the output by ``gain``."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()
        self.tokens: list[int] = []

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
        gain: float = 1.0,
    ):  # fmt: skip
        self.tokens.append(hidden_states.shape[1])
        self.last = hidden_states
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out * gain


# ---------------------------------------------------------------------------------------------
# which blocks
# ---------------------------------------------------------------------------------------------
def test_default_patches_the_full_resolution_blocks_of_sd():
    unet = unet_of()
    atc_patch.apply_patch(unet, "atc", ratio=0.5)
    settings = atc_patch.patch_settings(unet)
    assert settings["family"] == "unet" and settings["max_downsample"] == 1
    assert settings["num_blocks"] == 3  # tiny-sd: 1 down + 2 up blocks at full resolution
    assert "blocks" not in settings  # a UNet chooses blocks with max_downsample
    atc_patch.apply_patch(unet, "atc", ratio=0.5, max_downsample=2)
    assert atc_patch.patch_settings(unet)["num_blocks"] == 6


def test_sdxl_default_reduces_where_attention_exists():
    unet = unet_of("tiny-sdxl")
    assert min(d for d, _ in transformer_blocks(unet)) == 2  # no attention at full resolution
    inputs = unet_inputs(unet, batch=2, height=16, width=24)
    ref = run(unet, inputs)
    recorder = RecordingProcessor()
    first = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    procs = unet.attn_processors
    unet.set_attn_processor({k: (recorder if k == first else v) for k, v in procs.items()})
    atc_patch.apply_patch(unet, method="tome_sd", ratio=0.5)
    settings = atc_patch.patch_settings(unet)
    assert settings["max_downsample"] == 2 and settings["num_blocks"] > 0
    out = run(unet, inputs)
    assert recorder.tokens == [8 * 12 - 48]
    assert not torch.allclose(out, ref, atol=1e-4)
    with pytest.raises(ValueError, match="selects no transformer block"):
        atc_patch.apply_patch(unet, method="atc", max_downsample=1)
    assert atc_patch.patch_settings(unet) == settings  # the old patch stays


# ---------------------------------------------------------------------------------------------
# parity with tomesd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [dict(), dict(merge_crossattn=True, merge_mlp=True, max_downsample=2, sx=2, sy=1)],
)
def test_tome_sd_matches_tomesd_package(flags):
    import tomesd

    ours = unet_of()
    theirs = copy.deepcopy(ours)
    inputs = unet_inputs(ours, batch=2, height=16, width=24)  # non-square latents
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        ref = ours(*args).sample
        atc_patch.apply_patch(ours, method="tome_sd", ratio=0.5, use_rand=False, **flags)
        tomesd.apply_patch(theirs, ratio=0.5, use_rand=False, **flags)
        expected = theirs(*args).sample  # tomesd's size hook reads args[0]: call positionally
        got = ours(*args).sample
    assert not torch.allclose(expected, ref, atol=1e-3)  # tomesd did merge
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_kernel_matches_tomesd_random2d_with_same_generator():
    """The merge functions on the same tensors, random destinations from equal generators,
    and the same destinations given as ``pick``."""
    from tomesd import merge

    x = torch.randn(2, 12 * 10, 16, generator=torch.Generator().manual_seed(0))
    for no_rand in (True, False):
        m, _ = merge.bipartite_soft_matching_random2d(
            x, w=10, h=12, sx=2, sy=2, r=50, no_rand=no_rand,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        plan = atc_patch.cluster_tokens(
            x, 50, "tome_sd", h=12, w=10, no_rand=no_rand,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        torch.testing.assert_close(plan.merge(x), m(x))
    pick = torch.randint(4, (6, 5), generator=torch.Generator().manual_seed(5))
    m, _ = merge.bipartite_soft_matching_random2d(
        x, w=10, h=12, sx=2, sy=2, r=50, generator=torch.Generator().manual_seed(5)
    )
    plan = atc_patch.cluster_tokens(x, 50, "tome_sd", h=12, w=10, pick=pick)
    torch.testing.assert_close(plan.merge(x), m(x))


# ---------------------------------------------------------------------------------------------
# what diffusers throws at the block
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["atc", "tome_sd"])
@pytest.mark.parametrize("batch,h,w", [(3, 12, 20), (1, 15, 17), (2, 9, 16)])
def test_keyword_call_odd_batches_nonsquare_and_odd_latents(method, batch, h, w):
    unet = unet_of()
    inputs = unet_inputs(unet, batch=batch, height=h, width=w)
    atc_patch.apply_patch(
        unet, method=method, ratio=0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True
    )
    out = run(unet, inputs)  # keyword call
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("masked", [False, True])
def test_block_with_every_argument_matches_manual_merge(masked):
    """A patched block called on its own with every argument diffusers passes (incl.
    added_cond_kwargs and a self-attention key mask) equals the original block whose
    self-attention is wrapped in merge/unmerge by hand (the key bias merged by max)."""
    unet = unet_of()
    block = transformer_blocks(unet)[0][1]
    original = copy.deepcopy(block)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, block.norm1.normalized_shape[0], generator=g)
    hidden = (torch.rand(2, 1, 64, generator=g) < 0.3).float() * -10000.0
    kwargs = dict(
        attention_mask=hidden if masked else None,
        encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        encoder_attention_mask=torch.zeros(2, 1, 5),
        timestep=torch.tensor([10, 10]),
        cross_attention_kwargs={},
        class_labels=None,
        added_cond_kwargs={"text_embeds": torch.randn(2, 8), "time_ids": torch.randn(2, 6)},
    )
    atc_patch.apply_patch(unet, method="atc", linkage="complete", ratio=0.5)
    with torch.no_grad():
        got = block(x, **kwargs)
        plan = atc_patch.cluster_tokens(x, 32, "atc", linkage="complete")
        attn_forward = original.attn1.forward

        def by_hand(hs, *a, **k):
            if k.get("attention_mask") is not None:
                merged = plan.merge(k["attention_mask"].transpose(1, 2), mode="amax")
                k = dict(k, attention_mask=merged.transpose(1, 2))
            return plan.unmerge(attn_forward(plan.merge(hs), *a, **k))

        original.attn1.forward = by_hand
        expected = original(x, **kwargs)
        torch.testing.assert_close(got, expected)
        if masked:  # the mask matters
            assert not torch.allclose(expected, original(x, **dict(kwargs, attention_mask=None)))


def test_processors_untouched_custom_and_ip_adapter_keep_working():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.utils import logging as diffusers_logging

    unet = unet_of()
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = RecordingProcessor()
        else:
            width = 32 if name.startswith(("down_blocks.0", "up_blocks.2")) else 64
            procs[name] = IPAdapterAttnProcessor2_0(width, cross_attention_dim=32, num_tokens=(4,))
    unet.set_attn_processor(dict(procs))  # diffusers pops from the dict it is given
    before = dict(unet.attn_processors)
    inputs = unet_inputs(unet, batch=2, seq_len=8 + 4)  # 8 text + 4 image tokens
    inputs["cross_attention_kwargs"] = {"gain": 0.5}  # the IP-Adapter processors ignore it
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = run(unet, inputs)
            atc_patch.apply_patch(unet, method="atc", ratio=0.5, merge_crossattn=True)
            for p in procs.values():
                if isinstance(p, RecordingProcessor):
                    p.tokens.clear()
            out = run(unet, inputs)
            assert {k: id(v) for k, v in unet.attn_processors.items()} == {
                k: id(v) for k, v in before.items()
            }
            full = procs["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]
            half = procs["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"]
            assert full.tokens == [128]  # 16x16 latents, ratio 0.5
            assert half.tokens == [64]  # 8x8, not patched at max_downsample=1
            assert torch.isfinite(out).all() and not torch.equal(out, ref)
            atc_patch.remove_patch(unet)
            assert torch.equal(run(unet, inputs), ref)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def test_cfg_batch_halves_are_independent_for_atc():
    """ATC clusters each sample on its own: the cond/uncond halves of a CFG batch do not mix."""
    unet = unet_of()
    inputs = unet_inputs(unet, batch=2)
    atc_patch.apply_patch(unet, method="atc", ratio=0.5)
    both = run(unet, inputs)
    first = run(unet, {k: v[:1] if k != "timestep" else v for k, v in inputs.items()})
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["atc", "tome_sd", "tome", "kmedoids", "dpcknn"])
def test_empty_batch_gives_the_unpatched_empty_result(method):
    """diffusers' default SDPA processor itself cannot run B=0 (``view(0, -1, ...)``), the
    classic ``AttnProcessor`` can: with it, the patched UNet returns what the unpatched does."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = unet_of()
    unet.set_attn_processor(AttnProcessor())
    inputs = unet_inputs(unet, batch=0, height=16, width=24)
    ref = run(unet, inputs)
    assert ref.shape == (0, 4, 16, 24)
    atc_patch.apply_patch(unet, method=method, ratio=0.5, max_downsample=4)
    out = run(unet, inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype


# ---------------------------------------------------------------------------------------------
# feed-forward chunking (set_chunk_feed_forward)
# ---------------------------------------------------------------------------------------------
def test_docs_name_the_chunking_api_diffusers_has():
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    text = (Path(__file__).resolve().parents[2] / "docs" / "diffusers.md").read_text()
    assert "unet.enable_forward_chunking()" not in text  # named only as what is missing
    assert not hasattr(UNet2DConditionModel, "enable_forward_chunking")
    assert "set_chunk_feed_forward(" in text
    assert hasattr(BasicTransformerBlock, "set_chunk_feed_forward")


def test_feed_forward_chunking_with_the_patch_as_documented():
    """Chunking keeps results with merge_mlp=False; with merge_mlp=True a chunked MLP cannot
    follow the merge: it warns and the MLP runs unmerged (= merge_mlp=False)."""
    unet = unet_of()
    inputs = unet_inputs(unet, batch=2, height=16, width=24)

    def chunked(on: bool) -> None:
        for d, b in transformer_blocks(unet):  # the patched ones: 384 tokens at stride 1
            if d == 1:
                b.set_chunk_feed_forward(96 if on else None, 1)

    atc_patch.apply_patch(unet, method="atc", ratio=0.5)
    plain = run(unet, inputs)
    chunked(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(run(unet, inputs), plain, rtol=1e-5, atol=1e-6)
    chunked(False)
    atc_patch.apply_patch(unet, method="atc", ratio=0.5, merge_mlp=True)
    merged_mlp = run(unet, inputs)
    assert not torch.allclose(merged_mlp, plain, atol=1e-4)
    chunked(True)
    with pytest.warns(UserWarning, match="feed-forward chunking with merge_mlp=True"):
        torch.testing.assert_close(run(unet, inputs), plain, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# pipelines, saving
# ---------------------------------------------------------------------------------------------
def test_pipeline_patch_remove_bit_identical():
    pipe = build_tiny_pipeline()

    def generate():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return pipe("a cat", num_inference_steps=2, height=64, width=96, generator=g,
                        output_type="pt").images  # fmt: skip

    ref = generate()
    atc_patch.apply_patch(pipe, method="atc", linkage="single", ratio=0.5)
    out = generate()
    assert out.shape == ref.shape and not torch.equal(out, ref)
    atc_patch.remove_patch(pipe)
    assert torch.equal(generate(), ref)
    atc_patch.apply_patch(pipe, method="tome_sd", ratio=0.5)
    assert not torch.equal(generate(), ref)
    atc_patch.remove_patch(pipe.unet)  # through the UNet: the pipeline's patch goes too
    assert atc_patch.patch_settings(pipe) is None
    assert torch.equal(generate(), ref)


def test_save_pretrained_of_a_patched_unet_loads_unpatched(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = unet_of()
    inputs = unet_inputs(unet, batch=2)
    ref = run(unet, inputs)
    atc_patch.apply_patch(unet, method="atc", ratio=0.5)
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert atc_patch.patch_settings(loaded) is None
    assert torch.equal(run(loaded, inputs), ref)


# ---------------------------------------------------------------------------------------------
# ATC at 4096 tokens (512 px): exact, same kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_atc_at_4096_tokens_is_exact_and_uses_the_kernel():
    from conftest import same_partition
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import pdist

    unet = unet_of().double()
    block = transformer_blocks(unet)[0][1]
    recorder = RecordingProcessor()
    block.attn1.set_processor(recorder)
    captured = {}
    block.attn1.register_forward_pre_hook(lambda m, a: captured.setdefault("q", a[0]))
    x = torch.randn(1, 4096, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    atc_patch.apply_patch(unet, method="atc", linkage="average", ratio=0.5)
    with torch.no_grad():
        block(x, encoder_hidden_states=torch.randn(1, 4, 32, dtype=torch.float64))
    assert recorder.tokens == [2048]
    plan = atc_patch.cluster_tokens(x, 2048, "atc", linkage="average")
    z = linkage(pdist(x[0].numpy(), "cosine"), method="average")
    assert same_partition(plan.labels[0], cut_tree(z, n_clusters=2048)[:, 0])
    # the block merged with exactly this plan: attn1's processor got plan.merge(attn1 input)
    torch.testing.assert_close(recorder.last, plan.merge(captured["q"]))


# ---------------------------------------------------------------------------------------------
# the example and the benchmark run end to end (tiny, offline)
# ---------------------------------------------------------------------------------------------
def _load_script(relpath: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["tome_sd", "atc"])
def test_sd_generate_example_runs_offline(tmp_path, capsys, method):
    example = _load_script("examples/sd_generate.py")
    example.main(["--merge_fn_str", method, "--linkage", "single", "--reduction_ratio", "0.4",
                  "--steps", "2", "--height", "64", "--width", "96", "--prompt", "a cat",
                  "--images_per_prompt", "2", "--output_dir", str(tmp_path)])  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000.png", "00001.png"]
    out = capsys.readouterr().out
    assert f"'method': '{method}'" in out and "s per image" in out


def test_sd_speed_benchmark_smoke(tmp_path):
    bench = _load_script("benchmarks/sd_speed.py")
    bench.main(["--unet", "tiny-sd", "--latent", "8", "--ratios", "0.5", "--warmup", "0",
                "--methods", "unpatched", "tomesd", "tome_sd", "atc-average",
                "--out_dir", str(tmp_path)])  # fmt: skip
    rows = (tmp_path / "sd_speed.csv").read_text().splitlines()
    assert rows[0].startswith("method,ratio,step_s,peak_mb") and len(rows) == 5
