"""The dit family patch: Flux, SD3, PixArt and DiT transformers, tiny random init, CPU."""

from __future__ import annotations

import copy
import functools
import pickle

import diffusers
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import atc_patch
from atc_patch.kernel import cluster_tokens
from atc_patch.patch.dit import transformer_blocks
from atc_patch.testing import build_transformer, transformer_inputs

FAMILIES = ("tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit")
METHODS = [
    ("atc", {"linkage": "single"}),
    ("atc", {"linkage": "complete"}),
    ("atc", {"linkage": "average"}),
    ("tome_sd", {"seed": 3}),
    ("tome", {}),
    ("kmedoids", {}),
    ("dpcknn", {}),
]


# Small models gain nothing from intra-op threads; on a shared CPU they lose 10x to them.
pytestmark = pytest.mark.usefixtures("one_thread")


_CACHE: dict[str, torch.nn.Module] = {}


def model_of(kind: str) -> torch.nn.Module:
    """A fresh copy of a cached tiny transformer."""
    if kind not in _CACHE:
        _CACHE[kind] = build_transformer(kind)
    return copy.deepcopy(_CACHE[kind])


def inputs_of(model, kind: str, batch: int = 2, h: int = 6, w: int = 4, **kw):
    if kind == "tiny-dit":  # diffusers' DiT un-patchifies square grids only
        w = h
    return transformer_inputs(model, batch=batch, height=h, width=w, **kw)


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def attn_modules(model) -> list[torch.nn.Module]:
    """The image self/joint attention module of every block (the one with to_q on images)."""
    out = []
    for block in transformer_blocks(model):
        out.append(getattr(block, "attn", None) or block.attn1)
    return out


def count_to_q(model, inputs) -> list[int]:
    """Tokens per sample reaching each block's image ``to_q`` projection in one call (Flux's
    merged joint attention runs once per sample: rows are summed over its calls)."""
    rows = {}

    def hook(m, args, out):
        rows[m] = rows.get(m, 0) + args[0].shape[0] * args[0].shape[1]

    mods = [a.to_q for a in attn_modules(model)]
    hooks = [m.register_forward_hook(hook) for m in mods]
    try:
        x = next(v for k, v in inputs.items() if k == "hidden_states")
        run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return [rows[m] // x.shape[0] for m in mods]


# ---------------------------------------------------------------------------------------------
# identity, reversibility, token counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
def test_ratio_zero_and_remove_patch_are_bit_identical(kind):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    ref = run(model, inputs)
    atc_patch.apply_patch(model, method="atc", ratio=0.0)
    assert torch.equal(run(model, inputs), ref)
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, merge_mlp=True)
    out = run(model, inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.allclose(out, ref)
    settings = atc_patch.patch_settings(model)
    assert settings["family"] == "dit" and settings["method"] == "tome_sd"
    assert settings["num_blocks"] == len(transformer_blocks(model))
    atc_patch.remove_patch(model)
    assert atc_patch.patch_settings(model) is None
    assert torch.equal(run(model, inputs), ref)
    assert all(type(m).__module__.startswith(("diffusers", "torch")) for m in model.modules())


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_fewer_tokens_reach_the_attention_projections(kind, ratio):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    seq = inputs.get("encoder_hidden_states")
    before = count_to_q(model, inputs)
    atc_patch.apply_patch(model, method="atc", ratio=ratio)
    after = count_to_q(model, inputs)
    n = 24 if kind != "tiny-dit" else 36
    r = int(n * ratio)
    # Flux single-stream blocks see [text, image]: the text part stays whole.
    text = seq.shape[1] if kind == "tiny-flux" else 0
    expected = [c - r if c in (n, n + text) else c for c in before]
    assert after == expected and after != before


def test_blocks_option_selects_blocks_and_an_empty_selection_raises():
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux")
    atc_patch.apply_patch(model, method="tome", ratio=0.5, blocks=[1, 3])
    assert count_to_q(model, inputs) == [24, 12, 30, 18]  # double, double, single, single
    with pytest.raises(ValueError, match="selects no block"):
        atc_patch.apply_patch(model, method="tome", blocks=[])
    with pytest.raises(ValueError, match="out of range"):
        atc_patch.apply_patch(model, method="tome", blocks=[4])
    with pytest.raises(ValueError, match="no sublayer"):
        atc_patch.apply_patch(model, method="tome", merge_attn=False)


# ---------------------------------------------------------------------------------------------
# every method: finite outputs, odd batches, non-square grids, the MLP too
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
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
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-sd3"])
def test_half_precision_keeps_its_dtype(kind):
    model = model_of(kind).to(torch.bfloat16)
    inputs = inputs_of(model, kind)
    atc_patch.apply_patch(model, method="atc", ratio=0.5, merge_mlp=True)
    out = run(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_cfg_batch_samples_are_reduced_independently(kind):
    """A CFG batch (prompted + unprompted halves): each sample gets its own plan (and, on Flux,
    its own merged rotary table), so the batch equals the samples run one at a time."""
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
def _record(module, store: list, index=None):
    def hook(m, args, kwargs, out):
        if index is None:
            store.append(args[0] if args else kwargs["hidden_states"])
        else:
            store.append(out[index])

    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("method", ["atc", "tome_sd", "dpcknn"])
def test_flux_text_tokens_are_never_merged(method):
    """Double-stream: the text stream reaches add_q_proj whole and unchanged (the normed text).
    Single-stream: the first T rows reaching to_q are exactly the block's normed text rows,
    whatever the image tokens are (perturbing them, merged clusters included, changes nothing
    about how text passes)."""
    model = model_of("tiny-flux")
    atc_patch.apply_patch(model, method=method, ratio=0.75, seed=0 if method == "tome_sd" else None)
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
        # the merged joint attention runs once per sample (its own rotary table)
        ctx, q = torch.cat(ctx_in), torch.cat(q_in)
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
# tome_sd's grid, seeds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-sd3"])
def test_tome_sd_windows_lie_on_the_real_token_grid(kind):
    """The double/joint block's merged to_q input equals the kernel's plan on the 6x4 grid."""
    model = model_of(kind)
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, use_rand=False)
    inputs = inputs_of(model, kind, batch=2, h=6, w=4)
    block = model.transformer_blocks[0]
    x_in, normed, q_in = [], [], []
    pre = block.register_forward_pre_hook(
        lambda m, a, kw: x_in.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    hooks = [pre, _record(block.norm1, normed, index=0), _record(block.attn.to_q, q_in)]
    run(model, inputs)
    for h in hooks:
        h.remove()
    for hw, same in (((6, 4), True), ((4, 6), False)):
        plan = cluster_tokens(x_in[0], 12, "tome_sd", h=hw[0], w=hw[1], no_rand=True)
        assert torch.equal(plan.merge(normed[0]), torch.cat(q_in)) is same


def test_metric_dim_clusters_the_projected_tokens():
    from atc_patch.patch.dit import metric_projection

    model = model_of("tiny-sd3")
    atc_patch.apply_patch(model, method="atc", linkage="average", ratio=0.5, metric_dim=8)
    inputs = inputs_of(model, "tiny-sd3")
    block = model.transformer_blocks[1]
    x_in, normed, q_in = [], [], []
    pre = block.register_forward_pre_hook(
        lambda m, a, kw: x_in.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    hooks = [pre, _record(block.norm1, normed, index=0), _record(block.attn.to_q, q_in)]
    run(model, inputs)
    for h in hooks:
        h.remove()
    x = x_in[0]
    projected = cluster_tokens(x @ metric_projection(x.shape[-1], 8, x), 12, "atc")
    full = cluster_tokens(x, 12, "atc")
    assert torch.equal(projected.merge(normed[0]), q_in[0])
    assert not torch.equal(full.merge(normed[0]), q_in[0])


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


def test_tome_sd_draws_follow_the_seed():
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux", batch=2)
    outs = []
    for seed in (1, 1, 2):
        atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, seed=seed)
        outs.append(run(model, inputs))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="img_ids are not one raster grid"):
        bad = dict(inputs, img_ids=inputs["img_ids"].flip(0))
        run(model, bad)


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


@pytest.mark.parametrize("kind", FAMILIES)
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
# gradient checkpointing
# ---------------------------------------------------------------------------------------------
def _grads(model, inputs) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # DiT drops class labels at random in training mode
    with torch.enable_grad():
        model(**inputs).sample.square().mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize(
    "method,opts", [m for m in METHODS if m[1].get("linkage") in (None, "average")]
)
def test_gradient_checkpointing_gives_the_same_gradients(kind, method, opts):
    model = model_of(kind)
    model.train()
    inputs = inputs_of(model, kind, batch=2)
    atc_patch.apply_patch(model, method=method, ratio=0.5, merge_mlp=True, **opts)
    plain = _grads(model, inputs)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt = _grads(model, inputs)
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_reentrant_checkpointing_replays_tome_sd_draws():
    model = model_of("tiny-flux")
    model.train()
    inputs = inputs_of(model, "tiny-flux", batch=2)
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, seed=5)
    plain = _grads(model, inputs)
    model.enable_gradient_checkpointing(
        gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=True)
    )
    inputs["hidden_states"].requires_grad_(True)  # reentrant checkpoints need a grad input
    # reentrant backward accumulates in another order (1e-9 noise); other draws would differ
    # by 1e-2 (the tokens merged change)
    for a, b in zip(plain, _grads(model, inputs)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# options, pipelines, copies
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(max_downsample=1), "blocks="),
        (dict(r=4), "ratio"),
        (dict(ratio=1.0), "ratio"),
        (dict(ratio="0.5"), "ratio"),
        (dict(sx=0), "sx"),
        (dict(use_rand=1), "use_rand"),
        (dict(linkage="ward"), "linkage"),
        (dict(merge_crossattn=True), "PixArt"),
        (dict(blocks=[0.5]), "blocks"),
    ],
)
def test_bad_options_raise_value_error(bad, match):
    model = model_of("tiny-flux")
    with pytest.raises(ValueError, match=match):
        atc_patch.apply_patch(model, method="atc", **bad)
    assert atc_patch.patch_settings(model) is None
    with pytest.raises(ValueError, match="method must be one of"):
        atc_patch.apply_patch(model, method="bogus")


@pytest.mark.parametrize(
    ("method", "bad"),
    [("atc", dict(sx=2)), ("atc", dict(seed=1)), ("tome", dict(use_rand=False)),
     ("tome", dict(linkage="single")), ("dpcknn", dict(sy=2))],
)  # fmt: skip
def test_options_of_other_methods_are_rejected(method, bad):
    model = model_of("tiny-flux")
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"unknown option.*{name}.*method='{method}'"):
        atc_patch.apply_patch(model, method=method, ratio=0.5, **bad)
    if name in ("seed", "linkage"):
        atc_patch.apply_patch(model, method=method, ratio=0.5, **{name: None})  # the default
    if name != "linkage":
        atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, **bad)  # tome_sd takes them


def test_unsupported_transformer_is_a_type_error():
    other = diffusers.Transformer2DModel(
        num_attention_heads=1, attention_head_dim=8, in_channels=32
    )
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        atc_patch.apply_patch(other)


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
    atc_patch.apply_patch(pipe, method="atc", ratio=0.5)
    assert atc_patch.patch_settings(pipe)["model"] == type(pipe.transformer).__name__
    assert atc_patch.patch_settings(pipe.transformer) is not None
    patched = gen()
    atc_patch.remove_patch(pipe)
    assert atc_patch.patch_settings(pipe.transformer) is None
    assert (patched != ref).any() and (gen() == ref).all()


def test_pipeline_or_transformer_either_way_round():
    """Patch the pipeline or its transformer; read settings from, re-patch and remove through
    either (issue 10, item 2, for this family); a pipeline-patched transformer pickles."""
    from atc_patch.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-dit")
    for patched, other in ((pipe, pipe.transformer), (pipe.transformer, pipe)):
        atc_patch.apply_patch(patched, method="atc", ratio=0.5)
        assert atc_patch.patch_settings(other) == atc_patch.patch_settings(patched)
        pickle.loads(pickle.dumps(pipe.transformer))
        atc_patch.apply_patch(other, method="tome", ratio=0.25)  # re-patch through the other
        assert atc_patch.patch_settings(patched)["method"] == "tome"
        atc_patch.remove_patch(other)
        assert atc_patch.patch_settings(patched) is None
        assert atc_patch.patch_settings(pipe.transformer) is None


def test_patched_model_deepcopies_and_pickles():
    model = model_of("tiny-sd3")
    inputs = inputs_of(model, "tiny-sd3")
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, seed=1)
    out = run(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(run(clone, inputs), out)
        atc_patch.remove_patch(clone)
        assert atc_patch.patch_settings(clone) is None


# ---------------------------------------------------------------------------------------------
# the example and the benchmark
# ---------------------------------------------------------------------------------------------
def _load_script(path: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], path)
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
    assert rows[0].startswith("model,kind,method,ratio,step_s")
    kinds = [r.split(",")[1] for r in rows[1:]]
    assert kinds.count("step") == 8 and kinds.count("kernel") == 6
