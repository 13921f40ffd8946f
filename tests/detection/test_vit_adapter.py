"""ViT-Adapter with token reduction in mmdet 3: registry, exactness, token counts, Mask R-CNN.

Small inputs (64-128 px, random init, CPU) keep the whole file well under a minute or two.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mmcv.ops  # noqa: F401
import mmdet  # noqa: F401
import numpy as np
import pytest
import torch
from mmdet.registry import DATASETS, MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402

import atc_patch  # noqa: E402
from atc_patch.mmdet import CONFIGS, ViTAdapter, config_path  # noqa: E402

register_all_modules(init_default_scope=True)

ROOT = Path(__file__).resolve().parents[2]
# ViT-Adapter-T (init_values > 0 so the injectors contribute).
T_ARGS = dict(embed_dim=192, depth=12, num_heads=3, deform_num_heads=6, init_values=0.5)
# A narrow, 4-block ViT-Adapter for the tests that do not need the paper's sizes.
TINY_ARGS = dict(
    embed_dim=64,
    depth=4,
    num_heads=2,
    deform_num_heads=2,
    conv_inplane=16,
    init_values=0.5,
    interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
)


def _backbone(args: dict = T_ARGS, **kwargs) -> ViTAdapter:
    torch.manual_seed(0)
    return MODELS.build(dict(type="ViTAdapter", **args, **kwargs)).eval()


@pytest.fixture(scope="module")
def vit_t() -> ViTAdapter:
    """One ViT-Adapter-T built through the registry, shared (tests reset its reduction)."""
    return _backbone()


def _image(size: int = 64, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _plain_forward(m: ViTAdapter, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ViT-Adapter forward written out without any token bookkeeping."""
    import torch.nn.functional as F

    from atc_patch.mmdet.adapter import deform_inputs

    b, _, hi, wi = img.shape
    levels = [(hi // 8, wi // 8), (hi // 16, wi // 16), (hi // 32, wi // 32)]
    c1, c2, c3, c4 = m.spm(img)
    c = torch.cat([c2 + m.level_embed[0], c3 + m.level_embed[1], c4 + m.level_embed[2]], 1)
    x, (h, w) = m.patch_embed(img)
    x = m.pos_drop(x + m._pos_embed(h, w))
    inject, extract = deform_inputs((h, w), levels, img.device)
    for stage, (first, last) in zip(m.interactions, m.stages):
        x = stage.injector(x, c, inject)
        for i in range(first, last + 1):
            x = m.blocks[i](x)[0]
        c = stage.extract(c, x, extract, levels)
    sizes = [hh * ww for hh, ww in levels]
    c2, c3, c4 = (
        p.transpose(1, 2).reshape(b, -1, hh, ww) for p, (hh, ww) in zip(c.split(sizes, 1), levels)
    )
    c1 = m.up(c2) + c1
    x3 = x.transpose(1, 2).reshape(b, -1, h, w)
    c1 = c1 + F.interpolate(x3, scale_factor=4, mode="bilinear", align_corners=False)
    c2 = c2 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
    c4 = c4 + F.interpolate(x3, scale_factor=0.5, mode="bilinear", align_corners=False)
    return m.norm1(c1), m.norm2(c2), m.norm3(c3 + x3), m.norm4(c4)


def _record_tokens(m: ViTAdapter) -> tuple[list[int], list[int], list]:
    """Hooks recording tokens into each block, and grid sizes seen by injectors/extractors."""
    blocks: list[int] = []
    spatial: list[int] = []
    handles = [
        b.register_forward_pre_hook(lambda _, a: blocks.append(a[0].shape[1])) for b in m.blocks
    ]
    for stage in m.interactions:
        handles.append(
            stage.injector.register_forward_pre_hook(lambda _, a: spatial.append(a[0].shape[1]))
        )
        extractors = [stage.extractor, *(stage.extra_extractors or ())]
        for e in extractors:
            handles.append(e.register_forward_pre_hook(lambda _, a: spatial.append(a[1].shape[1])))
    return blocks, spatial, handles


# ---------------------------------------------------------------------------- backbone


def test_backbone_builds_from_packaged_config_through_registry():
    assert {"vit-adapter-t-3x", "vit-adapter-s-3x", "tomeatc-adapter-t-0.5x-ftune"} <= set(CONFIGS)
    cfg = Config.fromfile(config_path("vit-adapter-s-3x"))
    assert cfg.custom_imports.imports == ["atc_patch.mmdet"]  # what registers the backbone
    assert MODELS.get("ViTAdapter") is ViTAdapter
    cfg.model.backbone.norm_cfg = dict(type="BN")
    backbone = MODELS.build(cfg.model.backbone)
    assert type(backbone) is ViTAdapter
    assert (backbone.embed_dim, len(backbone.blocks), backbone.blocks[0].attn.num_heads) == (
        384,
        12,
        6,
    )
    assert backbone.reduction is None
    reduced = Config.fromfile(config_path("tomeatc-adapter-t-0.5x-ftune")).model.backbone
    assert reduced.type == "ViTAdapter" and reduced.embed_dim == 192
    assert (reduced.method, reduced.linkage, reduced.reduction_ratio) == ("atc", "average", 0.7)
    assert reduced.reduction_loc == [3, 6, 9]


def test_vit_weights_load_from_a_timm_deit_state_dict():
    import timm

    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)  # random init
    result = ViTAdapter(**T_ARGS).load_state_dict(deit.state_dict(), strict=False)
    vit_prefixes = ("blocks.", "patch_embed.", "pos_embed")
    assert not [k for k in result.missing_keys if k.startswith(vit_prefixes)]
    assert set(result.unexpected_keys) == {
        "cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"
    }  # fmt: skip


def test_outputs_are_fpn_ready_maps(vit_t):
    with torch.no_grad():
        outs = vit_t(_image(128, batch=2))
    assert [tuple(o.shape) for o in outs] == [(2, 192, 128 // s, 128 // s) for s in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="divisible by 32"):
        vit_t(_image(80))


def test_no_reduction_equals_plain_run():
    m = _backbone(TINY_ARGS)
    img = _image(64, batch=2)
    with torch.no_grad():
        plain = _plain_forward(m, img)
        runs = {"built without reduction": m(img)}
        m.configure_reduction("atc", reduction_loc=[1, 2], reduction_ratio=1.0)
        runs["atc, ratio 1.0"] = m(img)
        m.configure_reduction("tome", reduction_loc=[], reduction_ratio=0.5)
        runs["tome, no locations"] = m(img)
        m.configure_reduction(None)
        atc_patch.apply_patch(
            m, method="atc", linkage="single", reduction_ratio=0.5, reduction_loc=[1, 2]
        )
        reduced = m(img)
        atc_patch.remove_patch(m)
        runs["patched then removed"] = m(img)
    for name, outs in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(outs, plain)), name
    assert not torch.allclose(reduced[2], plain[2])  # the check above can tell them apart


@pytest.mark.parametrize(
    "method, linkage, ratio, expected",
    [
        # 64 px -> 4 x 4 = 16 tokens; blocks 3, 6, 9 keep int(ratio * T) of their T tokens.
        ("atc", "average", 0.7, [16] * 4 + [11] * 3 + [7] * 3 + [4] * 2),
        ("atc", "single", 0.25, [16] * 4 + [4] * 3 + [1] * 3 + [1] * 2),
        # ToMe removes at most half of the tokens per step.
        ("tome", None, 0.25, [16] * 4 + [8] * 3 + [4] * 3 + [2] * 2),
    ],
)
def test_reduction_token_counts_follow_settings(vit_t, method, linkage, ratio, expected):
    img = _image(64, batch=2)
    with torch.no_grad():
        ref = vit_t(img)
        vit_t.configure_reduction(method, linkage, [3, 6, 9], ratio)
        blocks, spatial, handles = _record_tokens(vit_t)
        try:
            outs = vit_t(img)
        finally:
            for h in handles:
                h.remove()
            vit_t.configure_reduction(None)
    assert blocks == expected
    # Injectors and extractors always see the full 4 x 4 grid (unmerged tokens).
    assert spatial == [16] * (2 * 4 + 2)
    assert [o.shape for o in outs] == [o.shape for o in ref]
    assert not torch.allclose(outs[2], ref[2])  # the reduction changed the features


def test_reduction_token_counts_at_128px(vit_t):
    vit_t.configure_reduction("atc", "complete", [3, 6, 9], [0.7, 0.5, 0.5])
    blocks, _, handles = _record_tokens(vit_t)
    try:
        with torch.no_grad():
            vit_t(_image(128))
    finally:
        for h in handles:
            h.remove()
        vit_t.configure_reduction(None)
    assert blocks == [64] * 4 + [44] * 3 + [22] * 3 + [11] * 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(method="ward"), r"one of \('atc', 'tome'\)"),
        (dict(method="atc", linkage="ward", reduction_ratio=0.5), "single.*complete.*average"),
        (dict(method="tome", linkage="single", reduction_ratio=0.5), "linkage applies"),
        (dict(method="atc", reduction_ratio=1.5), r"in \(0, 1\]"),
        (dict(method="atc", reduction_ratio=[0.5, 0.5]), "one per location"),
        (dict(method="atc", reduction_ratio=0.5, reduction_loc=[9, 3]), "increasing, distinct"),
        (dict(method="atc", reduction_ratio=0.5, reduction_loc=[12]), r"in \[0, 12\)"),
        (dict(linkage="single"), "method is None"),
        (dict(interaction_indexes=[[0, 5], [7, 11]]), "consecutive"),
    ],
)
def test_bad_config_values_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(type="ViTAdapter", **T_ARGS, **bad))


# ------------------------------------------------------------------- configs and --cfg-options


def _train_script():
    spec = importlib.util.spec_from_file_location("train_mmdet", ROOT / "examples/train_mmdet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cfg_options_change_linkage_and_ratio(tmp_path):
    train = _train_script()
    cfg = train.build_config(
        [
            "tomeatc-adapter-t-0.5x-ftune",
            "--work-dir",
            str(tmp_path),
            "--cfg-options",
            "model.backbone.linkage=single",
            "model.backbone.reduction_ratio=0.25",
            "model.backbone.reduction_loc=[2,5]",
            "model.backbone.norm_cfg.type=BN",
        ]
    )
    assert cfg.work_dir == str(tmp_path)
    backbone = MODELS.build(cfg.model.backbone)
    assert (backbone.linkage, backbone.reduction_ratio, backbone.reduction_loc) == (
        "single",
        0.25,
        [2, 5],
    )
    assert backbone.reduction.method == "atc" and backbone.reduction.reduction_ratio == (0.25, 0.25)

    cfg = train.build_config(
        [
            config_path("tomeatc-adapter-t-0.5x-ftune"),
            "--cfg-options",
            "model.backbone.method=tome",
            "model.backbone.linkage=None",
        ]
    )
    assert MODELS.build(cfg.model.backbone).reduction.method == "tome"
    cfg = Config.fromfile(config_path("tomeatc-adapter-t-0.5x-ftune"))
    cfg.merge_from_dict({"model.backbone.linkage": "ward"})
    with pytest.raises(ValueError, match="single"):
        MODELS.build(cfg.model.backbone)


# ------------------------------------------------------------------------ Mask R-CNN on CPU

# Fewer proposals and RoIs than the COCO settings: the same code paths at a fraction of the cost.
SMALL_HEADS = {
    "model.backbone.norm_cfg": dict(type="BN"),
    "model.roi_head.bbox_head.num_classes": 2,
    "model.roi_head.mask_head.num_classes": 2,
    "model.train_cfg.rpn_proposal.nms_pre": 200,
    "model.train_cfg.rpn_proposal.max_per_img": 50,
    "model.train_cfg.rcnn.sampler.num": 32,
    "model.test_cfg.rpn.nms_pre": 200,
    "model.test_cfg.rpn.max_per_img": 50,
    "model.test_cfg.rcnn.max_per_img": 10,
}


def _write_coco(root: Path, sizes=((96, 128), (128, 96), (128, 128))) -> Path:
    """A tiny COCO instance set: random images, 2 classes, boxes with polygon masks."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        for j in range(2):
            x0, y0 = 8.0 + 30 * j, 10.0 + 20 * j
            bw, bh = 40.0, 36.0
            poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            anns.append(
                dict(
                    id=len(anns) + 1,
                    image_id=i + 1,
                    category_id=j + 1,
                    bbox=[x0, y0, bw, bh],
                    area=bw * bh,
                    iscrowd=0,
                    segmentation=[poly],
                )
            )
    cats = [dict(id=1, name="a"), dict(id=2, name="b")]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return ann_file


def _dataset(ann_file: Path, test_mode: bool):
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="Resize", scale=(128, 128), keep_ratio=True),
        dict(type="PackDetInputs"),
    ]
    return DATASETS.build(
        dict(
            type="CocoDataset",
            data_root=str(ann_file.parent),
            ann_file=ann_file.name,
            data_prefix=dict(img="images/"),
            metainfo=dict(classes=("a", "b")),
            test_mode=test_mode,
            pipeline=pipeline,
        )
    )


def test_mask_rcnn_with_reduced_backbone_trains_and_predicts(tmp_path):
    ann_file = _write_coco(tmp_path)
    cfg = Config.fromfile(config_path("tomeatc-adapter-t-0.5x-ftune"))
    cfg.merge_from_dict(
        {**SMALL_HEADS, "model.backbone.linkage": "single", "model.backbone.reduction_ratio": 0.5}
    )
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    blocks, _, _ = _record_tokens(model.backbone)

    model.train()
    train_set = _dataset(ann_file, test_mode=False)
    batch = model.data_preprocessor(pseudo_collate([train_set[0], train_set[1]]), training=True)
    losses = model(**batch, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss) and {"loss_rpn_cls", "loss_cls", "loss_mask"} <= set(log_vars)
    loss.backward()
    grad = model.backbone.blocks[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    # 128 x 128 padded batch -> 64 tokens, halved at blocks 3, 6, 9.
    assert blocks == [64] * 4 + [32] * 3 + [16] * 3 + [8] * 2

    model.eval()
    test_set = _dataset(ann_file, test_mode=True)
    with torch.no_grad():
        results = model.test_step(pseudo_collate([test_set[2]]))
    pred = results[0].pred_instances
    assert len(pred.bboxes) == len(pred.scores) == len(pred.labels) == len(pred.masks)
    assert pred.masks.shape[1:] == (128, 128)  # masks at the original image size


RUNNER_CONFIG = """
_base_ = [{base!r}]
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=(128, 128), keep_ratio=True),
    dict(type="PackDetInputs"),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    batch_sampler=None,
    dataset=dict(
        data_root={root!r},
        ann_file="instances.json",
        data_prefix=dict(img="images/"),
        metainfo=dict(classes=("a", "b")),
        pipeline=train_pipeline,
    ),
)
val_dataloader = None
val_evaluator = None
val_cfg = None
test_dataloader = None
test_evaluator = None
test_cfg = None
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=1)
param_scheduler = []
default_hooks = dict(
    checkpoint=dict(type="CheckpointHook", interval=100, save_last=False),
    logger=dict(type="LoggerHook", interval=1),
    visualization=dict(type="DetVisualizationHook", draw=False),
)
log_processor = dict(by_epoch=False)
"""


def test_train_entry_point_runs_one_iteration_with_cfg_options(tmp_path):
    ann_file = _write_coco(tmp_path / "data")
    config = tmp_path / "tiny.py"
    base = config_path("tomeatc-adapter-t-0.5x-ftune")
    config.write_text(RUNNER_CONFIG.format(base=base, root=str(ann_file.parent)))
    small = [f"{k}={v}" for k, v in SMALL_HEADS.items() if "norm_cfg" not in k]
    runner = _train_script().main(
        [
            str(config),
            "--work-dir",
            str(tmp_path / "work"),
            "--cfg-options",
            "model.backbone.linkage=complete",
            "model.backbone.reduction_ratio=0.5",
            "model.backbone.norm_cfg.type=BN",
            *small,
        ]
    )
    backbone = runner.model.backbone
    assert (backbone.linkage, backbone.reduction_ratio) == ("complete", 0.5)
    assert runner.iter == 1
    assert np.isfinite(runner.message_hub.get_scalar("train/loss").current())
