"""The ``dit`` family: Flux, SD3, PixArt and DiT transformers (tiny, random init, CPU).

What the contract test does not cover: token counts per block, ``blocks=``, text tokens, Flux's
rotary tables and ``img_ids`` grid, ``metric_dim``, masks, processors and attention backends,
dtypes, CFG batches, pipelines, diffusers' caching hooks, the example and the benchmark.
"""

from __future__ import annotations

import pytest
import torch

import atc_patch
from atc_patch.kernel import cluster_tokens
from atc_patch.patch.diffusion.dit import transformer_blocks
from atc_patch.testing import transformer_inputs

from ._models import model_of

KINDS = ("tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit")
METHODS = [
    ("atc", {"linkage": "single"}),
    ("atc", {"linkage": "complete"}),
    ("atc", {"linkage": "average"}),
    ("tome_sd", {"seed": 3}),
    ("tome", {}),
    ("kmedoids", {}),
    ("dpcknn", {}),
]

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs_of(model, kind: str, batch: int = 2, h: int = 6, w: int = 4, **kw):
    if kind == "tiny-dit":  # diffusers' DiT un-patchifies square grids only
        w = h
    return transformer_inputs(model, batch=batch, height=h, width=w, **kw)


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def attn_modules(model) -> list[torch.nn.Module]:
    """The image self/joint attention module of every block (the one with to_q on images)."""
    return [getattr(block, "attn", None) or block.attn1 for block in transformer_blocks(model)]


def count_to_q(model, inputs) -> list[int]:
    """Tokens per sample reaching each block's image ``to_q`` in one call (Flux's merged joint
    attention runs once per sample: rows are summed over its calls)."""
    rows = {}

    def hook(m, args, out):
        rows[m] = rows.get(m, 0) + args[0].shape[0] * args[0].shape[1]

    mods = [a.to_q for a in attn_modules(model)]
    hooks = [m.register_forward_hook(hook) for m in mods]
    try:
        run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return [rows[m] // inputs["hidden_states"].shape[0] for m in mods]


def _record(module, store: list, index=None):
    def hook(m, args, kwargs, out):
        if index is None:
            store.append(args[0] if args else kwargs["hidden_states"])
        else:
            store.append(out[index])

    return module.register_forward_hook(hook, with_kwargs=True)


def _block_io(model, block, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One call's ``block`` input, its ``norm1`` output and what reaches ``attn.to_q`` (the
    rows of the merged attention's per-sample calls concatenated)."""
    x_in, normed, q_in = [], [], []
    pre = block.register_forward_pre_hook(
        lambda m, a, kw: x_in.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    hooks = [pre, _record(block.norm1, normed, index=0), _record(block.attn.to_q, q_in)]
    run(model, inputs)
    for h in hooks:
        h.remove()
    return x_in[0], normed[0], torch.cat(q_in)


# ---------------------------------------------------------------------------------------------
# token counts, blocks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_fewer_tokens_reach_the_attention_projections(kind, ratio):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    seq = inputs.get("encoder_hidden_states")
    before = count_to_q(model, inputs)
    atc_patch.apply_patch(model, method="atc", ratio=ratio)
    assert atc_patch.patch_settings(model)["num_blocks"] == len(transformer_blocks(model))
    after = count_to_q(model, inputs)
    n = 24 if kind != "tiny-dit" else 36
    r = int(n * ratio)
    # Flux single-stream blocks see [text, image]: the text part stays whole.
    text = seq.shape[1] if kind == "tiny-flux" else 0
    expected = [c - r if c in (n, n + text) else c for c in before]
    assert after == expected and after != before


def test_blocks_option_selects_blocks_and_bad_selections_raise():
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux")
    atc_patch.apply_patch(model, method="tome", ratio=0.5, blocks=[1, 3])
    assert count_to_q(model, inputs) == [24, 12, 30, 18]  # double, double, single, single
    for bad, match in (
        ([], "selects no block"),
        ([4], "out of range"),
        ([1, 1], "twice"),
    ):
        with pytest.raises(ValueError, match=match):
            atc_patch.apply_patch(model, method="tome", blocks=bad)
    with pytest.raises(ValueError, match="nothing merges"):
        atc_patch.apply_patch(model, method="tome", merge_attn=False)
    assert atc_patch.patch_settings(model)["blocks"] == (1, 3)  # the old patch stays


# ---------------------------------------------------------------------------------------------
# every method: finite outputs, odd batches, non-square grids, the MLP too, dtypes, CFG
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,opts", METHODS)
def test_every_method_is_finite_on_odd_batches_and_non_square_grids(kind, method, opts):
    model = model_of(kind)
    for batch, (h, w), mlp in ((3, (6, 4), False), (1, (5, 7), True), (2, (4, 6), True)):
        inputs = inputs_of(model, kind, batch=batch, h=h, w=w)
        ref = run(model, inputs)
        atc_patch.apply_patch(model, method=method, ratio=0.5, merge_mlp=mlp, **opts)
        out = run(model, inputs)
        atc_patch.remove_patch(model)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-sd3"])
def test_half_precision_keeps_its_dtype(kind):
    model = model_of(kind).to(torch.bfloat16)
    inputs = inputs_of(model, kind)
    atc_patch.apply_patch(model, method="atc", ratio=0.5, merge_mlp=True)
    out = run(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_cfg_batch_samples_are_reduced_independently(kind):
    """A CFG batch: each sample gets its own plan (and, on Flux, its own merged rotary
    table), so the batch equals the samples run one at a time."""
    model = model_of(kind)
    inputs = inputs_of(model, kind, batch=2)
    atc_patch.apply_patch(model, method="atc", ratio=0.5, merge_mlp=True)
    both = run(model, inputs)
    for i in range(2):
        one = {
            k: v[i : i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == 2 else v
            for k, v in inputs.items()
        }
        torch.testing.assert_close(run(model, one), both[i : i + 1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# text tokens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["atc", "tome_sd", "dpcknn"])
def test_flux_text_tokens_are_never_merged(method):
    """Double-stream: the text stream reaches add_q_proj whole and unchanged. Single-stream:
    the first T rows reaching to_q are exactly the block's normed text rows, whatever the
    image tokens are."""
    model = model_of("tiny-flux")
    atc_patch.apply_patch(model, method=method, ratio=0.75)
    double, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    for scale in (0.0, 5.0):
        inputs = inputs_of(model, "tiny-flux", batch=2)
        t = inputs["encoder_hidden_states"].shape[1]
        inputs["hidden_states"] = inputs["hidden_states"] + scale * torch.randn_like(
            inputs["hidden_states"]
        )
        ctx_in, ctx_normed, q_in, normed = [], [], [], []
        hooks = [
            _record(double.attn.add_q_proj, ctx_in),
            _record(double.norm1_context, ctx_normed, index=0),
            _record(single.attn.to_q, q_in),
            _record(single.norm, normed, index=0),
        ]
        run(model, inputs)
        for h in hooks:
            h.remove()
        ctx, q = torch.cat(ctx_in), torch.cat(q_in)  # the merged attention runs per sample
        assert ctx.shape[1] == t and torch.equal(ctx, ctx_normed[0])
        assert q.shape[1] == t + 24 - 18  # text whole, image merged
        assert torch.equal(q[:, :t], normed[0][:, :t])


def test_sd3_context_is_never_merged():
    model = model_of("tiny-sd3")
    atc_patch.apply_patch(model, method="atc", ratio=0.75, merge_mlp=True)
    inputs = inputs_of(model, "tiny-sd3")
    ctx_in, ctx_normed, img_in = [], [], []
    block = model.transformer_blocks[0]
    hooks = [
        _record(block.attn.add_q_proj, ctx_in),
        _record(block.norm1_context, ctx_normed, index=0),
        _record(block.attn.to_q, img_in),
    ]
    run(model, inputs)
    for h in hooks:
        h.remove()
    t = inputs["encoder_hidden_states"].shape[1]
    assert ctx_in[0].shape[1] == t and torch.equal(ctx_in[0], ctx_normed[0])
    assert img_in[0].shape[1] == 24 - 18


def test_pixart_cross_attention_keys_stay_text():
    model = model_of("tiny-pixart")
    atc_patch.apply_patch(model, method="atc", ratio=0.5, merge_crossattn=True)
    inputs = inputs_of(model, "tiny-pixart")
    q, k = [], []
    attn2 = model.transformer_blocks[0].attn2
    hooks = [_record(attn2.to_q, q), _record(attn2.to_k, k)]
    run(model, inputs)
    for h in hooks:
        h.remove()
    assert q[0].shape[1] == 12 and k[0].shape[1] == inputs["encoder_hidden_states"].shape[1]


# ---------------------------------------------------------------------------------------------
# tome_sd's grid, metric_dim, masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-sd3"])
def test_tome_sd_windows_lie_on_the_real_token_grid(kind):
    """The double/joint block's merged to_q input equals the kernel's plan on the 6x4 grid."""
    model = model_of(kind)
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, use_rand=False)
    inputs = inputs_of(model, kind, batch=2, h=6, w=4)
    x, normed, q_in = _block_io(model, model.transformer_blocks[0], inputs)
    for hw, same in (((6, 4), True), ((4, 6), False)):
        plan = cluster_tokens(x, 12, "tome_sd", h=hw[0], w=hw[1], no_rand=True)
        assert torch.equal(plan.merge(normed), q_in) is same


def test_flux_grid_is_read_once_per_img_ids_and_must_be_a_raster():
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux", batch=2)
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, seed=1)
    out = run(model, inputs)
    assert vars(inputs["img_ids"])["_atc_grid"][1] == (6, 4)  # kept on the tensor
    assert torch.equal(run(model, inputs), out)
    with pytest.raises(ValueError, match="img_ids are not one raster grid"):
        run(model, dict(inputs, img_ids=inputs["img_ids"].flip(0)))
    changed = inputs["img_ids"].clone()
    run(model, dict(inputs, img_ids=changed))
    changed.copy_(changed.flip(0))  # changed in place: read again
    with pytest.raises(ValueError, match="img_ids are not one raster grid"):
        run(model, dict(inputs, img_ids=changed))


def test_metric_dim_clusters_the_projected_tokens():
    from atc_patch.patch.diffusion.core import metric_projection

    model = model_of("tiny-sd3")
    atc_patch.apply_patch(model, method="atc", linkage="average", ratio=0.5, metric_dim=8)
    inputs = inputs_of(model, "tiny-sd3")
    x, normed, q_in = _block_io(model, model.transformer_blocks[1], inputs)
    projected = cluster_tokens(x @ metric_projection(x.shape[-1], 8, x), 12, "atc")
    full = cluster_tokens(x, 12, "atc")
    assert torch.equal(projected.merge(normed), q_in)
    assert not torch.equal(full.merge(normed), q_in)


def test_self_attention_key_mask_follows_the_merge():
    model = model_of("tiny-pixart")
    inputs = inputs_of(model, "tiny-pixart")
    atc_patch.apply_patch(model, method="tome", ratio=0.5)
    ref = run(model, inputs)
    ones = torch.ones(2, 24)
    assert torch.equal(run(model, dict(inputs, attention_mask=ones)), ref)
    assert torch.isfinite(run(model, dict(inputs, attention_mask=ones.tril()[:2]))).all()
    flux = model_of("tiny-flux")
    atc_patch.apply_patch(flux, method="tome", ratio=0.5)
    mask = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask on joint"):
        run(
            flux,
            dict(inputs_of(flux, "tiny-flux"), joint_attention_kwargs={"attention_mask": mask}),
        )


# ---------------------------------------------------------------------------------------------
# the attention path stays diffusers'
# ---------------------------------------------------------------------------------------------
class Recording:
    """Wraps a model's own attention processor; records the query tokens it is given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tokens: list[int] = []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.tokens.append(hidden_states.shape[1])
        return self.inner(attn, hidden_states, *args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_custom_attention_processor_still_runs(kind, when):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    ref = run(model, inputs)
    attn = attn_modules(model)[0]
    if when == "after":
        atc_patch.apply_patch(model, method="tome", ratio=0.5)
    rec = Recording(attn.processor)
    attn.set_processor(rec)
    if when == "before":
        atc_patch.apply_patch(model, method="tome", ratio=0.5)
    out = run(model, inputs)
    n = inputs["hidden_states"].shape[-1] * inputs["hidden_states"].shape[-2]
    n = n // model.config.patch_size**2 if kind != "tiny-flux" else 24
    assert rec.tokens and all(t == n // 2 for t in rec.tokens)
    atc_patch.remove_patch(model)
    assert torch.equal(run(model, inputs), ref)  # a wrapping processor changes nothing else
    assert attn.processor is rec and out.shape == ref.shape


def test_attention_backend_dispatch_keeps_running():
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux")
    model.set_attention_backend("native")
    atc_patch.apply_patch(model, method="atc", ratio=0.5)
    assert count_to_q(model, inputs)[0] == 12
    assert model.transformer_blocks[0].attn.processor._attention_backend is not None


# ---------------------------------------------------------------------------------------------
# diffusers' caching hooks look blocks up by exact class and replace their forward
# ---------------------------------------------------------------------------------------------
def _cache_config(name: str):
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    if name == "fbc":
        return FirstBlockCacheConfig(threshold=10.0)  # skips after the first step
    return MagCacheConfig(num_inference_steps=3, retention_ratio=0.0, threshold=1.0,
                          mag_ratios=[1.0] * 3)  # fmt: skip


def _steps(model, inputs) -> list[torch.Tensor]:
    """Three denoising calls (the cache decides from the earlier ones)."""
    outs = []
    with torch.no_grad(), model.cache_context("cond"):
        for i, t in enumerate((0.9, 0.8, 0.7)):
            step = dict(inputs, timestep=torch.full_like(inputs["timestep"], t))
            step["hidden_states"] = inputs["hidden_states"] * (1 + 0.01 * i)
            outs.append(model(**step).sample)
    return outs


@pytest.mark.parametrize("cache", ["fbc", "mag"])
@pytest.mark.parametrize("order", ["patch-then-cache", "cache-then-patch"])
def test_diffusers_cache_hooks_and_the_patch_combine_in_either_order(cache, order):
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux")

    def patch():
        atc_patch.apply_patch(model, "tome", ratio=0.5)

    def enable():
        model.enable_cache(_cache_config(cache))

    plain = _steps(model, inputs)
    patch()
    patched = _steps(model, inputs)
    atc_patch.remove_patch(model)
    enable()
    cached = _steps(model, inputs)
    model.disable_cache()
    assert torch.equal(cached[0], plain[0]) and not torch.equal(cached[2], plain[2])
    for step in (patch, enable) if order == "patch-then-cache" else (enable, patch):
        step()
    both = _steps(model, inputs)
    assert not torch.equal(both[0], cached[0])  # the patch reduces under the cache hooks
    torch.testing.assert_close(both[0], patched[0])  # first step: computed in full, patched
    atc_patch.remove_patch(model)  # with the cache hooks still on
    model._diffusers_hook.reset_stateful_hooks()
    assert all(torch.equal(a, b) for a, b in zip(_steps(model, inputs), cached))
    model.disable_cache()
    assert all(torch.equal(a, b) for a, b in zip(_steps(model, inputs), plain))
    assert atc_patch.patch_settings(model) is None


# ---------------------------------------------------------------------------------------------
# pipelines, the example and the benchmark
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-dit"])
def test_pipeline_patch_and_remove(kind):
    from atc_patch.testing import build_tiny_pipeline, tiny_pipeline_call_kwargs

    pipe = build_tiny_pipeline(kind)
    kw = dict(num_inference_steps=2, output_type="np", **tiny_pipeline_call_kwargs(kind))
    if kind == "tiny-dit":  # class-conditional, latents of the model's sample_size
        kw.update(class_labels=[1])
    else:
        kw.update(prompt="a cat", height=64, width=64)

    def gen():
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    ref = gen()
    atc_patch.apply_patch(pipe, method="tome_sd", ratio=0.5)
    assert atc_patch.patch_settings(pipe)["model"] == type(pipe.transformer).__name__
    patched = gen()
    atc_patch.remove_patch(pipe)
    assert (patched != ref).any() and (gen() == ref).all()


def _load_script(path: str):
    import importlib.util
    import sys
    from pathlib import Path

    full = Path(__file__).resolve().parents[2] / path
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], full)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_sd_generate_shards_across_ranks_and_resumes(tmp_path, monkeypatch, capsys):
    example = _load_script("examples/sd_generate.py")
    common = ["--model_id", "tiny-dit", "--merge_fn_str", "tome_sd", "--steps", "2",
              "--prompt", "class 3", "--prompt", "5", "--images_per_prompt", "2",
              "--threads", "1"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    example.main([*common, "--output_dir", str(one)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    example.main([*common, "--output_dir", str(two)])
    assert sorted(p.name for p in two.glob("*.png")) == ["00001.png", "00003.png"]
    (two / "00000.png").write_bytes((one / "00000.png").read_bytes())  # an earlier run's image
    monkeypatch.setenv("RANK", "0")
    capsys.readouterr()
    example.main([*common, "--output_dir", str(two)])
    out = capsys.readouterr().out
    assert "[rank 0/2]" in out and "1 images, 1 already there" in out and "'family': 'dit'" in out
    for i in range(4):  # every image is the one a single process makes
        assert (one / f"0000{i}.png").read_bytes() == (two / f"0000{i}.png").read_bytes()


def test_sd_generate_text_to_image_transformer_offline(tmp_path, capsys):
    example = _load_script("examples/sd_generate.py")
    example.main(["--model_id", "tiny-pixart", "--merge_fn_str", "atc", "--steps", "2",
                  "--height", "64", "--width", "96", "--merge_mlp", "--merge_crossattn",
                  "--prompt", "a cat", "--output_dir", str(tmp_path)])  # fmt: skip
    assert [p.name for p in tmp_path.glob("*.png")] == ["00000.png"]
    assert "'model': 'PixArtTransformer2DModel'" in capsys.readouterr().out


def test_dit_speed_benchmark_smoke(tmp_path):
    bench = _load_script("benchmarks/dit_speed.py")
    bench.main(["--tokens", "64", "--width_div", "24", "--double", "1", "--single", "1",
                "--sd3_layers", "1", "--text_flux", "4", "--text_sd3", "4", "--ratios", "0.5",
                "--rounds", "1", "--warmup", "0", "--methods", "unpatched", "tome_sd",
                "atc-single", "--metric_dim", "16", "--metric_methods", "atc-single",
                "--out_dir", str(tmp_path)])  # fmt: skip
    rows = (tmp_path / "dit_speed.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:5] == ["model", "kind", "method", "ratio", "step_s"] and "tokens" in header
    kinds = [r.split(",")[1] for r in rows[1:]]
    assert kinds.count("step") == 8 and kinds.count("kernel") == 6
