"""The ViT families (timm, torchvision) with the rest of PyTorch and timm.

Defaults that would do nothing, keep_rate targets, numbers, ``torch.save`` / EMA and the
per-thread trace slot, attention hooks, ``torch.jit``, ``torch.export`` and ``torch.fx``
(timm's feature extraction), ``forward_intermediates`` / ``features_only``. Tiny random-init
models from real configs.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision.models.vision_transformer as tv_vit

import atc_patch
from atc_patch.patch.vit import last_source


def vit(depth: int = 3, img: int = 32, **kw) -> torch.nn.Module:
    """timm ViT with 8 px patches: 16 patches at 32 px, 64 at 64 px, plus a class token."""
    torch.manual_seed(0)
    name = kw.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(
        name, pretrained=False, depth=depth, img_size=img, patch_size=8, num_classes=10, **kw
    ).eval()


def tv(layers: int = 3, image: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tv_vit.VisionTransformer(
        image_size=image,
        patch_size=8,
        num_layers=layers,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    torch.nn.init.normal_(model.heads.head.weight)
    return model.eval()


def images(batch: int = 2, img: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


def blocks_of(model):
    return model.encoder.layers if hasattr(model, "encoder") else model.blocks


def token_counts(model, x) -> list[int]:
    counts: list[int] = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: counts.append(o.x.shape[1]))
        for blk in blocks_of(model)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


BUILDERS = {"timm": vit, "torchvision": tv}


# --- a patch that would reduce nothing ---------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("kwargs", [{}, {"method": "atc"}, {"method": "tome", "linkage": None}])
def test_no_r_or_keep_rate_is_an_error(family, kwargs):
    model = BUILDERS[family]()
    with pytest.raises(ValueError, match=r"r=\.\.\. .*keep_rate=\.\.\. with reduction_loc"):
        atc_patch.apply_patch(model, **kwargs)
    assert atc_patch.patch_settings(model) is None
    atc_patch.apply_patch(model, r=0)  # an explicit empty schedule is fine
    assert atc_patch.patch_settings(model)["r"] == 0


# --- keep_rate targets -----------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
def test_tome_keep_rate_below_half_aims_at_the_targets(family):
    # 64 patches, keep 0.3 @ 0, 1, 2: targets 19/5/1; ToMe halves at most: 32 -> 16 -> 8.
    model = BUILDERS[family](4, 64)
    x = images(img=64)
    with pytest.warns(UserWarning, match="VisionTransformer .* keeps 32/16/8 .* where 19/5/1"):
        atc_patch.apply_patch(model, method="tome", keep_rate=0.3, reduction_loc=(0, 1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at apply_patch, for this input size
        assert token_counts(model, x) == [33, 17, 9, 9]
    # Lower keep rates never keep more tokens.
    finals = []
    for k in (0.6, 0.5, 0.4, 0.3, 0.2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atc_patch.apply_patch(model, method="tome", keep_rate=k, reduction_loc=(1, 2, 3))
            finals.append(token_counts(model, x)[-1])
    assert finals == sorted(finals, reverse=True)  # main: 14, 9, 12, 15, 21
    # The reference code's fixed deltas, on request: after the capped first block, block 1
    # removes int(64*.3) - int(64*.09) = 14, block 2 removes 4.
    with pytest.warns(UserWarning, match="keep_rate_mode='reference'"):
        atc_patch.apply_patch(
            model,
            method="tome",
            keep_rate=0.3,
            reduction_loc=(0, 1, 2),
            keep_rate_mode="reference",
        )
    assert token_counts(model, x) == [33, 19, 15, 15]
    assert atc_patch.patch_settings(model)["keep_rate_mode"] == "reference"
    # ATC reaches every target without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atc_patch.apply_patch(model, method="atc", keep_rate=0.3, reduction_loc=(0, 1, 2))
        assert token_counts(model, x) == [20, 6, 2, 2]


def test_dynamic_input_size_warns_for_the_size_it_sees():
    model = vit(2, 32, dynamic_img_size=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atc_patch.apply_patch(model, method="tome", keep_rate=0.5, reduction_loc=(0,))
        assert token_counts(model, images(img=32)) == [9, 9]
    # 3 x 3 patches: target 4, ToMe merges at most 4 of 9 -> 5.
    with pytest.warns(UserWarning, match="of 9 tokens it keeps 5 .* where 4 were asked"):
        assert token_counts(model, images(img=24)) == [6, 6]


# --- numbers ----------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": [1.9, 2.9]}, "non-integral 1.9"),
        ({"keep_rate": 0.7, "reduction_loc": (1.5, 2.7)}, "non-integral 1.5"),
        ({"keep_rate": "0.7", "reduction_loc": (1,)}, "keep_rate must be a number"),
        ({"keep_rate": True, "reduction_loc": (1,)}, "keep_rate must be a number"),
        ({"r": 2, "prop_attn": 1}, "prop_attn must be True or False"),
        ({"r": 2, "trace_source": "yes"}, "trace_source must be True or False"),
    ],
)
def test_bad_numbers_are_rejected(family, kwargs, match):
    model = BUILDERS[family]()
    with pytest.raises(ValueError, match=match):
        atc_patch.apply_patch(model, method="atc", **kwargs)
    assert atc_patch.patch_settings(model) is None


@pytest.mark.parametrize("family", list(BUILDERS))
def test_integral_numbers_are_accepted_and_reported_plainly(family):
    model = BUILDERS[family]()
    x = images()
    with torch.no_grad():
        atc_patch.apply_patch(model, method="atc", r=4)
        ref = model(x)
        for r in (4.0, np.int64(4), torch.tensor(4)):
            atc_patch.apply_patch(model, method="atc", r=r)
            s = atc_patch.patch_settings(model)
            assert s["r"] == 4 and type(s["r"]) is int
            assert torch.equal(model(x), ref)
    atc_patch.apply_patch(model, method="atc", keep_rate=np.float64(0.5), reduction_loc=np.int64(1))
    s = atc_patch.patch_settings(model)
    assert s["reduction_loc"] == (1,) and type(s["reduction_loc"][0]) is int
    assert s["keep_rate"] == 0.5 and type(s["keep_rate"]) is float
    assert token_counts(model, x) == [17, 9, 9]
    atc_patch.apply_patch(model, method="atc", r=(np.int64(1), 2.0))
    assert atc_patch.patch_settings(model)["r"] == [1, 2]


# --- torch.save, the trace slot of copies, EMA --------------------------------------------------


def _roundtrips(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return {
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buf, weights_only=False),
        "deepcopy": copy.deepcopy(model),
    }


@pytest.mark.parametrize("family", list(BUILDERS))
def test_a_copy_has_its_own_trace_slot(family):
    model = BUILDERS[family]()
    atc_patch.apply_patch(model, method="atc", r=4, trace_source=True)
    x = images()
    with torch.no_grad():
        ref = model(x)
        for how, other in _roundtrips(model).items():
            with pytest.raises(ValueError, match="no forward"):
                last_source(other)
            assert torch.equal(other(x), ref), how
            assert torch.equal(last_source(other), last_source(model))
            other(images(batch=1, seed=5))
            assert last_source(model).shape[0] == 2  # the original's map is untouched
            atc_patch.remove_patch(other)
            assert atc_patch.patch_settings(other) is None


def test_timm_model_ema_v3_with_trace_source():
    from timm.utils import ModelEmaV3

    model = vit()
    atc_patch.apply_patch(model, method="atc", r=4, trace_source=True)
    ema = ModelEmaV3(model, decay=0.5)
    x = images()
    with torch.no_grad():
        assert torch.equal(ema.module(x), model(x))
    ema.update(model)
    assert atc_patch.patch_settings(ema.module)["trace_source"] is True


# --- hooks on attention ------------------------------------------------------------------


def test_attention_hooks_see_a_tensor():
    model = vit()
    seen = []
    model.blocks[1].attn.register_forward_hook(lambda m, i, o: seen.append(o))
    x = images()
    with torch.no_grad():
        model(x)
        atc_patch.apply_patch(model, method="atc", r=4)
        model(x)
    assert [type(o) for o in seen] == [torch.Tensor, torch.Tensor]
    assert seen[0].shape == (2, 17, 192) and seen[1].shape == (2, 13, 192)


# --- jit, export, fx ---------------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
def test_jit_says_it_is_not_supported(family):
    model = BUILDERS[family](2)
    atc_patch.apply_patch(model, method="atc", r=4)
    x = images()
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported"):
        torch.jit.script(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        with pytest.raises(RuntimeError, match="torch.jit.trace is not supported"):
            torch.jit.trace(model, (x,), check_trace=False)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(model(x), ref)  # the model still works after the refused calls


@pytest.mark.parametrize("family", list(BUILDERS))
def test_a_patch_that_removes_nothing_traces(family):
    model = BUILDERS[family](2)
    atc_patch.apply_patch(model, method="atc", r=0)
    x = images()
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # check_trace=False: torchvision's MultiheadAttention fails trace's check unpatched too
        traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), ref)


def test_export_refused_when_reducing_and_works_when_not():
    # In a fresh process: torch.export breaks fork-based autograd (the DDP tests) in this one.
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_export_worker.py")
    out = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=600)
    lines = out.stdout.split("\n")
    for family in BUILDERS:
        for check in ("refused", "identity"):
            assert f"{family} {check} ok" in lines, out.stdout + out.stderr


def test_fx_feature_extraction_without_reduction_and_a_clear_refusal_with_it():
    from timm.models import create_feature_extractor, get_graph_node_names

    model = vit(3)
    x = images()
    with torch.no_grad():
        ref, ref_block = model(x), model.blocks[1](model.blocks[0](model._pos_embed(
            model.patch_embed(x))))  # fmt: skip
    _, plain_nodes = get_graph_node_names(model)
    atc_patch.apply_patch(model, method="atc", r=0)
    _, nodes = get_graph_node_names(model)
    assert nodes == plain_nodes  # the same graph, node for node
    extractor = create_feature_extractor(model, {nodes[-1]: "out", "blocks.1": "block1"})
    with torch.no_grad():
        feats = extractor(x)
        assert torch.equal(feats["out"], ref) and torch.equal(feats["block1"], ref_block)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), ref)
    atc_patch.apply_patch(model, method="atc", r=2)
    for trace in (
        lambda: create_feature_extractor(model, {nodes[-1]: "out"}),
        lambda: torch.fx.symbolic_trace(model),
    ):
        with pytest.raises(RuntimeError, match="torch.fx symbolic tracing is not supported"):
            trace()


# --- forward_intermediates, get_intermediate_layers, features_only ----------------------


def test_forward_intermediates_without_reduction_equal_timm():
    model = vit(3, name="deit_tiny_distilled_patch16_224")
    x = images()
    calls = [
        dict(indices=2),
        dict(indices=[0, 2], output_fmt="NLC", norm=True, return_prefix_tokens=True),
        dict(indices=1, intermediates_only=True, stop_early=True),
        dict(indices=3, output_dict=True, return_prefix_tokens=True),
    ]
    with torch.no_grad():
        refs = [model.forward_intermediates(x, **c) for c in calls]
        layers = model.get_intermediate_layers(x, n=2, reshape=True)
        atc_patch.apply_patch(model, method="atc", r=0)
        gots = [model.forward_intermediates(x, **c) for c in calls]
        assert _equal(model.get_intermediate_layers(x, n=2, reshape=True), layers)
    for ref, got in zip(refs, gots):
        assert _equal(got, ref)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize(
    "name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)]
)
def test_forward_intermediates_are_reduced_and_unmerged_to_the_grid(name, prefix):
    model = vit(3, 64, name=name)
    x = images(img=64)
    with torch.no_grad():
        plain = model.forward_intermediates(x, indices=[1, 2], norm=True)[1]
        atc_patch.apply_patch(model, method="atc", r=10, trace_source=True)
        final, inter = model.forward_intermediates(x, indices=[1, 2], norm=True)
        source = last_source(model)  # (B, N', N0)
        feats = model.forward_features(x)
    assert final.shape == (2, 64 + prefix - 30, 192) and torch.equal(final, feats)
    assert [t.shape for t in inter] == [t.shape for t in plain] == [(2, 192, 8, 8)] * 2
    # The last intermediate is the final (normed) tokens, each copied to the patches it covers.
    unmerged = source.transpose(1, 2) @ final  # (B, N0, C)
    want = unmerged[:, prefix:].reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(inter[1], want)
    assert not torch.allclose(inter[0], plain[0], atol=1e-3)  # reduced, not the plain run
    # A merged patch shares its token: 64 patches hold 64 - 20 distinct features at block 1.
    distinct = torch.unique(inter[0][0].flatten(1).T, dim=0).shape[0]
    assert distinct == 64 - 20
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, n=1)
        nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert layers[0].shape == (2, 64, 192) and torch.equal(layers[0], nlc[0])
    torch.testing.assert_close(model.norm(layers[0]), unmerged[:, prefix:])


def test_features_only_model_is_patched_through_its_vit():
    torch.manual_seed(0)
    fm = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        features_only=True,
        depth=4,
        out_indices=(1, 3),
        img_size=64,
        patch_size=8,
    ).eval()
    x = images(img=64)
    with torch.no_grad():
        plain = fm(x)
        atc_patch.apply_patch(fm, method="atc", r=0)
        assert _equal(fm(x), plain)
        atc_patch.apply_patch(fm, method="tome", r=8, trace_source=True)
        reduced = fm(x)
        assert atc_patch.patch_settings(fm)["method"] == "tome"
        assert last_source(fm).shape == (2, 65 - 8 * 4, 65)
    assert [t.shape for t in reduced] == [t.shape for t in plain]
    assert not torch.allclose(reduced[1], plain[1], atol=1e-3)
    atc_patch.remove_patch(fm)
    assert atc_patch.patch_settings(fm) is None and atc_patch.patch_settings(fm.model) is None
    with torch.no_grad():
        assert _equal(fm(x), plain)


# ---------------------------------------------------------------------------------------------
# the same weights in timm and transformers: the same merges, the same tokens
# ---------------------------------------------------------------------------------------------
def _vit_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A transformers ``ViTModel`` and a timm ``VisionTransformer`` holding the same weights
    (float64, 4 blocks, 64 patches)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).double().eval()
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2, num_classes=0
    ).double().eval()  # fmt: skip
    emb = hf.embeddings
    state = {
        "cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
        "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
        "norm.weight": hf.layernorm.weight, "norm.bias": hf.layernorm.bias,
    }  # fmt: skip
    for i, layer in enumerate(hf.layers):
        a = layer.attention
        for name, ours, theirs in (
            ("norm1", "layernorm_before", None), ("norm2", "layernorm_after", None),
            ("attn.proj", None, a.o_proj), ("mlp.fc1", None, layer.mlp.fc1),
            ("mlp.fc2", None, layer.mlp.fc2),
        ):  # fmt: skip
            module = theirs if theirs is not None else getattr(layer, ours)
            state[f"blocks.{i}.{name}.weight"] = module.weight
            state[f"blocks.{i}.{name}.bias"] = module.bias
        projections = (a.q_proj, a.k_proj, a.v_proj)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([p.weight for p in projections])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([p.bias for p in projections])
    tm.load_state_dict({k: v.detach() for k, v in state.items()})
    return hf, tm


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
def test_timm_and_transformers_with_the_same_weights_merge_alike(method):
    """Both families run the same kernel on the same keys: the same partitions and tokens
    (a user switching libraries gets the same reduced model)."""
    hf, tm = _vit_pair()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(hf(x).last_hidden_state, tm.forward_features(x), atol=1e-12)
        atc_patch.apply_patch(hf, method, r=10, trace_source=True)
        atc_patch.apply_patch(tm, method, r=10, trace_source=True)
        ours, theirs = hf(x).last_hidden_state, tm.forward_features(x)
    assert ours.shape == theirs.shape == (2, 65 - 40, 64)
    assert torch.equal(last_source(hf), last_source(tm))
    assert torch.allclose(ours, theirs, atol=1e-12)
