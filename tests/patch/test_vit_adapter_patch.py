"""The ViT-Adapter family: patching a built backbone (or the detector holding it), the
reduction settings it validates through ``AdapterConfig``, keep_rate targets, settings read back.

The same rules as the ViT patches (atc_patch.schedule): a location after one whose target ToMe
could not reach aims at its own target; ``keep_rate_mode="reference"`` keeps the reference
code's ``int(ratio * T)`` of the tokens actually left. A tiny 4-block adapter, 64-128 px.
What every family must do is in ``test_contract.py``.
"""

from __future__ import annotations

import warnings

import mmcv.ops  # noqa: F401
import mmdet  # noqa: F401
import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

import atc_patch
from atc_patch.mmdet import expected_token_counts, make_reduction

register_all_modules(init_default_scope=True)

TINY = dict(
    embed_dim=32,
    depth=4,
    num_heads=2,
    deform_num_heads=2,
    conv_inplane=8,
    init_values=0.5,
    interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
)


def _backbone(**kw):
    torch.manual_seed(0)
    return MODELS.build(dict(type="ViTAdapter", **TINY, **kw)).eval()


def _tokens_into_blocks(m, img) -> list[int]:
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _, a: seen.append(a[0].shape[1])) for b in m.blocks]
    try:
        with torch.no_grad():
            m(img)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _kept(method: str, ratios, num: int, mode: str) -> list[int]:
    """Independent rule: targets compound from the grid; ToMe removes at most half."""
    out, target, t = [], num, num
    for ratio in ratios:
        target = max(1, int(ratio * target))
        want = target if mode == "target" else max(1, int(ratio * t))
        r = t - want
        if method == "tome":
            r = min(r, t // 2)
        t -= max(r, 0)
        out.append(t)
    return out


@pytest.mark.parametrize("mode", ["target", "reference"])
@pytest.mark.parametrize("ratios", [[0.3, 0.9, 0.9], [0.25, 0.25, 0.25], [0.6, 0.3, 0.8]])
def test_token_counts_follow_the_targets(mode, ratios):
    red = make_reduction(
        "tome", reduction_loc=[0, 1, 2], reduction_ratio=ratios, depth=4, keep_rate_mode=mode
    )
    counts = expected_token_counts(red, 4, 64)
    assert counts[1:] == _kept("tome", ratios, 64, mode)


def test_tome_after_a_capped_location_aims_at_its_target():
    img = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    m = _backbone()
    ratios = [0.3, 0.9, 0.9]
    with pytest.warns(UserWarning, match="keeps 32/17/15 .* where 19/17/15 were asked"):
        atc_patch.apply_patch(m, method="tome", reduction_loc=[0, 1, 2], reduction_ratio=ratios)
        assert _tokens_into_blocks(m, img) == [64, 32, 17, 15]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per input size
        assert _tokens_into_blocks(m, img) == [64, 32, 17, 15]
    with pytest.warns(UserWarning, match="keeps 32/28/25"):
        atc_patch.apply_patch(
            m,
            method="tome",
            reduction_loc=[0, 1, 2],
            reduction_ratio=ratios,
            keep_rate_mode="reference",
        )
        assert _tokens_into_blocks(m, img) == [64, 32, 28, 25]
    assert atc_patch.patch_settings(m)["keep_rate_mode"] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ATC reaches every target
        atc_patch.apply_patch(m, method="atc", reduction_loc=[0, 1, 2], reduction_ratio=ratios)
        assert _tokens_into_blocks(m, img) == [64, 19, 17, 15]
    atc_patch.remove_patch(m)
    assert m.reduction is None


def test_options_are_checked_like_the_vit_patches():
    m = _backbone()
    with pytest.raises(ValueError, match=r"valid options: \['keep_rate_mode', 'linkage'"):
        atc_patch.apply_patch(m, method="atc", reduction_ratio=0.5, speed=1)
    with pytest.raises(ValueError, match="takes reduction_ratio .* not keep_rate"):
        atc_patch.apply_patch(m, method="atc", keep_rate=0.5, reduction_loc=[1])
    for bad, match in [
        (dict(reduction_loc=(1.5, 2.7)), "non-integral 1.5"),
        (dict(reduction_ratio="0.5"), "reduction_ratio must be a number"),
        (dict(reduction_ratio=True), "reduction_ratio must be a number"),
        (dict(proportional_attn=1), "proportional_attn must be True or False"),
        (dict(keep_rate_mode="delta"), r"keep_rate_mode must be one of \('target', 'reference'\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            atc_patch.apply_patch(
                m, method="atc", **({"reduction_ratio": 0.5, "reduction_loc": [1]} | bad)
            )
    assert atc_patch.patch_settings(m) is None
    # prop_attn, the ViT patches' name, is the same option
    atc_patch.apply_patch(m, method="atc", reduction_ratio=0.5, reduction_loc=[1], prop_attn=False)
    assert atc_patch.patch_settings(m)["proportional_attn"] is False


def test_patching_a_backbone_and_a_detector():
    m = _backbone()
    atc_patch.apply_patch(
        m, method="atc", linkage="complete", reduction_ratio=[0.5, 0.5], reduction_loc=[1, 3]
    )
    red = m.active_reduction()
    assert red.linkage == "complete" and red.reduction_ratio == (0.5, 0.5)
    assert m.reduction is None  # what it was built with; the patch overrides it
    assert m.reduction_settings()["method"] == "atc"
    assert atc_patch.patch_settings(m)["family"] == "vit_adapter"
    img = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert _tokens_into_blocks(m, img) == [16, 16, 8, 8]
    atc_patch.remove_patch(m)
    assert m.active_reduction() is None and atc_patch.patch_settings(m) is None
    assert m.reduction_settings()["method"] is None

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _backbone(method="tome", reduction_loc=[2], reduction_ratio=0.9)

    det = Detector()
    atc_patch.apply_patch(det, method="atc", reduction_ratio=0.5, reduction_loc=[0])
    red = det.backbone.active_reduction()
    assert red.method == "atc" and red.reduction_loc == (0,)
    assert atc_patch.patch_settings(det.backbone) == atc_patch.patch_settings(det)
    atc_patch.remove_patch(det)
    assert det.backbone.active_reduction().method == "tome"  # back to what it was built with
    for bad, match in [
        (dict(method="atc", reduction_ratio=0.5, keep_rate=0.5), "valid"),
        (dict(method="kmedoids", reduction_ratio=0.5), "'atc', 'tome'"),
        (dict(method="atc", reduction_loc=[1]), "reduction_ratio is required"),
        (dict(method="atc", reduction_ratio=0.5), r"in \[0, 4\)"),  # default [3, 6, 9]
    ]:
        with pytest.raises(ValueError, match=match):
            atc_patch.apply_patch(m, **bad)
    assert m.active_reduction() is None


def test_settings_report_the_values_in_use():
    m = _backbone()
    atc_patch.apply_patch(
        m, method="atc", reduction_loc=np.int64(2), reduction_ratio=np.float32(0.5)
    )
    s = atc_patch.patch_settings(m)
    assert s["reduction_loc"] == (2,) and type(s["reduction_loc"][0]) is int
    assert s["reduction_ratio"] == (0.5,) and type(s["reduction_ratio"][0]) is float
    assert s["proportional_attn"] is True and s["keep_rate_mode"] == "target"
    assert s["method"] == "atc" and s["linkage"] == "average"
    atc_patch.apply_patch(m, method="tome", reduction_loc=3.0, reduction_ratio=[0.75])
    assert atc_patch.patch_settings(m)["reduction_loc"] == (3,)
