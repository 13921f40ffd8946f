"""The current image diffusion transformers: QwenImage, Z-Image, FLUX.2, Chroma, CogView4,
HiDream, Sana (tiny, random init from their real configurations, CPU).

What the contract test does not cover: which rows reach each sublayer (text, reference images
and padding whole, the image rows merged by the plan of the block's input), rotary tables that
follow the plan, masks that follow the merge, CogView4's two ``ff`` calls, FLUX.2's fused
single-stream sublayer, Sana's refused ``merge_mlp``, CFG batches, gradient checkpointing, host
reads, and a pipeline run (Chroma, whose pipeline always passes a mask).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import atc_patch
from atc_patch.kernel import cluster_tokens
from atc_patch.patch.diffusion import core
from atc_patch.patch.diffusion.dit import transformer_blocks
from atc_patch.testing import build_transformer, transformer_inputs

from ._models import model_of
from .test_diffusion_call_state import CountSyncs

KINDS = (
    "tiny-qwenimage",
    "tiny-zimage",
    "tiny-flux2",
    "tiny-chroma",
    "tiny-cogview4",
    "tiny-hidream",
    "tiny-sana",
)
METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs_of(model, batch: int = 2, h: int = 6, w: int = 4, **kw) -> dict:
    return transformer_inputs(model, batch=batch, height=h, width=w, **kw)


def forward(model, inputs) -> torch.Tensor:
    out = model(**inputs).sample
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image: a list per image


run = torch.no_grad()(forward)


@contextlib.contextmanager
def recording(module: torch.nn.Module, store: list):
    """Record the first argument of every call of ``module``."""
    handle = module.register_forward_hook(
        lambda m, a, kw, out: store.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    try:
        yield store
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# which rows reach the sublayers: text, references and padding whole, the image merged
# ---------------------------------------------------------------------------------------------
# (block index, a linear layer seeing the sublayer's sequence, text first?) per block group,
# with the tiny models' 2 (+ 2) blocks.
LAYOUTS = {
    "tiny-qwenimage": [(0, "attn.to_q", False)],
    "tiny-zimage": [(0, "attention.to_q", False), (1, "attention.to_q", False)],
    "tiny-flux2": [(0, "attn.to_q", False), (2, "attn.to_qkv_mlp_proj", True)],
    "tiny-chroma": [(0, "attn.to_q", False), (2, "attn.to_q", True), (2, "proj_out", True)],
    "tiny-cogview4": [(0, "attn1.to_q", True)],  # its processor concatenates [text, image]
    "tiny-hidream": [(0, "attn1.to_q", False), (2, "attn1.to_q", False)],
    "tiny-sana": [(0, "attn1.to_q", False), (0, "attn2.to_q", False)],
}
VARIANTS = [(k, {}) for k in KINDS] + [
    ("tiny-qwenimage", {"refs": 1}),  # QwenImage-Edit: a reference image after the target
    ("tiny-flux2", {"refs": 1}),  # FLUX.2 with a reference image (img_ids T = 10)
]


def _block_input(model, block, inputs) -> torch.Tensor:
    store = []
    handle = block.register_forward_pre_hook(
        lambda m, a, kw: store.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    try:
        run(model, inputs)
    finally:
        handle.remove()
    return store[0]


@pytest.mark.parametrize("kind,extra", VARIANTS, ids=lambda v: str(v) if v else "")
def test_only_the_generated_image_rows_merge(kind, extra):
    """One patched block at a time: the rows reaching its sublayers are the unpatched rows,
    with the generated image's ``N`` rows replaced by the plan (made from the block's input
    image tokens) merging them; text, reference and padding rows are bit-identical."""
    model = model_of(kind)
    inputs = inputs_of(model, **extra)
    n = 6 * 4
    t = 6 if kind != "tiny-hidream" else None  # HiDream's single blocks: text after the image
    for index, path, text_first in LAYOUTS[kind]:
        opts = {"merge_mlp": True}
        if kind == "tiny-sana":  # attn2 reads attn1's output: one sublayer at a time
            opts = {"merge_attn": path == "attn1.to_q", "merge_crossattn": path == "attn2.to_q"}
        block = transformer_blocks(model)[index]
        layer = block.get_submodule(path)
        with recording(layer, []) as plain:
            x = _block_input(model, block, inputs)
        atc_patch.apply_patch(model, "atc", ratio=0.5, blocks=[index], **opts)
        with recording(layer, []) as merged:
            run(model, inputs)
        atc_patch.remove_patch(model)
        start = t if text_first else 0
        joint_input = kind in ("tiny-flux2", "tiny-chroma") and index >= 2
        metric = x[:, (t if joint_input else 0) :][:, :n]
        plan = cluster_tokens(metric, n // 2, "atc")
        ref = plain[0]
        if path == "proj_out":  # after the merged attention and MLP: the merged rows
            ref = torch.cat([ref[:, :start], ref[:, start + n :]], dim=1)
            assert torch.cat(merged).shape[1] == ref.shape[1] + n // 2
            continue
        want = torch.cat(
            [ref[:, :start], plan.merge(ref[:, start : start + n]), ref[:, start + n :]], dim=1
        )
        assert torch.equal(torch.cat(merged), want), (kind, index, path)
        assert want.shape[1] == ref.shape[1] - n // 2


def test_flux_kontext_reference_tokens_never_merge():
    """FLUX.1 Kontext appends reference tokens with first id 1: they pass whole, and tome_sd
    reads the grid of the generated image's ids."""
    model = build_transformer("tiny-flux")
    inputs = transformer_inputs(model, batch=2, height=6, width=4)
    ids = inputs["img_ids"]
    ref_ids = ids.clone()
    ref_ids[:, 0] = 1
    inputs = dict(inputs, img_ids=torch.cat([ids, ref_ids]))
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"]] * 2, dim=1)
    q = transformer_blocks(model)[0].attn.to_q
    with recording(q, []) as plain:
        run(model, inputs)
    for method in ("atc", "tome_sd"):
        atc_patch.apply_patch(model, method, ratio=0.5, blocks=[0])
        with recording(q, []) as merged:
            run(model, inputs)
        merged = torch.cat(merged)
        assert merged.shape[1] == 24 + 12
        assert torch.equal(merged[:, 12:], plain[0][:, 24:])


# ---------------------------------------------------------------------------------------------
# rotary tables follow the plan
# ---------------------------------------------------------------------------------------------
def _paired(model, inputs: dict) -> dict:
    """Inputs whose image tokens come in identical horizontal pairs ``(2k, 2k + 1)``."""
    inputs = dict(inputs)
    name = type(model).__name__
    if name.startswith("ZImage"):
        x = [t.clone() for t in inputs["x"]]
        for t in x:
            p = model.config.all_patch_size[0]
            t.unflatten(-1, (-1, 2, p))[..., 1, :] = t.unflatten(-1, (-1, 2, p))[..., 0, :]
        return dict(inputs, x=x)
    x = inputs["hidden_states"].clone()
    if x.dim() == 4:  # latents (B, C, H, W), patch p
        p = model.config.patch_size
        x.unflatten(-1, (-1, 2, p))[..., 1, :] = x.unflatten(-1, (-1, 2, p))[..., 0, :]
    else:  # packed tokens (B, N, C)
        x[:, 1::2] = x[:, 0::2]
    return dict(inputs, hidden_states=x)


@contextlib.contextmanager
def sdpa_calls(block: torch.nn.Module, store: list):
    """Record ``(query, key)`` ``(B, H, S, D)`` of every SDPA call while ``block`` runs."""
    real = torch.nn.functional.scaled_dot_product_attention
    active = []

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        if active:
            store.append((query, key, attn_mask))
        return real(query, key, value, attn_mask, *args, **kwargs)

    hooks = [
        block.register_forward_pre_hook(lambda *a: active.append(1)),
        block.register_forward_hook(lambda *a: active.clear()),
    ]
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield store
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        for h in hooks:
            h.remove()


# model -> where the image rows start in its first block's joint attention sequence
ROTARY = {
    "tiny-flux": "text",
    "tiny-qwenimage": "text",
    "tiny-flux2": "text",
    "tiny-chroma": "text",
    "tiny-cogview4": "text",
    "tiny-zimage": "image",
    "tiny-hidream": "image",
}


@pytest.mark.parametrize("kind", ROTARY)
def test_rotary_tables_follow_the_plan(kind):
    """Image tokens in identical pairs merge pair by pair; each merged query and key is then
    rotated by its pair's mean table, i.e. equals the mean of the pair's rotated queries and
    keys in the unpatched attention; every other row is the unpatched one."""
    model = model_of(kind) if kind != "tiny-flux" else build_transformer("tiny-flux")
    inputs = _paired(model, inputs_of(model))
    block = transformer_blocks(model)[0]
    with sdpa_calls(block, []) as plain:
        run(model, inputs)
    atc_patch.apply_patch(model, "atc", ratio=0.5, blocks=[0])
    with sdpa_calls(block, []) as merged:
        run(model, inputs)
    n, o = 24, 6 if ROTARY[kind] == "text" else 0
    for j in (0, 1):  # query, key
        ref = plain[0][j]
        got = torch.cat([call[j] for call in merged])  # per-sample calls: one per sample
        pairs = ref[:, :, o : o + n].unflatten(2, (n // 2, 2)).mean(3)
        torch.testing.assert_close(got[:, :, o : o + n // 2], pairs)
        torch.testing.assert_close(got[:, :, :o], ref[:, :, :o])
        torch.testing.assert_close(got[:, :, o + n // 2 :], ref[:, :, o + n :])
        assert not torch.allclose(pairs, ref[:, :, o : o + n : 2])  # the positions differ


# ---------------------------------------------------------------------------------------------
# masks follow the merge
# ---------------------------------------------------------------------------------------------
def test_chroma_joint_mask_follows_the_merge():
    """ChromaPipeline always passes [text mask, ones] (B, T + N): the (B, 1, S, S) mask the
    block builds reaches the attention as the one built from [text mask, ones(N')]."""
    model = model_of("tiny-chroma")
    inputs = inputs_of(model)
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge_mlp=True)
    for index in (0, 2):  # double, single
        with sdpa_calls(transformer_blocks(model)[index], []) as calls:
            run(model, inputs)
        got = torch.cat([mask for _, _, mask in calls])
        v = torch.cat([inputs["attention_mask"][:, :6], torch.ones(2, 12)], dim=1)
        assert torch.equal(got, v[:, None, None, :] * v[:, None, :, None])
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge_mlp=True, blocks=[0])
    bad = dict(inputs, attention_mask=inputs["attention_mask"][:, :10])
    with pytest.raises(ValueError, match="rows on dimension"):
        run(model, bad)


class Recording:
    """Wraps an attention processor; records its keyword arguments."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[dict] = []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls.append(dict(kwargs, hidden_states=hidden_states))
        return self.inner(attn, hidden_states, *args, **kwargs)


def test_hidream_padding_mask_follows_the_merge():
    """A non-square image is padded to a fixed token count with a 0/1 key mask: the merged
    image keeps mask 1, the padding keeps 0 and never merges."""
    model = model_of("tiny-hidream")
    inputs = inputs_of(model, h=6, w=4)
    attn = transformer_blocks(model)[0].attn1
    rec = Recording(attn.processor)
    attn.set_processor(rec)
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge_mlp=True)
    run(model, inputs)
    mask, x = rec.calls[0]["hidden_states_masks"], rec.calls[0]["hidden_states"]
    assert x.shape[1] == mask.shape[1] == 256 - 12  # max_seq = (32 / 2) ** 2 tokens
    assert mask[:, :12].eq(1).all() and mask[:, 12:].eq(0).all()


def test_zimage_padding_mask_follows_the_merge():
    """Captions of 7 and 40 tokens pad to 32 and 64: the batch's main layers get a (B, S)
    mask; with it following the merge, the batch equals its samples run one at a time."""
    model = model_of("tiny-zimage")
    inputs = inputs_of(model, seq_len=7)
    inputs["cap_feats"][1] = torch.randn(40, model.config.cap_feat_dim)
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge_mlp=True)
    both = run(model, inputs)
    for i in range(2):
        one = dict(inputs, x=inputs["x"][i : i + 1], cap_feats=inputs["cap_feats"][i : i + 1])
        torch.testing.assert_close(run(model, dict(one, t=inputs["t"][:1])), both[i : i + 1])


# ---------------------------------------------------------------------------------------------
# per model: CogView4's two ff calls, FLUX.2's fused sublayer, Sana, Z-Image's limits
# ---------------------------------------------------------------------------------------------
def test_cogview4_ff_merges_its_image_call_only():
    """CogView4 runs its one ``ff`` on the image tokens, then on the text: with as many text
    tokens as image tokens (24), only the first call merges."""
    model = model_of("tiny-cogview4")
    inputs = inputs_of(model, seq_len=24)
    ff = transformer_blocks(model)[0].ff.net[0].proj
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge_mlp=True)
    with recording(ff, []) as calls:
        run(model, inputs)
    assert [c.shape[1] for c in calls] == [12, 24]


def test_flux2_single_blocks_merge_attention_and_mlp_as_one():
    """FLUX.2's single-stream ``attn`` holds the MLP too: merge_attn or merge_mlp merges it;
    its double-stream blocks keep the two apart."""
    model = model_of("tiny-flux2")
    inputs = inputs_of(model)
    blocks = transformer_blocks(model)
    layers = [blocks[0].attn.to_q, blocks[0].ff.linear_in, blocks[2].attn.to_qkv_mlp_proj]
    for attn, mlp, want in ((True, False, [12, 24, 12]), (False, True, [24, 12, 12])):
        atc_patch.apply_patch(model, "tome", ratio=0.5, merge_attn=attn, merge_mlp=mlp)
        stores = [[] for _ in layers]
        with contextlib.ExitStack() as stack:
            for layer, store in zip(layers, stores):
                stack.enter_context(recording(layer, store))
            run(model, inputs)
        tokens = [s[0].shape[1] - (6 if i == 2 else 0) for i, s in enumerate(stores)]
        assert tokens == want


def test_sana_refuses_merge_mlp_and_merges_cross_attention_queries():
    model = model_of("tiny-sana")
    with pytest.raises(ValueError, match="GLUMBConv.*3x3 depthwise"):
        atc_patch.apply_patch(model, "atc", ratio=0.5, merge_mlp=True)
    assert atc_patch.patch_settings(model) is None
    inputs = inputs_of(model)
    attn2 = transformer_blocks(model)[0].attn2
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge_attn=False, merge_crossattn=True)
    with recording(attn2.to_q, []) as q, recording(attn2.to_k, []) as k:
        run(model, inputs)
    assert q[0].shape[1] == 12 and k[0].shape[1] == 6


def test_zimage_refuses_batches_of_mixed_sizes():
    model = model_of("tiny-zimage")
    inputs = inputs_of(model)
    inputs["x"][1] = torch.randn(4, 1, 8, 8)
    atc_patch.apply_patch(model, "atc", ratio=0.5)
    with pytest.raises(ValueError, match="one size"):
        run(model, inputs)
    atc_patch.remove_patch(model)
    with torch.no_grad():
        model(**inputs)  # the unpatched model takes them


def test_a_single_stream_block_on_its_own_needs_its_models_call():
    """FLUX.2's single-stream blocks get [text, image] with no text length: called outside the
    model they raise, and leave no call behind."""
    model = model_of("tiny-flux2")
    atc_patch.apply_patch(model, "atc", ratio=0.5)
    block = transformer_blocks(model)[2]
    with pytest.raises(ValueError, match="model's call"):
        block(torch.randn(1, 30, 32), None, torch.randn(1, 1, 96))
    assert core._CALL.get() is None
    assert run(model, inputs_of(model, batch=1)).shape == (1, 24, 16)


def test_flux2_kv_cache_needs_a_batch_of_one():
    model = model_of("tiny-flux2")
    atc_patch.apply_patch(model, "atc", ratio=0.5)
    with pytest.raises(ValueError, match="batch of 1"):
        run(model, dict(inputs_of(model), kv_cache_mode="cached"))


# ---------------------------------------------------------------------------------------------
# every method: CFG batches, odd batches, half precision; checkpointing; host reads
# ---------------------------------------------------------------------------------------------
def _sample(inputs: dict, i: int, batch: int) -> dict:
    def one(k, v):
        if k == "encoder_hidden_states_llama3":  # HiDream: (layers, B, T, C)
            return v[:, i : i + 1]
        if torch.is_tensor(v) and v.dim() and v.shape[0] == batch:
            return v[i : i + 1]
        return v[i : i + 1] if isinstance(v, list) and len(v) == batch else v

    return {k: one(k, v) for k, v in inputs.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_cfg_batch_samples_are_reduced_independently(kind, method):
    """Each sample gets its own plan (and its own merged rotary table), so a batch equals its
    samples run one at a time; the outputs differ from the unpatched model's. (tome_sd draws
    at random for even batches only, as tomesd: here its top-left destinations.)"""
    model = model_of(kind)
    inputs = inputs_of(model, batch=2, seed=1)
    ref = run(model, inputs)
    opts = {"merge_crossattn": True} if kind == "tiny-sana" else {"merge_mlp": True}
    opts.update({"use_rand": False} if method == "tome_sd" else {})
    atc_patch.apply_patch(model, method, ratio=0.5, **opts)
    both = run(model, inputs)
    assert torch.isfinite(both).all() and not torch.equal(both, ref)
    for i in range(2):
        torch.testing.assert_close(run(model, _sample(inputs, i, 2)), both[i : i + 1])


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_keeps_its_dtype(kind):
    model = model_of(kind).to(torch.bfloat16)
    atc_patch.apply_patch(model, "atc", ratio=0.5)
    out = run(model, inputs_of(model, batch=3))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["atc", "tome_sd"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, method):
    model = model_of(kind).train()
    inputs = inputs_of(model)
    inputs.pop("attention_mask", None)  # Chroma: diffusers' checkpointed single blocks drop it
    mlp = {"merge_crossattn": True} if kind == "tiny-sana" else {"merge_mlp": True}
    atc_patch.apply_patch(model, method, ratio=0.5, **mlp)

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            forward(model, inputs).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = grads()
    model.enable_gradient_checkpointing()
    assert torch.equal(grads(), plain)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "tiny-hidream"])  # its MoE reads
@pytest.mark.parametrize("method", METHODS)
def test_a_patched_step_reads_no_tensor_value_on_the_host(kind, method, monkeypatch):
    model = model_of(kind)
    inputs = inputs_of(model)
    mode = CountSyncs.outside_the_kernel(monkeypatch)
    atc_patch.apply_patch(model, method, ratio=0.5)
    run(model, inputs)  # FLUX.2 and Chroma: img_ids are read here, once per tensor
    with mode:
        run(model, inputs)
    assert mode.ops == []


# ---------------------------------------------------------------------------------------------
# a pipeline: Chroma's always passes a joint mask
# ---------------------------------------------------------------------------------------------
def test_chroma_pipeline_patch_and_remove():
    from atc_patch.testing import build_tiny_pipeline, tiny_pipeline_call_kwargs

    pipe = build_tiny_pipeline("tiny-chroma")
    kw = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, output_type="np")
    kw.update(tiny_pipeline_call_kwargs("tiny-chroma"))

    def gen():
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    ref = gen()
    atc_patch.apply_patch(pipe, "atc", ratio=0.5, merge_mlp=True)
    assert atc_patch.patch_settings(pipe)["model"] == "ChromaTransformer2DModel"
    patched = gen()
    atc_patch.remove_patch(pipe)
    assert (patched != ref).any() and (gen() == ref).all()


# ---------------------------------------------------------------------------------------------
# merge="kv": every attention of every block merges its image keys; Sana refuses at apply
# ---------------------------------------------------------------------------------------------
class _KeyCounts(torch.overrides.TorchFunctionMode):
    """Record ``(queries, keys)`` of every ``F.scaled_dot_product_attention`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            self.calls.append((int(q.shape[-2]), int(k.shape[-2])))
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "tiny-sana"])
def test_kv_merges_the_image_keys_of_every_attention(kind):
    """With ratio 0.5 the attention of every patched block keeps its queries and sees 12 of
    the 24 image keys fewer (text, references and padding keys stay); text-only attention
    (Z-Image's context refiner) is left alone."""
    model = model_of(kind)
    inputs = inputs_of(model, batch=1)
    with _KeyCounts() as plain:
        ref = run(model, inputs)
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge="kv")
    with _KeyCounts() as merged:
        out = run(model, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert len(merged.calls) == len(plain.calls) > 0
    assert [q for q, _ in merged.calls] == [q for q, _ in plain.calls]
    fewer = [k0 - k for (_, k0), (_, k) in zip(plain.calls, merged.calls)]
    assert set(fewer) <= {0, 12}, (plain.calls, merged.calls)
    assert fewer.count(12) == atc_patch.patch_settings(model)["num_blocks"]


def test_kv_on_sana_is_refused_at_apply_and_leaves_the_model_as_it_was():
    model = model_of("tiny-sana")
    inputs = inputs_of(model)
    ref = run(model, inputs)
    with pytest.raises(ValueError, match="linear attention.*merge='tokens'"):
        atc_patch.apply_patch(model, "atc", ratio=0.5, merge="kv")
    assert atc_patch.patch_settings(model) is None
    assert torch.equal(run(model, inputs), ref)
