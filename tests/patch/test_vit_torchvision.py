"""The torchvision family: schedules, ToMe's published algorithm, source maps, training.

A small ViT config, random init; what every family must do is in ``test_contract.py``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision.models.vision_transformer as tv_vit
from _tome_reference import torchvision_vit_forward

import atc_patch
from atc_patch.patch.vit import last_source


def make(layers: int = 3, image: int = 32) -> torch.nn.Module:
    """ViT with 8 px patches (16 patches at 32 px) and a class token."""
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
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the classifier
    return model.eval()


def images(batch: int = 2, image: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))


def token_counts(model, x) -> list[int]:
    counts: list[int] = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: counts.append(o.x.shape[1]))
        for blk in model.encoder.layers
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize(
    "options",
    [{"method": "atc", "r": 0}, {"method": "tome", "keep_rate": 1.0, "reduction_loc": (0, 2)}],
    ids=["r0", "keep_rate1"],
)
def test_zero_reduction_through_the_patched_layers_is_exact(options):
    # trace_source=True: the patched encoder runs (not torchvision's own), removing nothing.
    model = make()
    x = images()
    with torch.no_grad():
        ref = model(x)
        atc_patch.apply_patch(model, prop_attn=True, trace_source=True, **options)
        assert torch.equal(model(x), ref)
    assert last_source(model).shape == (2, 17, 17)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"method": "atc", "linkage": "complete", "r": [10, 0, 20]}, [55, 55, 35]),
        ({"method": "atc", "keep_rate": 0.5, "reduction_loc": (0, 2)}, [33, 33, 17]),
        ({"method": "tome", "r": 12}, [53, 41, 29]),
        ({"method": "dpcknn", "r": 4, "r_schedule": "decrease"}, [57, 53, 53]),
    ],
    ids=["atc-list", "atc-keep_rate", "tome", "dpcknn-decrease"],
)
def test_token_counts_follow_schedule(options, expected):
    model = make(image=64)
    atc_patch.apply_patch(model, **options)
    assert token_counts(model, images(image=64)) == expected


def test_tome_reproduces_published_algorithm():
    model = make(image=64)
    x = images(image=64)
    with torch.no_grad():
        expected = torchvision_vit_forward(model, x, [8, 8, 8])
        unpatched = model(x)
        atc_patch.apply_patch(model, method="tome", r=8, prop_attn=True)
        got = model(x)
    assert not torch.allclose(expected, unpatched, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_trace_source_and_settings():
    model = make(image=64)
    atc_patch.apply_patch(model, method="atc", linkage="average", r=10, trace_source=True)
    assert atc_patch.patch_settings(model)["family"] == "torchvision"
    with torch.no_grad():
        model(images(image=64))
    source = last_source(model)
    assert source.shape == (2, 65 - 30, 65)
    assert torch.equal(source.sum(1), torch.ones(2, 65))
    assert torch.equal(source[:, 0], torch.eye(65)[0].expand(2, -1))


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_training_step(method):
    model = make().train()
    x = images()
    model(x).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    atc_patch.apply_patch(model, method=method, r=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().sum()
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == trained
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
