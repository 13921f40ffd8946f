"""The transformers family: every supported class, schedules, ToMe's published algorithm,
unmerge, attention backends, training, and the library's own mechanisms on a patched model
(the task model and its encoder as one patch, ``save_pretrained`` key names, ``forward``
signatures). What every family must do is in ``test_contract.py``.

Random-init models from the real config classes, shrunk (hidden size 32, 2-4 layers, 32-64 px
images with 8 px patches), plus one base-size smoke test. The ToMe reference below runs the
models' own submodules by hand (``tests/_tome_reference.py``'s matching and merging).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers as T
from _tome_reference import bipartite_soft_matching, merge_wavg

import atc_patch
from atc_patch.patch.vit import last_source
from atc_patch.patch.vit.transformers import root_of

from ._cases import SCHEDULE_IDS, SCHEDULES

SMALL = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8}


def _config(name: str, layers: int, img: int):
    kw = {**SMALL, "num_hidden_layers": layers, "image_size": img}
    if name.startswith("vit"):
        return T.ViTConfig(**kw)
    if name.startswith("deit"):
        return T.DeiTConfig(**kw, num_labels=5)
    dino = {k: v for k, v in kw.items() if k != "intermediate_size"}
    if name == "dinov2":
        return T.Dinov2Config(**dino, mlp_ratio=2, layerscale_value=0.5, num_labels=5)
    if name == "dinov2_reg":
        return T.Dinov2WithRegistersConfig(**dino, mlp_ratio=2, num_register_tokens=4)
    if name == "clip_vision":
        return T.CLIPVisionConfig(**kw)
    if name == "clip":
        text = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
        return T.CLIPConfig(text_config={**text, "num_hidden_layers": 1}, vision_config=kw)
    if name == "siglip":
        return T.SiglipVisionConfig(**kw)
    if name == "dinov3":  # no random rescaling of the rotary positions in training
        return T.DINOv3ViTConfig(**kw, num_register_tokens=4, pos_embed_rescale=None)
    if name == "aimv2":
        return T.Aimv2VisionConfig(**kw)
    raise KeyError(name)


CLASSES = {
    "vit": T.ViTModel,
    "vit_cls": T.ViTForImageClassification,
    "deit_teacher": T.DeiTForImageClassificationWithTeacher,
    "dinov2": T.Dinov2Model,
    "dinov2_cls": T.Dinov2ForImageClassification,
    "dinov2_reg": T.Dinov2WithRegistersModel,
    "clip_vision": T.CLIPVisionModel,
    "clip": T.CLIPModel,
    "siglip": T.SiglipVisionModel,
    "dinov3": T.DINOv3ViTModel,
    "aimv2": T.Aimv2VisionModel,
}
PROTECTED = {
    "vit": 1,
    "deit_teacher": 2,
    "dinov2": 1,
    "dinov2_reg": 5,
    "clip_vision": 1,
    "siglip": 0,
    "dinov3": 5,
    "aimv2": 0,
}
IMPLS = ["eager", "sdpa"]


def make(name: str = "vit", impl: str = "sdpa", layers: int = 2, img: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = _config(name.removesuffix("_cls"), layers, img)
    return CLASSES[name]._from_config(config, attn_implementation=impl).eval()


def images(batch: int = 2, img: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


def run(model: torch.nn.Module, x: torch.Tensor, **kw) -> dict:
    """Every tensor the model returns for ``x`` (image half of CLIPModel), by output name."""
    fn = model.get_image_features if isinstance(model, T.CLIPModel) else model
    out = fn(x, output_hidden_states=True, **kw)
    flat = {}
    for key, value in out.items():
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            flat[f"{key}{i}"] = t
    return flat


def vision(model: torch.nn.Module) -> torch.nn.Module:
    for attr in ("vit", "deit", "dinov2", "vision_model"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return model


def token_counts(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens leaving each layer (from ``output_hidden_states``)."""
    with torch.no_grad():
        hidden = vision(model)(x, output_hidden_states=True).hidden_states
    return [h.shape[1] for h in hidden[1:]]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize(
    "options",
    [{"method": "atc", "r": 0}, {"method": "tome", "keep_rate": 1.0, "reduction_loc": (0, 1)}],
    ids=["r0", "keep_rate1"],
)
def test_zero_reduction_is_exact_for_every_class(name, impl, options):
    # trace_source/unmerge: the patched owner and layers run (not transformers' own forwards)
    model = make(name, impl)
    x = images()
    with torch.no_grad():
        ref = run(model, x)
        atc_patch.apply_patch(model, prop_attn=True, trace_source=True, unmerge=True, **options)
        assert_same(run(model, x), ref)


@pytest.mark.parametrize("name", ["vit_cls", "deit_teacher", "dinov2_reg", "clip", "siglip"])
def test_output_capture_works_patched_and_after_remove(name):
    model = make(name, "eager")
    x = images()
    with torch.no_grad():
        ref = run(model, x, output_attentions=True)  # transformers installs its capture hooks
        attrs = [sorted(vars(m)) for m in model.modules()]
        atc_patch.apply_patch(model, method="tome", r=[5], unmerge=True)
        got = run(model, x, output_attentions=True)
        assert [t.shape for k, t in got.items() if k.startswith("attentions")][-1][-1] == (
            [t.shape for k, t in ref.items() if k.startswith("attentions")][-1][-1] - 5
        )  # the last layer's attention is over the reduced tokens
        atc_patch.remove_patch(model)
        assert_same(run(model, x, output_attentions=True), ref)  # no hook left twice
    assert [sorted(vars(m)) for m in model.modules()] == attrs


def test_settings_read_back():
    model = make("dinov2_reg")
    atc_patch.apply_patch(model, method="atc", linkage="single", keep_rate=0.7, reduction_loc=[1])
    s = atc_patch.patch_settings(model)
    assert s["family"] == "transformers" and s["method"] == "atc" and s["linkage"] == "single"
    assert s["keep_rate"] == 0.7 and s["reduction_loc"] == (1,) and s["protected"] == 5
    assert s["prop_attn"] is True and s["trace_source"] is False and s["unmerge"] is False


# --- schedules, protected tokens ----------------------------------------------------------------


@pytest.mark.parametrize("options, expected", SCHEDULES, ids=SCHEDULE_IDS)
def test_token_counts_follow_schedule(options, expected):
    model = make("vit", layers=4, img=64)
    atc_patch.apply_patch(model, **options)
    assert token_counts(model, images(img=64)) == expected


@pytest.mark.parametrize("name", list(PROTECTED))
def test_protected_tokens_keep_their_slots(name):
    model = make(name, layers=3, img=64)
    p = PROTECTED[name]
    x = images(img=64)
    with torch.no_grad():
        plain = vision(model)(x).last_hidden_state
    atc_patch.apply_patch(model, method="atc", r=10, trace_source=True)
    assert token_counts(model, x) == [p + 64 - 10 * i for i in (1, 2, 3)]
    with torch.no_grad():
        out = vision(model)(x)
    assert torch.isfinite(out.last_hidden_state).all()
    assert out.pooler_output is None or torch.isfinite(out.pooler_output).all()
    source = last_source(model)
    assert torch.equal(source.sum(1), torch.ones(2, p + 64))  # a partition of the input
    assert torch.equal(source[:, :p, :p], torch.eye(p).expand(2, -1, -1))
    assert source[:, :p, p:].sum() == 0 and source[:, p:, :p].sum() == 0
    if p:  # the protected tokens changed (they attended to merged tokens) but stayed first
        assert not torch.allclose(out.last_hidden_state[:, :p], plain[:, :p], atol=1e-4)


def test_dynamic_input_size_schedule_per_forward():
    model = make("dinov2", layers=2, img=32)
    atc_patch.apply_patch(model, method="atc", keep_rate=0.5, reduction_loc=(0,))
    assert token_counts(model, images(img=32)) == [1 + 8, 1 + 8]
    assert token_counts(model, images(img=48)) == [1 + 18, 1 + 18]  # interpolated positions


# --- ToMe reference ---------------------------------------------------------------------------


def _attend(q, k, v, scale, size):
    attn = (q @ k.transpose(-2, -1)) * scale
    if size is not None:
        attn = attn + size.log()[:, None, None, :, 0]
    return attn.softmax(dim=-1) @ v


def _reference_layers(layers, x, r, class_token, distill_token, kind):
    """ToMe's patch as written for timm, on transformers' layers: ``(x, size)`` at the end."""
    size = None
    for layer in layers:
        if kind == "vit":
            norm1, attn, norm2 = layer.layernorm_before, layer.attention, layer.layernorm_after
        elif kind == "dino":
            norm1, attn, norm2 = layer.norm1, layer.attention, layer.norm2
        else:
            norm1, attn, norm2 = layer.layer_norm1, layer.self_attn, layer.layer_norm2
        out_proj = attn.out_proj if kind == "clip" else attn.o_proj
        h = norm1(x)
        b, n, c = h.shape
        q, k, v = (
            p(h).reshape(b, n, -1, attn.head_dim).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        y = out_proj(_attend(q, k, v, attn.head_dim**-0.5, size).transpose(1, 2).reshape(b, n, -1))
        x = x + (layer.layer_scale1(y) if kind == "dino" else y)
        merge = bipartite_soft_matching(k.mean(1), r, class_token, distill_token)
        x, size = merge_wavg(merge, x, size)
        y = layer.mlp(norm2(x))
        x = x + (layer.layer_scale2(y) if kind == "dino" else y)
    return x, size


def _reference_siglip_head(head, x, size):
    """SigLIP's attention-pooling head with ``log(size)`` on its keys, by hand."""
    mha = head.attention
    b, n, c = x.shape
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    heads, d = mha.num_heads, c // mha.num_heads
    q = (head.probe.expand(b, 1, c) @ wq.T + bq).reshape(b, 1, heads, d).transpose(1, 2)
    k = (x @ wk.T + bk).reshape(b, n, heads, d).transpose(1, 2)
    v = (x @ wv.T + bv).reshape(b, n, heads, d).transpose(1, 2)
    h = mha.out_proj(_attend(q, k, v, d**-0.5, size).transpose(1, 2).reshape(b, 1, c))
    return (h + head.mlp(head.layernorm(h)))[:, 0]


@pytest.mark.parametrize("name", ["vit_cls", "deit_teacher", "dinov2", "clip_vision", "siglip"])
def test_tome_reproduces_published_algorithm(name):
    model = make(name, "eager", layers=3, img=64)
    x = images(img=64)
    vm = vision(model)
    with torch.no_grad():
        if name == "siglip":
            emb = vm.embeddings(x)
            h, size = _reference_layers(vm.encoder.layers, emb, 8, False, False, "clip")
            last = vm.post_layernorm(h)
            expected = (last, _reference_siglip_head(vm.head, last, size))
        elif name == "clip_vision":
            emb = vm.pre_layrnorm(vm.embeddings(x))
            h, _ = _reference_layers(vm.encoder.layers, emb, 8, True, False, "clip")
            expected = (h, vm.post_layernorm(h[:, 0]))
        elif name == "dinov2":
            h, _ = _reference_layers(vm.encoder.layer, vm.embeddings(x), 8, True, False, "dino")
            last = vm.layernorm(h)
            expected = (last, last[:, 0])
        else:
            distill = name == "deit_teacher"
            h, _ = _reference_layers(vm.layers, vm.embeddings(x), 8, True, distill, "vit")
            last = vm.layernorm(h)
            head = model.cls_classifier if distill else model.classifier
            expected = (last, head(last[:, 0]))
        atc_patch.apply_patch(model, method="tome", r=8, prop_attn=True)
        out = vm(x)
        logits = model(x).cls_logits if name == "deit_teacher" else None
        logits = model(x).logits if name == "vit_cls" else logits
        got = (out.last_hidden_state, out.pooler_output if logits is None else logits)
    assert got[0].shape[1] == PROTECTED.get(name.removesuffix("_cls"), 1) + 64 - 24
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# --- unmerge, attention backends, masks -------------------------------------------------------


def test_unmerge_restores_the_full_grid():
    model = make("dinov2_reg", layers=3, img=64)
    x = images(img=64)
    atc_patch.apply_patch(model, method="atc", r=10, trace_source=True)
    with torch.no_grad():
        reduced = model(x)
        source = last_source(model)
        atc_patch.apply_patch(model, method="atc", r=10, unmerge=True)
        full = model(x, output_hidden_states=True)
    assert full.last_hidden_state.shape == (2, 5 + 64, 32)
    expected = source.transpose(1, 2) @ reduced.last_hidden_state  # each input: its cluster
    torch.testing.assert_close(full.last_hidden_state, expected)
    assert torch.equal(full.pooler_output, reduced.pooler_output)
    assert [h.shape[1] for h in full.hidden_states[1:]] == [59, 49, 39]  # layers stay reduced


def test_siglip_pooling_head_uses_the_sizes():
    model = make("siglip", layers=3, img=64)
    x = images(img=64)
    with torch.no_grad():
        atc_patch.apply_patch(model, method="atc", r=10)
        biased = model(x).pooler_output
        atc_patch.apply_patch(model, method="atc", r=10, unmerge=True)
        unmerged = model(x).pooler_output  # attending to every copy = log(size) on the keys
        atc_patch.apply_patch(model, method="atc", r=10, prop_attn=False)
        plain = model(x)
        no_bias = model.head(plain.last_hidden_state)
    torch.testing.assert_close(biased, unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain.pooler_output, no_bias)
    assert not torch.allclose(biased, no_bias, atol=1e-4)


def test_eager_and_sdpa_agree_and_take_the_bias(monkeypatch):
    outs = {}
    for impl in IMPLS:
        model = make("vit", impl, layers=3)
        atc_patch.apply_patch(model, method="tome", r=4)
        with torch.no_grad():
            outs[impl] = model(images()).last_hidden_state
    torch.testing.assert_close(outs["eager"], outs["sdpa"], rtol=1e-4, atol=1e-5)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(images())
    assert masks[0] is None and masks[1].shape == (2, 1, 1, 13)  # log(size) after layer 0
    assert torch.allclose(masks[1].exp().sum(-1), torch.full((2, 1, 1), 17.0))


def test_padding_mask_follows_the_merges():
    model = make("vit", "sdpa", layers=3)
    x = images()
    keep = torch.ones(2, 17, dtype=torch.long)
    atc_patch.apply_patch(model, method="atc", r=4)
    with torch.no_grad():
        no_mask = model(x).last_hidden_state
        full = model(x, attention_mask=keep).last_hidden_state
        keep[1, 9:] = 0
        masked = model(x, attention_mask=keep).last_hidden_state
    torch.testing.assert_close(full, no_mask, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(masked).all() and not torch.allclose(masked[1], no_mask[1], atol=1e-4)


def test_backend_without_bias_is_refused():
    model = make("vit", "sdpa")
    config = model.config  # as loaded with flash attention (not installed here)
    config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="prop_attn=True.*flash_attention_2"):
        atc_patch.apply_patch(model, method="tome", r=4)
    atc_patch.apply_patch(model, method="tome", r=4, prop_attn=False)  # no bias: fine
    flex = make("vit", "flex_attention")  # its tensor masks crash on the CPU, so refused too
    with pytest.raises(ValueError, match="'flex_attention' cannot take"):
        atc_patch.apply_patch(flex, method="atc", r=4)
    # a backend switched to after patching: refused at the first layer that needs the bias
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def no_mask(module, q, k, v, attention_mask, **kw):
        return sdpa_attention_forward(module, q, k, v, None, **kw)

    T.AttentionInterface.register("atc_test_no_mask", no_mask)
    model = make("clip_vision", "sdpa")
    atc_patch.apply_patch(model, method="tome", r=4)
    model.config._attn_implementation_internal = "atc_test_no_mask"
    with pytest.raises(ValueError, match="'atc_test_no_mask' cannot take"), torch.no_grad():
        model(images())


# --- training, compile ----------------------------------------------------------------


def _loss(model, x):
    out = run(model, x)
    return sum(t.float().logsumexp(-1).sum() for k, t in out.items() if "hidden_states" not in k)


def _grads(model, x):
    model.zero_grad()
    _loss(model, x).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize(
    "name", ["vit_cls", "deit_teacher", "dinov2_reg", "clip_vision", "siglip", "dinov3", "aimv2"]
)
@pytest.mark.parametrize("method", ["atc", "tome"])
def test_gradients_reach_every_trained_parameter(name, method):
    model = make(name, "eager").train()
    x = images()
    trained = _grads(model, x)
    atc_patch.apply_patch(model, method=method, r=4)
    assert _grads(model, x) == trained
    untrained = {n for n, _ in model.named_parameters()} - trained
    assert all("mask_token" in n for n in untrained)  # only used with bool_masked_pos


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["vit_cls", "dinov2", "siglip", "dinov3", "aimv2"])
def test_bf16_autocast_training_step(name, impl):
    model = make(name, impl).train()
    atc_patch.apply_patch(model, method="atc", r=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, images())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["dinov2", "dinov3"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches(name, reentrant):
    model = make(name).train()
    atc_patch.apply_patch(model, method="atc", r=4)
    x = images()
    out = model(x).last_hidden_state
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    out_ckpt = model(x).last_hidden_state
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for p, g in zip([p for p in model.parameters() if p.grad is not None], grads):
        torch.testing.assert_close(p.grad, g)


def test_fullgraph_compile_with_the_siglip_pooling_head():
    torch._dynamo.reset()
    model = make("siglip")  # the owner with the pooling head (the contract table has ViT)
    atc_patch.apply_patch(model, method="tome", r=4)
    x = images()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled.last_hidden_state, eager.last_hidden_state)
    torch.testing.assert_close(compiled.pooler_output, eager.pooler_output)


def test_clip_text_half_is_untouched():
    model = make("clip")
    ids = torch.tensor([[1, 5, 7, 2], [1, 3, 2, 0]])
    with torch.no_grad():
        text = model.get_text_features(ids).pooler_output
        atc_patch.apply_patch(model, method="atc", r=4)
        out = model(input_ids=ids, pixel_values=images())
        assert torch.equal(model.get_text_features(ids).pooler_output, text)
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.logits_per_image).all()


def test_base_size_smoke():
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(num_labels=10)).eval()  # ViT-B/16, 224 px
    atc_patch.apply_patch(model, method="atc", r=8)
    x = torch.randn(1, 3, 224, 224)
    assert token_counts(model, x) == [197 - 8 * (i + 1) for i in range(12)]
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


# --- one patch, the library's own mechanisms -----------------------------------------------------


@pytest.mark.parametrize("name", ["vit_cls", "clip"])
def test_the_task_model_and_its_encoder_are_one_patch(name):
    model = make(name)
    encoder = vision(model)
    x = images()
    with torch.no_grad():
        ref = run(model, x)
        atc_patch.apply_patch(encoder, method="atc", r=4, trace_source=True)
        assert atc_patch.patch_settings(model) == atc_patch.patch_settings(encoder) is not None
        run(model, x)
        assert torch.equal(last_source(model), last_source(encoder))
        atc_patch.apply_patch(model, method="tome", r=2)  # re-patched through the task model
        assert atc_patch.patch_settings(encoder)["method"] == "tome"
        atc_patch.remove_patch(model)
        assert atc_patch.patch_settings(encoder) is None
        assert_same(run(model, x), ref)
        atc_patch.apply_patch(model, method="atc", r=4)
        atc_patch.remove_patch(encoder)
        assert atc_patch.patch_settings(model) is None
        assert_same(run(model, x), ref)


def test_an_unreachable_keep_rate_target_warns_once_with_what_is_kept():
    # 64 patches, keep 0.1 @ 0, 1, 2: targets 6/0/0; ToMe halves at most: 32 -> 16 -> 8.
    model = make("vit", layers=4, img=64)
    with pytest.warns(UserWarning, match="this transformers ViTModel .* keeps 32/16/8 .* 6/0/0"):
        atc_patch.apply_patch(model, method="tome", keep_rate=0.1, reduction_loc=(0, 1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at apply_patch, for this input size
        assert token_counts(model, images(img=64)) == [33, 17, 9, 9]


def test_save_pretrained_writes_the_hub_key_layout(tmp_path):
    from safetensors import safe_open

    model = make("vit_cls")
    model.save_pretrained(tmp_path / "plain")
    atc_patch.apply_patch(model, method="atc", r=4)
    model.save_pretrained(tmp_path / "patched")

    def keys(folder):
        with safe_open(str(tmp_path / folder / "model.safetensors"), "pt") as f:
            return sorted(f.keys())

    assert keys("patched") == keys("plain")
    assert "vit.encoder.layer.0.attention.attention.key.weight" in keys("patched")
    loaded = T.ViTForImageClassification.from_pretrained(tmp_path / "patched").eval()
    atc_patch.remove_patch(model)
    with torch.no_grad():
        assert torch.equal(loaded(images()).logits, model(images()).logits)


@pytest.mark.parametrize("name", ["vit_cls", "dinov2", "clip", "siglip"])
def test_forward_signatures_are_the_models_own(name):
    model = make(name)
    before = [str(inspect.signature(m.forward)) for m in model.modules()]
    atc_patch.apply_patch(model, method="atc", r=4)
    assert [str(inspect.signature(m.forward)) for m in model.modules()] == before
    # what transformers' own test_forward_signature expects of these classes
    first = ["input_ids", "pixel_values", "attention_mask", "position_ids"]
    want = first if name == "clip" else ["pixel_values"]
    for m in (model, vision(model)):
        assert list(inspect.signature(m.forward).parameters)[: len(want)] == want
        want = ["pixel_values"]


# --- bad inputs ---------------------------------------------------------------------------------


def test_other_models_and_layers_raise_type_error():
    small = {**SMALL, "num_hidden_layers": 1, "image_size": 32}
    others = [
        T.ViTForMaskedImageModeling(T.ViTConfig(**small, encoder_stride=8)),
        T.Dinov2Backbone(
            T.Dinov2Config(**{k: v for k, v in small.items() if k != "intermediate_size"})
        ),
        T.CLIPTextModel(
            T.CLIPTextConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64)
        ),
    ]
    for model in others:
        assert root_of(model) is None
        with pytest.raises(TypeError, match="SiglipVisionModel"):
            atc_patch.apply_patch(model, method="atc", r=1)
    model = make("vit")
    model.layers[1] = T.models.deit.modeling_deit.DeiTLayer(model.config)
    with pytest.raises(TypeError, match="layer 1 .* DeiTLayer"):
        atc_patch.apply_patch(model, method="atc", r=1)
    assert atc_patch.patch_settings(model) is None
