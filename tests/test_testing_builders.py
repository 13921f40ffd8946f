"""atc_patch.testing: one build_tiny_pipeline for every kind, offline, seeded."""

from __future__ import annotations

import pytest
import torch

import atc_patch
from atc_patch.testing import PIPELINE_KINDS, build_tiny_pipeline, tiny_pipeline_call_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_sdxl_pipeline_runs_and_patches() -> None:
    """The SDXL pipeline: two text encoders whose hidden states make the UNet's cross-attention
    width, pooled text and time ids for its added conditioning; patched, it still runs."""
    pipe = build_tiny_pipeline("tiny-sdxl")
    kw = dict(prompt="a cat", height=128, width=128, num_inference_steps=2, output_type="np")
    kw.update(tiny_pipeline_call_kwargs("tiny-sdxl"))
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert plain.shape == (1, 128, 128, 3)
    atc_patch.apply_patch(pipe, method="atc", ratio=0.5)
    merged = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert merged.shape == plain.shape and not (merged == plain).all()


def test_same_seed_same_weights_and_bad_kind() -> None:
    a, b = build_tiny_pipeline("tiny-sd", seed=3), build_tiny_pipeline(seed=3)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    other = build_tiny_pipeline("tiny-sd", seed=4).unet.state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in a.unet.state_dict().items())
    with pytest.raises(ValueError, match="tiny-sdxl"):
        build_tiny_pipeline("sdxl")
    assert PIPELINE_KINDS == (
        "tiny-sd",
        "tiny-sdxl",
        "tiny-flux",
        "tiny-sd3",
        "tiny-pixart",
        "tiny-dit",
        "tiny-chroma",
    )
