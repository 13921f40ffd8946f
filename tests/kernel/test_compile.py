"""``torch.compile(fullgraph=True)`` of patched models: one graph (ATC is a custom op with a
fake implementation), outputs equal to eager mode, on the CPU."""

from __future__ import annotations

import pytest
import timm
import torch

import atc_patch


def _vit() -> torch.nn.Module:
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, depth=2, embed_dim=48, num_heads=2, num_classes=5
    )
    return model.eval()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_atc_vit_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    model = _vit()
    atc_patch.apply_patch(model, method="atc", r=[6, 5], linkage="complete", trace_source=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        want_source = atc_patch.last_source(model)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        got = compiled(x)
        assert atc_patch.last_source(model).shape == (2, 17 - 11, 17)
        assert torch.equal(atc_patch.last_source(model), want_source)
        got2 = compiled(x.flip(0))  # same graph, new data
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got2, model(x.flip(0)), atol=1e-5, rtol=1e-4)


def test_cluster_tokens_compiles_to_the_custom_op() -> None:
    torch._dynamo.reset()

    def labels(metric: torch.Tensor) -> torch.Tensor:
        return atc_patch.cluster_tokens(metric, 7, linkage="single", protected=1).labels

    metric = torch.randn(3, 20, 8)
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    got = torch.compile(labels, backend=capture, fullgraph=True)(metric)
    assert torch.equal(got, labels(metric))
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("atc_patch.atc_labels" in t for t in targets), targets
