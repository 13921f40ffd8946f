"""The timm family: every model variant, schedules, ToMe's published algorithm, source maps,
attention masks, training, threads. Tiny random-init models from timm's configs.

What every family must do (bit-identical remove, re-apply, copies, bad options, compile, meta)
is in ``test_contract.py``.
"""

from __future__ import annotations

import threading

import pytest
import timm
import torch
from _tome_reference import timm_vit_forward

import atc_patch
from atc_patch.patch.vit import last_source, merge_attn_mask

from ._cases import SCHEDULE_IDS, SCHEDULES

# name -> (timm model, overrides); 32 px images with 8 px patches: 16 patches.
MODELS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "mae_avg_pool": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "registers": ("vit_base_patch16_reg4_gap_256", {"embed_dim": 64, "num_heads": 2}),
    "layerscale": ("deit3_small_patch16_224", {"embed_dim": 64, "num_heads": 2}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "dynamic_img_size": ("vit_tiny_patch16_224", {"dynamic_img_size": True}),
    "unfused_attn": ("vit_tiny_patch16_224", {}),
}


def make(key: str = "vit", depth: int = 2, img: int = 32, **extra) -> torch.nn.Module:
    name, kw = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(
        name,
        pretrained=False,
        depth=depth,
        img_size=img,
        patch_size=8,
        num_classes=10,
        **{**kw, **extra},
    )
    if key == "unfused_attn":
        for blk in model.blocks:
            blk.attn.fused_attn = False
    return model.eval()


def images(batch: int = 2, img: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


def token_counts(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Number of tokens leaving each block in one forward."""
    counts: list[int] = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: counts.append(o.x.shape[1]))
        for blk in model.blocks
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize(
    "options",
    [
        {"method": "atc", "r": 0},
        {"method": "tome", "keep_rate": 1.0, "reduction_loc": (0, 1)},
    ],
    ids=["r0", "keep_rate1"],
)
def test_zero_reduction_is_exact_for_every_variant(key, options):
    # trace_source=True: the patched blocks run (not timm's own forward), and reduce nothing.
    model = make(key)
    x = images()
    with torch.no_grad():
        ref = model(x)
        atc_patch.apply_patch(model, prop_attn=True, trace_source=True, **options)
        assert torch.equal(model(x), ref)
        if key == "dynamic_img_size":
            x2 = images(img=48)
            atc_patch.remove_patch(model)
            ref2 = model(x2)
            atc_patch.apply_patch(model, trace_source=True, **options)
            assert torch.equal(model(x2), ref2)


def test_settings_read_back():
    model = make()
    atc_patch.apply_patch(
        model, method="atc", linkage="single", keep_rate=0.7, reduction_loc=[0, 1], prop_attn=False
    )
    s = atc_patch.patch_settings(model)
    assert s["method"] == "atc" and s["family"] == "timm" and s["linkage"] == "single"
    assert s["keep_rate"] == 0.7 and s["reduction_loc"] == (0, 1)
    assert s["prop_attn"] is False and s["trace_source"] is False and s["protected"] == 1


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options, expected", SCHEDULES, ids=SCHEDULE_IDS)
def test_token_counts_follow_schedule(options, expected):
    model = make(depth=4, img=64)
    atc_patch.apply_patch(model, **options)
    assert token_counts(model, images(img=64)) == expected


@pytest.mark.parametrize(
    "key, prefix", [("deit_distilled", 2), ("registers", 4), ("mae_avg_pool", 0)]
)
def test_prefix_tokens_are_kept(key, prefix):
    model = make(key, depth=3, img=64)
    atc_patch.apply_patch(model, method="atc", r=10, trace_source=True)
    x = images(img=64)
    assert token_counts(model, x) == [prefix + 64 - 10 * i for i in (1, 2, 3)]
    with torch.no_grad():
        model(x)
    source = last_source(model)
    if prefix:
        assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix).expand(2, -1, -1))
        assert source[:, :prefix, prefix:].sum() == 0


def test_dynamic_img_size_schedule_per_forward():
    model = make("dynamic_img_size", depth=2)
    atc_patch.apply_patch(model, method="atc", keep_rate=0.5, reduction_loc=(0,))
    assert token_counts(model, images(img=32)) == [1 + 8, 1 + 8]
    assert token_counts(model, images(img=48)) == [1 + 18, 1 + 18]


# --- ToMe ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, class_token, distill_token",
    [
        ("vit", True, False),
        ("deit_distilled", True, True),
        ("mae_avg_pool", False, False),
    ],
)
def test_tome_reproduces_published_algorithm(key, class_token, distill_token):
    model = make(key, depth=3, img=64)
    x = images(img=64)
    rs = [8, 8, 8]
    with torch.no_grad():
        expected = timm_vit_forward(model, x, rs, class_token, distill_token)
        unpatched = model(x)
        atc_patch.apply_patch(model, method="tome", r=8, prop_attn=True)
        got = model(x)
    assert not torch.allclose(expected, unpatched, atol=1e-3)  # the reference does reduce
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --- every method, source maps, attention masks ---------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"method": "atc", "linkage": "single"},
        {"method": "atc", "linkage": "complete"},
        {"method": "atc", "linkage": "average"},
        {"method": "tome"},
        {"method": "kmedoids"},
        {"method": "dpcknn"},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_trace_source_is_a_partition(options):
    model = make("layerscale", depth=3, img=64, init_values=0.5)
    atc_patch.apply_patch(model, r=12, trace_source=True, **options)
    with torch.no_grad():
        out = model(images(img=64))
    assert torch.isfinite(out).all()
    source = last_source(model)
    assert source.shape == (2, 65 - 36, 65)
    assert torch.equal(source.sum(1), torch.ones(2, 65))  # every input token in one output
    assert (source.sum(2) >= 1).all()
    assert torch.equal(source[:, 0], torch.eye(65)[0].expand(2, -1))  # class token alone


def test_trace_source_identity_without_reduction():
    model = make()
    atc_patch.apply_patch(model, r=0, trace_source=True)
    with pytest.raises(ValueError, match="no forward"):
        last_source(model)
    with torch.no_grad():
        model(images())
    assert torch.equal(last_source(model), torch.eye(17).expand(2, -1, -1))


def test_attn_mask_is_honoured():
    model = make(depth=3)
    x = images()
    mask = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(3)) > 0.3
    mask |= torch.eye(17, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, attn_mask=mask)
        atc_patch.apply_patch(model, r=0)
        assert torch.equal(model(x, attn_mask=mask), ref)
        atc_patch.apply_patch(model, method="atc", r=4)
        no_mask = model(x)
        full = model(x, attn_mask=torch.ones(2, 1, 17, 17, dtype=torch.bool))
        torch.testing.assert_close(full, no_mask, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x, attn_mask=mask), no_mask, atol=1e-4)
        with pytest.raises(ValueError, match="is_causal"):
            model(x, is_causal=True)


def test_fused_attention_is_kept(monkeypatch):
    model = make(depth=2)
    atc_patch.apply_patch(model, method="atc", r=4, prop_attn=True)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(images())
    assert masks[0] is None  # block 0: nothing merged yet
    assert masks[1].dtype == torch.float32 and masks[1].shape == (2, 1, 1, 13)  # log(size)
    assert torch.allclose(masks[1].exp().sum(-1), torch.full((2, 1, 1), 17.0))


def test_merge_attn_mask_semantics():
    plan = atc_patch.cluster_tokens(torch.randn(2, 6, 4), r=2, method="atc", protected=1)
    mask = torch.rand(2, 3, 6, 6) > 0.5
    merged = merge_attn_mask(mask, plan)
    assert merged.shape == (2, 3, 4, 4) and merged.dtype == torch.bool
    lab = plan.labels
    for b in range(2):
        for i in range(4):
            for j in range(4):
                rows, cols = (lab[b] == i).nonzero()[:, 0], (lab[b] == j).nonzero()[:, 0]
                want = mask[b][:, rows][:, :, cols].flatten(1).any(1)
                assert torch.equal(merged[b, :, i, j], want)


# --- training, concurrency -------------------------------------------------------------


def _grads(model, x):
    model.zero_grad()
    model(x).logsumexp(-1).sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_gradients_reach_every_trained_parameter(method):
    model = make("layerscale", depth=2, init_values=0.5, drop_path_rate=0.1).train()
    x = images()
    trained = _grads(model, x)
    atc_patch.apply_patch(model, method=method, r=4, prop_attn=True)
    assert _grads(model, x) == trained == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_bf16_autocast_training_step(method):
    model = make("qk_norm", depth=2).train()
    atc_patch.apply_patch(model, method=method, r=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images()).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_checkpointing_matches():
    model = make(depth=2).train()
    atc_patch.apply_patch(model, method="atc", r=4)
    x = images()
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_ddp_two_processes_identical_params(tmp_path):
    from _ddp_worker import run

    # spawn, not fork: a forked child cannot run autograd once the parent's autograd engine has
    # started its worker threads (which other tests in the same pytest process do).
    torch.multiprocessing.start_processes(
        run,
        args=(2, str(tmp_path / "init"), str(tmp_path), "timm"),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)


def test_concurrent_forwards_do_not_share_state():
    model = make("dynamic_img_size", depth=3)
    atc_patch.apply_patch(model, method="atc", r=3, trace_source=True)
    inputs = [images(batch=1 + i % 3, img=32 + 16 * (i % 2), seed=i) for i in range(6)]
    with torch.no_grad():
        expected = []
        for x in inputs:
            expected.append((model(x), last_source(model)))
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(3):
                    out = model(inputs[i])
                    results.setdefault(i, []).append((out, last_source(model)))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (out, source) in enumerate(expected):
        for got_out, got_source in results[i]:
            torch.testing.assert_close(got_out, out)
            assert torch.equal(got_source, source)


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_values_name_the_valid_choices():
    model = make()
    with pytest.raises(ValueError, match="'atc', 'tome', 'kmedoids', 'dpcknn'"):
        atc_patch.apply_patch(model, method="magic", r=2)
    with pytest.raises(ValueError, match="linkage"):
        atc_patch.apply_patch(model, method="tome", linkage="average", r=2)
    with pytest.raises(ValueError, match="single"):
        atc_patch.apply_patch(model, method="atc", linkage="ward", r=2)
    with pytest.raises(ValueError, match="valid options.*ratio is the diffusion"):
        atc_patch.apply_patch(model, method="atc", ratio=0.5)
    with pytest.raises(ValueError, match="reduction_loc"):
        atc_patch.apply_patch(model, method="atc", keep_rate=0.5)
    with pytest.raises(ValueError, match="out of range"):
        atc_patch.apply_patch(model, method="atc", keep_rate=0.5, reduction_loc=(1, 2))
    with pytest.raises(ValueError, match="prop_attn"):
        atc_patch.apply_patch(model, method="atc", prop_attn="yes", r=2)
    with pytest.raises(ValueError, match="unmerge is a transformers option"):
        atc_patch.apply_patch(model, method="atc", r=2, unmerge=True)
    assert atc_patch.patch_settings(model) is None  # nothing half-applied


def test_other_block_types_raise_type_error():
    post_norm = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        depth=1,
        img_size=32,
        patch_size=8,
        block_fn=timm.models.vision_transformer.ResPostBlock,
    )
    with pytest.raises(TypeError, match="ResPostBlock"):
        atc_patch.apply_patch(post_norm, method="atc", r=1)
    assert atc_patch.patch_settings(post_norm) is None
