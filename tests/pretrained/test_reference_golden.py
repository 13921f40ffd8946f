"""The ATC paper's forwards, reproduced: atc_patch against the official code's outputs.

The golden files (``tests/data/reference/*.npz``) hold what the official implementation
(github:JoakimHaurum/ATC) computes on small seeded random-init models; they are recorded by
``scripts/reference/*.py`` (which need the official code) and replayed here without it. Each
case rebuilds the same model and images (:mod:`_reference_golden`), runs atc_patch, and asks for
the same token count after every block, the same partitions (of the input tokens, after every
merge, compared as partitions) and the same outputs to float64 rounding. docs/pretrained.md
("Fidelity") lists the paths, the settings and the measured agreement.
"""

from __future__ import annotations

from typing import Any

import _reference_golden as G
import numpy as np
import pytest
import timm

import atc_patch
import atc_patch.pretrained.timm_models  # noqa: F401  (registers the atc_* names)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # ToMe at keep rate 0.25 misses its targets, as the reference's does (it warns once)
    pytest.mark.filterwarnings("ignore:tome cannot reach the token targets:UserWarning"),
]

RTOL = 1e-12  # float64 outputs: max |ours - reference| / max |reference|


def assert_matches(result: dict[str, Any], arrays: dict[str, np.ndarray], key: str) -> None:
    report = G.compare(result, arrays, key)
    assert report["counts_equal"], (list(result["counts"]), arrays[f"{key}/counts"].tolist())
    equal, total = report["partitions"]
    assert equal == total, f"partitions equal {equal}/{total}"
    assert set(result["outputs"]) & set(report)  # some output is compared
    for name in result["outputs"]:
        if name in report:
            assert report[name] <= RTOL, f"{name}: relative error {report[name]:.3g}"


def settings(*names: str) -> list[Any]:
    out = []
    for name in names:
        meta, _ = G.load_golden(name)
        out += [pytest.param(name, key, id=f"{name}-{key}") for key in meta["settings"]]
    return out


# --- ATC_setup: the DeiT of the paper's fine-tuning and releases ---------------------------------


@pytest.mark.parametrize("golden,key", settings("deit_prop", "deit_noprop"))
def test_deit(golden: str, key: str) -> None:
    meta, arrays = G.load_golden(golden)
    x = G.seeded_images(meta["seed"], meta["batch"], meta["shape"]["img_size"])
    setting = meta["settings"][key]
    result = G.ours_deit(setting, x, meta["seed"], tuple(meta["reduction_loc"]))
    assert_matches(result, arrays, key)


@pytest.mark.parametrize("golden,key", settings("deit_prop", "deit_noprop"))
def test_deit_by_registry_name(golden: str, key: str) -> None:
    """``timm.create_model("atc_*", proportional_attn=...)`` builds the reference's forward by
    itself (``size_mode="reset"`` without proportional attention)."""
    meta, arrays = G.load_golden(golden)
    s = meta["settings"][key]
    shape = {k: v for k, v in meta["shape"].items() if k != "depth"}
    model = timm.create_model(
        "atc_tiny_patch16_224",
        **shape,
        linkage=s["linkage"],
        keep_rate=s["keep_rate"],
        reduction_loc=tuple(meta["reduction_loc"]),
        proportional_attn=s["prop_attn"],
    )
    expected = "keep" if s["prop_attn"] else "reset"
    assert atc_patch.patch_settings(model)["size_mode"] == expected
    x = G.seeded_images(meta["seed"], meta["batch"], meta["shape"]["img_size"])
    assert_matches(G.run_vit(G.seeded(model, meta["seed"]), x), arrays, key)


# --- SSLBackbone_setup: the MAE recipe and the off-the-shelf study (MAE, AugReg, SWAG) -----------

SSL = [f"ssl_{kind}_{sched}" for kind in G.SSL_MODELS for sched in ("constant", "decrease")]


@pytest.mark.parametrize("golden,key", settings(*SSL))
def test_ssl_backbones(golden: str, key: str) -> None:
    meta, arrays = G.load_golden(golden)
    x = G.seeded_images(meta["seed"], meta["batch"], meta["shape"]["img_size"])
    result = G.ours_ssl(meta["kind"], meta["settings"][key], x, meta["seed"])
    assert_matches(result, arrays, key)


# --- the reference settings themselves -----------------------------------------------------------


def test_reference_r_flags() -> None:
    """``--r-count``/``--r`` as the reference means them: ATC removes ``r - 1`` per block."""
    import argparse

    from atc_patch.train import cli
    from atc_patch.train.models import reference_r

    assert reference_r("atc", 16, "constant", 12) == [15] * 12
    assert reference_r("tome", 16, "constant", 12) == 16
    assert reference_r("atc", 4, "decrease", 12) == [7, 6, 5, 4, 4, 3, 2, 1, 1, 0, 0, 0]
    args = argparse.Namespace(
        r_count=16, merge_fn="atc", r_sched="constant", linkage=None, model="vit_base_patch16"
    )
    args.r_count_prop_attn = False  # what examples/train_mae.py sets
    method, opts = cli.patch_options(args, None, 196, 12)
    assert (method, opts) == ("atc", {"r": [15] * 12, "prop_attn": False, "linkage": "average"})


def test_sd_generate_reference_flags() -> None:
    """The reference's ``sd_generate.py --merge_fn_str tome`` is ToMe-SD, without random
    destinations unless ``--use_rand``."""
    import importlib.util
    import types
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "sd_generate.py"
    spec = importlib.util.spec_from_file_location("sd_generate_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pipe = types.SimpleNamespace(unet=object())
    args = example.parse_args(["--merge_fn_str", "tome", "--reduction_ratio", "0.5"])
    assert example.METHOD_OF.get(args.merge_fn_str) == "tome_sd"
    opts = example.patch_options(args, pipe)
    assert opts["use_rand"] is False and "seed" not in opts
    args = example.parse_args(["--merge_fn_str", "tome_sd", "--use_rand", "--seed", "3"])
    opts = example.patch_options(args, pipe)
    assert opts["use_rand"] is True and opts["seed"] == 3


def test_size_mode_is_validated() -> None:
    model = G.deit(0)
    with pytest.raises(ValueError, match="size_mode must be one of"):
        atc_patch.apply_patch(model, method="atc", r=2, prop_attn=False, size_mode="forget")
    with pytest.raises(ValueError, match="prop_attn=False"):
        atc_patch.apply_patch(model, method="atc", r=2, size_mode="reset")
    assert atc_patch.patch_settings(model) is None  # a failed call leaves the model as it was


# --- ATC_Benchmark: the throughput benchmark's ToMe DeiT and DPC-KNN clustering ------------------


@pytest.mark.parametrize("key", [p.values[1] for p in settings("benchmark_tome")])
def test_benchmark_tome(key: str) -> None:
    meta, arrays = G.load_golden("benchmark_tome")
    x = G.seeded_images(meta["seed"], meta["batch"], meta["shape"]["img_size"])
    setting = meta["settings"][key]
    result = G.ours_benchmark_tome(setting, x, meta["seed"], tuple(meta["reduction_loc"]))
    assert_matches(result, arrays, key)


@pytest.mark.parametrize("key", [p.values[1] for p in settings("benchmark_dpcknn")])
def test_benchmark_dpcknn_clustering(key: str) -> None:
    meta, arrays = G.load_golden("benchmark_dpcknn")
    s = meta["settings"][key]
    points = G.dpcknn_points(meta["seed"], **meta["points"])
    ours = G.ours_dpcknn(points, s["num_clusters"], s["k_neighbors"])
    np.testing.assert_array_equal(ours, arrays[f"{key}/labels"])


# --- MMDet_setup: the ViT-Adapter of the detection experiments -----------------------------------


@pytest.mark.parametrize("key", [p.values[1] for p in settings("mmdet_adapter")])
def test_mmdet_adapter(key: str) -> None:
    meta, arrays = G.load_golden("mmdet_adapter")
    x = G.seeded_images(meta["seed"], meta["batch"], meta["image"])
    result = G.ours_adapter(meta["settings"][key], x, meta["seed"])
    assert_matches(result, arrays, key)


# --- SD_setup: the Stable Diffusion patch (ToMe-SD path, ATC path) -------------------------------


@pytest.mark.parametrize("golden,key", settings("sd_tome", "sd_atc"))
def test_sd(golden: str, key: str) -> None:
    meta, arrays = G.load_golden(golden)
    assert_matches(G.ours_sd(meta["settings"][key], meta["seed"]), arrays, key)
