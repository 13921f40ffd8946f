"""Rotary ViTs: timm ``Eva`` (EVA-02, DINOv3, PE, RoPE-ViT, mixed RoPE, post-norm, register-only,
no prefix, grouped-query attention), rotary ``NaFlexVit`` and transformers ``DINOv3ViTModel``.

What is particular to them: the rotary tables follow every merge (a cluster of identical tokens
at positions with identical rotary rows gives exactly the unmerged attention, and gives it only
if the tables follow the plan), every variant is exact at zero reduction and after
``remove_patch``, ``forward_intermediates`` keeps timm's shapes, the pooling weighs tokens by
their size, and an unreachable ``keep_rate`` warns. The family contract (copies, compile, meta,
options) is ``test_contract.py``'s, for one Eva, one NaFlexVit and DINOv3.
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers as T

import atc_patch
import atc_patch.patch.vit as core
from atc_patch.kernel.plan import MergePlan
from atc_patch.patch.vit import last_source

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (timm model, overrides); 32 px images with 8 px patches: a 4 x 4 grid.
EVA = {
    "eva02": ("eva02_base_patch14_224", {}),  # SwiGLU, 'cat' rotary, absolute positions
    "dinov3": ("vit_base_patch16_dinov3", {}),  # class + 4 registers, rotate-half rotary
    "pe_core": ("vit_pe_core_base_patch16_224", {}),  # AttentionRope, attention pooling
    "rope_mixed": ("vit_base_patch16_rope_mixed_224", {}),  # one learned table per block
    "post_norm": ("eva02_enormous_patch14_clip_224", {}),  # EvaBlockPostNorm, no rotary
    "registers_only": ("vit_betwixt_patch16_rope_reg4_gap_256", {}),  # 4 registers, no class
    "no_prefix": ("vit_pe_core_gigantic_patch14_448", {}),  # no prefix token at all
    "gqa_qk_norm": (
        "vit_base_patch16_rope_224",
        {"qk_norm": True, "qkv_fused": False, "num_kv_heads": 1},
    ),
    "unfused": ("vit_base_patch16_dinov3", {}),  # explicit softmax attention
    "naflex": ("vit_base_patch16_dinov3", {"use_naflex": True}),  # NaFlexVit with EvaBlocks
}
METHODS = ("atc", "tome", "kmedoids", "dpcknn")


def make(key: str, depth: int = 3) -> torch.nn.Module:
    name, kw = EVA[key]
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, depth=depth, embed_dim=32, num_heads=2, img_size=32,
        patch_size=8, num_classes=10, **kw,
    ).eval()  # fmt: skip
    for blk in model.blocks:
        if key == "unfused":
            blk.attn.fused_attn = False
        for scale in (getattr(blk, "gamma_1", None), getattr(blk, "gamma_2", None)):
            if scale is not None:  # layer scales at 1: at 1e-5 every block is all but identity
                torch.nn.init.ones_(scale)
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    return out["patches"] if isinstance(out, dict) else out


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(EVA))
@torch.no_grad()
def test_zero_reduction_and_remove_are_exact_for_every_variant(key):
    # trace_source=True: the patched blocks run (not timm's own forward) and reduce nothing
    model = make(key)
    x = images()
    ref, ref_features = model(x), features(model, x)
    ref_inter = model.forward_intermediates(x, intermediates_only=True)
    atc_patch.apply_patch(model, "atc", r=0, trace_source=True)
    assert torch.equal(model(x), ref) and torch.equal(features(model, x), ref_features)
    inter = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(inter, ref_inter))
    atc_patch.apply_patch(model, "tome", r=3)
    assert features(model, x).shape[1] == ref_features.shape[1] - 9
    atc_patch.remove_patch(model)
    assert torch.equal(model(x), ref) and torch.equal(features(model, x), ref_features)


@pytest.mark.parametrize("key", ["dinov3", "rope_mixed", "naflex"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_every_method_runs_and_keeps_the_prefix_first(key, method):
    model = make(key)
    p = model.num_prefix_tokens
    atc_patch.apply_patch(model, method, r=3, trace_source=True)
    out = features(model, images())
    assert out.shape[1] == p + 16 - 9 and torch.isfinite(out).all()
    source = last_source(model)
    assert torch.equal(source.sum(1), torch.ones(2, p + 16))  # a partition of the input
    assert torch.equal(source[:, :p, :p], torch.eye(p).expand(2, -1, -1))


# --- the rotary tables follow the plan ---------------------------------------------------------

# Patches copied onto others (4 x 4 grid, raster order): (source, copy).
PAIRS = ((0, 5), (2, 11), (7, 12))


def _duplicated_images() -> torch.Tensor:
    x = images()
    for src, dst in PAIRS:
        (sy, sx), (dy, dx) = (8 * i for i in divmod(src, 4)), (8 * i for i in divmod(dst, 4))
        x[:, :, dy : dy + 8, dx : dx + 8] = x[:, :, sy : sy + 8, sx : sx + 8]
    return x


def _copied_rows() -> torch.Tensor:
    """Row index giving each copy its source's rotary row."""
    index = torch.arange(16)
    for src, dst in PAIRS:
        index[dst] = src
    return index


def _same_rows_for_copies(module: torch.nn.Module, name: str) -> None:
    """Make ``module.<name>`` (a rotary table maker) give each copy its source's rows."""
    make_table = getattr(module, name)
    index = _copied_rows()

    def rows(*args, **kwargs):
        out = make_table(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(t[..., index, :] for t in out)
        return out[..., index, :]

    setattr(module, name, rows)


def _truncated(plan, pos, size, protected):
    """A position merge that ignores the plan (the first rows kept): must break the result."""
    m = plan.num_out - protected
    return tuple(t[..., :m, :] for t in pos) if isinstance(pos, tuple) else pos[..., :m, :]


def _check_copies_merge_exactly(model, run, tokens_of, monkeypatch) -> None:
    """Merging each copy with its source in the first block (sizes 2, proportional attention)
    gives the unmerged tokens back; with tables that do not follow the plan it does not."""
    x = _duplicated_images()
    with torch.no_grad():
        ref = tokens_of(run(model, x))
        atc_patch.apply_patch(model, "atc", r=[len(PAIRS)], trace_source=True)
        out = tokens_of(run(model, x))
        source = last_source(model)
        assert out.shape[1] == ref.shape[1] - len(PAIRS)
        merged = source.sum(-1) > 1  # exactly the copies with their sources
        assert merged.sum() == 2 * len(PAIRS)
        unmerged = out.gather(1, source.argmax(1)[..., None].expand(-1, -1, out.shape[-1]))
        torch.testing.assert_close(unmerged, ref, rtol=1e-4, atol=1e-5)
        monkeypatch.setattr(core, "merge_positions", _truncated)
        wrong = tokens_of(run(model, x))
        assert not torch.allclose(wrong, out, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("key", ["dinov3", "rope_mixed", "naflex"])
def test_a_cluster_of_copies_attends_as_the_unmerged_tokens(key, monkeypatch):
    model = make(key)
    _same_rows_for_copies(model.rope, "get_embed")
    _check_copies_merge_exactly(model, lambda m, x: m.forward_features(x), lambda t: t, monkeypatch)


def _hf_dinov3() -> torch.nn.Module:
    cfg = T.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=32, patch_size=8, num_register_tokens=4,
    )  # fmt: skip
    torch.manual_seed(0)
    return T.DINOv3ViTModel._from_config(cfg, attn_implementation="sdpa").eval()


def test_transformers_dinov3_copies_attend_as_the_unmerged_tokens(monkeypatch):
    model = _hf_dinov3()
    _same_rows_for_copies(model.rope_embeddings, "forward")
    _check_copies_merge_exactly(
        model, lambda m, x: m(pixel_values=x), lambda o: o.last_hidden_state, monkeypatch
    )


def test_merge_positions_is_the_size_weighted_mean_of_each_cluster():
    gen = torch.Generator().manual_seed(0)
    b, p, m, d = 2, 2, 6, 4
    labels = torch.tensor([[0, 1, 2, 3, 2, 4, 4, 2], [0, 1, 2, 2, 3, 3, 4, 4]])
    plan = MergePlan(labels, 5)
    size = torch.rand(b, p + m, 1, generator=gen) + 0.5
    table = torch.randn(m, d, generator=gen)
    per_head = torch.randn(b, 3, m, d, generator=gen)
    cos, sin, heads = core.merge_positions(plan, (table, table.neg(), per_head), size, p)
    assert cos.shape == (b, 1, 3, d) and heads.shape == (b, 3, 3, d)
    for i in range(b):
        for slot in range(p, 5):
            members = (labels[i, p:] == slot).nonzero()[:, 0]
            w = size[i, p + members]
            expected = (table[members] * w).sum(0) / w.sum()
            torch.testing.assert_close(cos[i, 0, slot - p], expected)
            torch.testing.assert_close(sin[i, 0, slot - p], -expected)
            expected = (per_head[i][:, members] * w).sum(1) / w.sum()
            torch.testing.assert_close(heads[i, :, slot - p], expected)


# --- outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["eva02", "dinov3", "naflex"])
@torch.no_grad()
def test_forward_intermediates_keep_the_unpatched_shapes(key):
    model = make(key)
    x = images()
    calls = [
        dict(indices=2),
        dict(indices=[0, 2], output_fmt="NLC", return_prefix_tokens=True, norm=True),
        dict(indices=1, stop_early=True, intermediates_only=True),
    ]
    ref = [model.forward_intermediates(x, **kw) for kw in calls]
    atc_patch.apply_patch(model, "atc", r=3)
    for kw, before in zip(calls, ref):
        after = model.forward_intermediates(x, **kw)
        shapes = torch.utils._pytree.tree_map(lambda t: t.shape, (before, after))
        final = model.num_prefix_tokens + 16 - (3 if kw.get("stop_early") else 9)
        if kw.get("intermediates_only"):
            assert shapes[0] == shapes[1]
        else:
            assert shapes[1][0][1] == final and shapes[0][1] == shapes[1][1]


@pytest.mark.parametrize("key", ["eva02", "pe_core", "no_prefix"])
@torch.no_grad()
def test_pooling_weighs_tokens_by_their_size(key):
    model = make(key)
    x = images()
    atc_patch.apply_patch(model, "atc", r=3, trace_source=True)
    tokens = model.forward_features(x)
    size = last_source(model).sum(-1, keepdim=True)
    p = model.num_prefix_tokens
    if model.global_pool == "avg":
        pooled = (tokens[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)
    else:  # attention pooling over every token, log(size) on its keys
        pooled = model.attn_pool(tokens, attn_mask=size.log().transpose(1, 2)[:, None])
    expected = model.head(model.fc_norm(pooled))
    torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(model(x), model.forward_head(tokens), rtol=0, atol=1e-9)


def test_an_unreachable_keep_rate_target_warns():
    model = make("dinov3")
    with pytest.warns(UserWarning, match="keep"):
        atc_patch.apply_patch(model, "tome", keep_rate=0.1, reduction_loc=(0,))
    with pytest.warns(UserWarning, match="keep"):
        atc_patch.apply_patch(_hf_dinov3(), "tome", keep_rate=0.1, reduction_loc=(0,))


def test_other_eva_blocks_raise_type_error():
    model = make("dinov3")
    model.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="EvaBlock with EvaAttention or AttentionRope"):
        atc_patch.apply_patch(model, "atc", r=2)
    assert atc_patch.patch_settings(model) is None


@torch.no_grad()
def test_fullgraph_compile_with_mixed_tables_and_attention_pooling():
    for key in ("rope_mixed", "pe_core"):
        torch._dynamo.reset()
        model = make(key)
        atc_patch.apply_patch(model, "tome", r=3)
        x = images()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))


def _trained(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("key", ["dinov3", "rope_mixed", "pe_core"])
def test_training_with_checkpointing_and_bf16(key):
    model = make(key).train()
    x = images()
    trained = _trained(model, x)
    atc_patch.apply_patch(model, "atc", r=3)
    grads = _trained(model, x)
    assert grads.keys() == trained.keys()  # every parameter the unpatched model trains
    model.set_grad_checkpointing(True)
    for name, grad in _trained(model, x).items():
        torch.testing.assert_close(grad, grads[name], msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bias in the autocast dtype
        loss = model(x).float().logsumexp(-1).sum()
    loss.backward()
    assert torch.isfinite(loss)
