"""Released ViT-Adapter detectors: reference ``ToMeATCViTAdapter`` keys into our Mask R-CNN.

A synthetic mmdet-2 checkpoint (``meta`` / ``state_dict`` / ``optimizer``) is written with every
reference backbone key spelled out by hand from the reference modules, loaded through mmengine's
own ``load_checkpoint`` and ``init_cfg`` via the ``atc://`` scheme, and the detector then
predicts once. Nothing is downloaded (the hub path uses a temporary offline cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import mmcv.ops  # noqa: F401
import mmdet  # noqa: F401
import pytest
import torch
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from atc_patch import pretrained as pt  # noqa: E402
from atc_patch.mmdet import checkpoint as ck  # noqa: E402
from atc_patch.mmdet import config_path  # noqa: E402

register_all_modules(init_default_scope=True)

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
SMALL = {
    "model.backbone.norm_cfg": dict(type="BN"),
    "model.test_cfg.rpn.nms_pre": 200,
    "model.test_cfg.rpn.max_per_img": 50,
    "model.test_cfg.rcnn.max_per_img": 10,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _ln(name: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _bn(name: str, dim: int) -> dict[str, tuple[int, ...]]:
    stats = ("weight", "bias", "running_mean", "running_var")
    return {**{f"{name}.{s}": (dim,) for s in stats}, f"{name}.num_batches_tracked": ()}


def _msda(name: str, dim: int, heads: int, levels: int, points: int) -> dict:
    """Reference MSDeformAttn(d_model=dim, n_levels, n_heads, n_points, ratio=1.0)."""
    out = {}
    for part, rows, cols in (
        ("sampling_offsets", heads * levels * points * 2, dim),
        ("attention_weights", heads * levels * points, dim),
        ("value_proj", dim, dim),
        ("output_proj", dim, dim),
    ):
        out[f"{name}.{part}.weight"] = (rows, cols)
        out[f"{name}.{part}.bias"] = (rows,)
    return out


def _extractor(name: str, dim: int, heads: int, points: int, hidden: int) -> dict:
    """Reference Extractor: norms, MSDeformAttn on one level, ConvFFN with DWConv wrapper."""
    return {
        **_ln(f"{name}.query_norm", dim),
        **_ln(f"{name}.feat_norm", dim),
        **_msda(f"{name}.attn", dim, heads, 1, points),
        f"{name}.ffn.fc1.weight": (hidden, dim),
        f"{name}.ffn.fc1.bias": (hidden,),
        f"{name}.ffn.dwconv.dwconv.weight": (hidden, 1, 3, 3),
        f"{name}.ffn.dwconv.dwconv.bias": (hidden,),
        f"{name}.ffn.fc2.weight": (dim, hidden),
        f"{name}.ffn.fc2.bias": (dim,),
        **_ln(f"{name}.ffn_norm", dim),
    }


def reference_backbone_shapes(
    dim: int = 192, heads: int = 3, deform_heads: int = 6, points: int = 4, inplane: int = 64
) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the reference ToMeATCViTAdapter (ViT-Adapter-T settings of
    tomeatc-adapter-t-0.5x-ftune.py), from its modules: the timm VisionTransformer it
    subclasses (80-class head), level_embed, SpatialPriorModule, four InteractionBlockToMeATC
    (extra extractors on the last), up, and four SyncBatchNorm."""
    s: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 197, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(12):
        b = f"blocks.{i}"
        s.update(_ln(f"{b}.norm1", dim))
        s.update({f"{b}.attn.qkv.weight": (3 * dim, dim), f"{b}.attn.qkv.bias": (3 * dim,)})
        s.update({f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,)})
        s.update(_ln(f"{b}.norm2", dim))
        s.update({f"{b}.mlp.fc1.weight": (4 * dim, dim), f"{b}.mlp.fc1.bias": (4 * dim,)})
        s.update({f"{b}.mlp.fc2.weight": (dim, 4 * dim), f"{b}.mlp.fc2.bias": (dim,)})
    s.update(_ln("norm", dim))
    s.update({"head.weight": (80, dim), "head.bias": (80,)})
    s["level_embed"] = (3, dim)
    # SpatialPriorModule: stem = conv, BN, ReLU x3 + max-pool; conv2..4 = conv, BN, ReLU.
    for idx, cin in ((0, 3), (3, inplane), (6, inplane)):
        s[f"spm.stem.{idx}.weight"] = (inplane, cin, 3, 3)
        s.update(_bn(f"spm.stem.{idx + 1}", inplane))
    for name, cin, cout in (
        ("conv2", inplane, 2 * inplane),
        ("conv3", 2 * inplane, 4 * inplane),
        ("conv4", 4 * inplane, 4 * inplane),
    ):
        s[f"spm.{name}.0.weight"] = (cout, cin, 3, 3)
        s.update(_bn(f"spm.{name}.1", cout))
    for name, cin in (("fc1", inplane), ("fc2", 2 * inplane), ("fc3", 4 * inplane)):
        s.update({f"spm.{name}.weight": (dim, cin, 1, 1), f"spm.{name}.bias": (dim,)})
    s.update({"spm.fc4.weight": (dim, 4 * inplane, 1, 1), "spm.fc4.bias": (dim,)})
    hidden = int(dim * 0.25)
    for i in range(4):
        inj = f"interactions.{i}.injector"
        s.update(_ln(f"{inj}.query_norm", dim))
        s.update(_ln(f"{inj}.feat_norm", dim))
        s.update(_msda(f"{inj}.attn", dim, deform_heads, 3, points))
        s[f"{inj}.gamma"] = (dim,)
        s.update(_extractor(f"interactions.{i}.extractor", dim, deform_heads, points, hidden))
    for j in range(2):
        name = f"interactions.3.extra_extractors.{j}"
        s.update(_extractor(name, dim, deform_heads, points, hidden))
    s.update({"up.weight": (dim, dim, 2, 2), "up.bias": (dim,)})
    for k in range(1, 5):
        s.update(_bn(f"norm{k}", dim))
    return s


def _detector(**options):
    cfg = Config.fromfile(config_path("tomeatc-adapter-t-0.5x-ftune"))
    cfg.merge_from_dict({**SMALL, **options})
    torch.manual_seed(0)
    return MODELS.build(cfg.model)


def reference_checkpoint(detector) -> dict:
    """mmdet-2 layout: reference backbone keys (random values), the detector's own neck/heads."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in reference_backbone_shapes().items():
        if name.endswith("num_batches_tracked"):
            t = torch.tensor(1000)
        elif name.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        else:
            t = torch.randn(shape, generator=g) * 0.02
        state[f"backbone.{name}"] = t
    for key, value in detector.state_dict().items():
        if not key.startswith("backbone."):
            state[key] = torch.randn(value.shape, generator=g) * 0.02
    meta = {
        "mmdet_version": "2.28.2",
        "mmcv_version": "1.7.1",
        "CLASSES": ("person", "bicycle"),
        "epoch": 6,
        "iter": 87_000,
        "seed": 1234,
        "exp_name": "tomeatc-adapter-t-0.5x-ftune.py",
        "config": "model = dict(backbone=dict(type='ToMeATCViTAdapter', ...))",
        "hook_msgs": {"last_ckpt": "output/tomeatc-t/epoch_6.pth"},
        "fp16": {"loss_scaler": {"scale": 512.0, "growth_factor": 2.0, "_growth_tracker": 3}},
    }
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 1e-6, "params": []}]}
    return {"meta": meta, "state_dict": state, "optimizer": optimizer}


@pytest.fixture(scope="module")
def detector():
    return _detector()


@pytest.fixture(scope="module")
def ref_file(detector, tmp_path_factory) -> tuple[Path, dict]:
    ckpt = reference_checkpoint(detector)
    path = tmp_path_factory.mktemp("ref") / "atc_tiny-coco17-07-average.pth"
    torch.save(ckpt, path)
    return path, ckpt


def _check_loaded(backbone, ckpt: dict) -> None:
    """Every reference backbone entry with a counterpart landed under its mapped name."""
    own = backbone.state_dict()
    for key, value in ckpt["state_dict"].items():
        if key.startswith("backbone."):
            new = ck.convert_backbone_key(key.removeprefix("backbone."))
            if new is not None:
                assert torch.equal(own[new], value), key


def test_reference_keys_map_one_to_one(detector) -> None:
    shapes = reference_backbone_shapes()
    converted, dropped = ck.convert_reference_state_dict(
        {k: torch.empty(v) for k, v in shapes.items()}, prefix=""
    )
    ours = detector.backbone.state_dict()
    assert sorted(dropped) == sorted(ck.REFERENCE_ONLY)
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in ours)
    renamed = [k for k in shapes if ck.convert_backbone_key(k) not in (k, None)]
    assert len(renamed) == 2 * (4 + 2)  # weight + bias of each extractor's depth-wise conv
    assert ck.convert_backbone_key("interactions.3.extra_extractors.1.ffn.dwconv.dwconv.bias") == (
        "interactions.3.extra_extractors.1.ffn.dwconv.bias"
    )


def test_load_from_and_init_cfg_then_predict(detector, ref_file) -> None:
    path, ckpt = ref_file
    # load_from: mmengine's Runner.load_checkpoint = _load_checkpoint + _load_checkpoint_to_model,
    # i.e. load_checkpoint(); strict=True raises on any missing or unexpected key.
    load_checkpoint(detector, f"atc://{path}", strict=True)
    _check_loaded(detector.backbone, ckpt)
    own = detector.state_dict()
    for key, value in ckpt["state_dict"].items():
        if not key.startswith("backbone."):
            assert torch.equal(own[key], value), key

    # init_cfg on the backbone alone.
    cfg = Config.fromfile(config_path("tomeatc-adapter-t-0.5x-ftune"))
    cfg.merge_from_dict(SMALL)
    cfg.model.backbone.init_cfg = dict(
        type="Pretrained", checkpoint=f"atc://{path}", prefix="backbone."
    )
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    _check_loaded(backbone, ckpt)

    # One inference pass of the loaded Mask R-CNN.
    detector.eval()
    img = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    meta = dict(img_shape=(64, 96), ori_shape=(64, 96), scale_factor=(1.0, 1.0))
    with torch.no_grad():
        out = detector.test_step(dict(inputs=[img], data_samples=[DetDataSample(metainfo=meta)]))
    pred = out[0].pred_instances
    assert len(pred.bboxes) == len(pred.scores) == len(pred.masks) <= 10
    assert pred.masks.shape[1:] == (64, 96)


def test_release_from_offline_hub_cache(detector, ref_file, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    path, ckpt = ref_file
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--joakimbh--tome_tiny-coco17"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "tome_tiny-coco17-07.pth").write_bytes(path.read_bytes())

    options = ck.release_cfg_options("tome", "tiny", 0.7)
    assert options["load_from"] == "atc://joakimbh/tome_tiny-coco17/tome_tiny-coco17-07.pth"
    tome = _detector(**{k: v for k, v in options.items() if k != "load_from"})
    assert tome.backbone.reduction_settings()["method"] == "tome"
    load_checkpoint(tome, options["load_from"], strict=True)
    _check_loaded(tome.backbone, ckpt)

    with pytest.raises(FileNotFoundError, match="tome_tiny-coco17-05.pth"):
        load_checkpoint(tome, ck.checkpoint_uri("tome", "tiny", 0.5))
    with pytest.raises(ValueError, match="keep_rate must be one of"):
        ck.release_cfg_options("atc", "tiny", 0.6, "average")


def test_unsafe_detector_checkpoint_refused(detector, ref_file, tmp_path) -> None:
    _, ckpt = ref_file
    bad = dict(ckpt, meta=dict(ckpt["meta"], work_dir=Path("output")))
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(pt.UnsafeCheckpointError, match="PosixPath|WindowsPath"):
        load_checkpoint(detector, f"atc://{path}")
    marker = tmp_path / "executed"
    torch.save(dict(ckpt, hook=_Evil(str(marker))), path)  # unpickling would run os.system
    with pytest.raises(pt.UnsafeCheckpointError, match="posix.system|os.system|nt.system"):
        load_checkpoint(detector, f"atc://{path}")
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
