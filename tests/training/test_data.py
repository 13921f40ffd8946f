"""atc_patch.train: dataset loaders in their official layouts, mAP, the ASL loss, checkpoints."""

from __future__ import annotations

import argparse
import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm  # noqa: F401
import torch
from PIL import Image

from atc_patch.train import (  # noqa: E402
    CHECKPOINT_KEYS,
    LayoutError,
    build_dataset,
    load_checkpoint,
    load_finetune_weights,
    mean_average_precision,
    save_checkpoint,
)
from atc_patch.train.models import reduction_options, resolve_model  # noqa: E402


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def test_imagefolder_layout(tmp_path):
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            _png(tmp_path / split / c / "a.png", 10)
    ds, n = build_dataset("imagenet", tmp_path, "validation")
    assert n == 2 and len(ds) == 2 and ds[1][1] == 1
    with pytest.raises(LayoutError, match=r"train,val}/<class>"):
        build_dataset("imagenet", tmp_path / "nothing", "val")
    with pytest.raises(ValueError, match="valid"):
        build_dataset("imagenet21k", tmp_path, "val")


def _nabirds(root: Path) -> None:
    # Non-contiguous class ids (as in NABirds): 295, 7, 1000 -> 1, 0, 2.
    rows = [("aa", "001/a.jpg", 295, 1), ("bb", "001/b.jpg", 7, 0), ("cc", "002/c.jpg", 1000, 1)]
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "classes.txt").write_text("7 Wood Duck\n295 Blue Jay\n1000 Owl\n")
    (root / "hierarchy.txt").write_text("7 1\n295 2\n1000 2\n")
    for k, (_, p, _, _) in enumerate(rows):
        _png(root / "images" / p, 50 * k)


def test_nabirds_layout(tmp_path):
    _nabirds(tmp_path)
    train, n = build_dataset("nabirds", tmp_path, "train")
    test, _ = build_dataset("nabirds", tmp_path, "val")
    assert n == 3
    assert [t for _, t in train] == [1, 2] and [t for _, t in test] == [0]
    assert train.class_names["295"] == "Blue Jay" and train.class_hierarchy["1000"] == "2"
    assert np.asarray(test[0][0])[0, 0, 0] == 50  # the image of "bb"
    (tmp_path / "train_test_split.txt").unlink()
    with pytest.raises(LayoutError, match="train_test_split.txt"):
        build_dataset("nabirds", tmp_path, "train")


def _coco(root: Path, split: str) -> None:
    images = [{"id": 10 + i, "file_name": f"{i}.png", "width": 4, "height": 4} for i in range(3)]
    cats = [{"id": cid, "name": f"c{cid}"} for cid in (1, 5, 90)]  # sparse ids, as COCO's
    anns = [
        {"id": 1, "image_id": 10, "category_id": 90, "bbox": [0, 0, 1, 1], "area": 1},
        {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1},
        {"id": 3, "image_id": 11, "category_id": 5, "bbox": [0, 0, 1, 1], "area": 1},
        {"id": 4, "image_id": 11, "category_id": 5, "bbox": [1, 1, 1, 1], "area": 1},
    ]  # image 12 has no annotation: not used, as in the reference
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    for im in images:
        _png(root / f"{split}2014" / im["file_name"], 0)


def test_coco_layout(tmp_path):
    _coco(tmp_path, "val")
    ds, n = build_dataset("coco", tmp_path, "val")
    assert n == 3 and len(ds) == 2
    targets = {ds.ids[i]: ds[i][1].tolist() for i in range(2)}
    assert targets == {10: [1.0, 0.0, 1.0], 11: [0.0, 1.0, 0.0]}
    with pytest.raises(LayoutError, match="instances_train2014.json"):
        build_dataset("coco", tmp_path, "train")


def test_nuswide_layout(tmp_path):
    rows = [
        ("images/a.jpg", "['sky', 'clouds']", "train"),
        ("images/b.jpg", "['water']", "val"),
        ("images/c.jpg", "[]", "train"),
    ]
    with open(tmp_path / "nus_wid_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "label", "split_name"])
        w.writerows(rows)
    for p, _, _ in rows:
        _png(tmp_path / p, 0)
    train, n = build_dataset("nuswide", tmp_path, "train")
    val, _ = build_dataset("nuswide", tmp_path, "val")
    assert train.classes == ["clouds", "sky", "water"] and n == 3
    assert [t.tolist() for _, t in train] == [[1, 1, 0], [0, 0, 0]]
    assert val[0][1].tolist() == [0, 0, 1]
    (tmp_path / "nus_wid_data.csv").write_text("path;labels\nx;y\n")
    with pytest.raises(LayoutError, match="filepath,label,split_name"):
        build_dataset("nuswide", tmp_path, "train")


@pytest.mark.parametrize("seed", range(6))
def test_map_equals_sklearn(seed):
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(seed)
    n, c = 40, 7
    scores = torch.randn(n, c, generator=g)
    if seed % 2:  # ties
        scores = torch.randint(0, 4, (n, c), generator=g).float()
    targets = (torch.rand(n, c, generator=g) < 0.3).float()
    targets[:, 0] = 0  # a class without positives is left out
    keep = targets.sum(0) > 0
    ref = average_precision_score(targets[:, keep].numpy(), scores[:, keep].numpy())
    assert mean_average_precision(scores, targets) == pytest.approx(ref, abs=1e-12)


def test_asl_loss_is_timms_with_the_reference_settings():
    from timm.loss import AsymmetricLossMultiLabel

    from atc_patch.train.recipe import build_criterion

    crit = build_criterion(argparse.Namespace(dataset="coco", smoothing=0.1), False)
    assert isinstance(crit, AsymmetricLossMultiLabel)
    x = torch.randn(5, 6)
    y = (torch.rand(5, 6) < 0.4).float()
    # The ASL formula (Ridnik et al. 2021) with gamma_neg=4, gamma_pos=0, clip=0.05.
    p = x.sigmoid()
    p_neg = (p - 0.05).clamp(min=0)
    pos = y * torch.log(p.clamp(min=1e-8))
    neg = (1 - y) * p_neg**4 * torch.log((1 - p_neg).clamp(min=1e-8))
    torch.testing.assert_close(crit(x, y), -(pos + neg).sum())


def test_checkpoint_layout_and_weights_only_load(tmp_path):
    args = argparse.Namespace(model="atc_small_patch16_224", path=Path("/x"), keep_rate=[0.9])
    lin = torch.nn.Linear(2, 2)
    entries = dict.fromkeys(CHECKPOINT_KEYS)
    entries.update(model=lin.state_dict(), epoch=3, ema_best=False, args=args)
    save_checkpoint(tmp_path / "c.pth", **entries)
    ckpt = load_checkpoint(tmp_path / "c.pth")
    assert list(ckpt) == list(CHECKPOINT_KEYS)
    assert ckpt["args"].model == "atc_small_patch16_224" and ckpt["args"].path == "/x"
    with pytest.raises(ValueError, match="missing"):
        save_checkpoint(tmp_path / "d.pth", model=lin.state_dict())
    torch.save({"model": lin.state_dict(), "other": Path("/x")}, tmp_path / "e.pth")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_checkpoint(tmp_path / "e.pth")


def test_finetune_drops_head_and_resamples_pos_embed():
    from timm.layers import resample_abs_pos_embed

    src = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=1000)
    dst = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=10, img_size=64)
    state = src.state_dict()
    missing, unexpected = load_finetune_weights(dst, state, verbose=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    assert dst.pos_embed.shape == (1, 17, 192)
    # class token kept, patch grid 14x14 -> 4x4 bicubic, as timm's (independent call).
    torch.testing.assert_close(dst.pos_embed[:, :1], state["pos_embed"][:, :1])
    want = resample_abs_pos_embed(state["pos_embed"], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.data, want)
    torch.testing.assert_close(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)


def test_model_names_and_reduction_flags():
    # atc_* / tome_* are timm registry names (atc_patch.pretrained.timm_models), tags allowed.
    spec = resolve_model("atc_small_patch16_224")
    assert (spec.timm_name, spec.method, spec.registered) == ("atc_small_patch16_224", "atc", True)
    assert (
        resolve_model("tome_tiny_patch16_224.fb_in1k").timm_name == "tome_tiny_patch16_224.fb_in1k"
    )
    assert resolve_model("deit_tiny_patch16_224", distilled=True).timm_name == (
        "deit_tiny_distilled_patch16_224"
    )
    assert resolve_model("deit_base_patch16_224_local").method is None
    with pytest.raises(ValueError, match="atc_tiny_patch16_224"):
        resolve_model("atc_giant_patch16_224")
    assert reduction_options("atc", [0.9], [3, 6, 9], "complete") == {
        "prop_attn": True,
        "linkage": "complete",
        "keep_rate": 0.9,
        "reduction_loc": (3, 6, 9),
    }
    # Kept-token counts per location (the reference's --reduction_ratio list).
    assert reduction_options("tome", [150, 100], [1, 3], num_patches=196)["r"] == [0, 46, 0, 50]
    with pytest.raises(ValueError, match="atc_\\* models only"):
        reduction_options("tome", [0.9], [3], linkage="single")
