"""Released ATC checkpoints: load_pretrained, the hub cache, weights-only loading, timm names.

Nothing is downloaded. The tests write synthetic checkpoints in the reference layout (the dict
``train_deit.py`` saves: ``model``, ``model_ema``, ``ema_best``, ``args`` and the optimizer /
scheduler / scaler states), with the reference's key names written out by hand, and compare
every loaded model with a timm ``VisionTransformer`` built and patched by hand from the same
weights. The weights are strided views of one random pool, so a DeiT-B file stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import atc_patch
import atc_patch.pretrained.timm_models  # noqa: F401  (registers atc_* / tome_*)
from atc_patch import pretrained as pt

WIDTH = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
CLASSES = {"im1k": 1000, "nab": 555, "coco": 80, "nus": 81}
REF_DATASET = {"im1k": "imagenet", "nab": "nabirds", "coco": "coco", "nus": "nuswide"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# Small models gain nothing from intra-op threads; on a shared CPU they lose 10x to them.
pytestmark = pytest.mark.usefixtures("one_thread")


# --- synthetic reference checkpoints ---------------------------------------------------------


def _reference_shapes(dim: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the reference AgglomerativeClusteringVisionTransformer
    (a timm VisionTransformer whose blocks are Block_ATC: norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2), written out independently of timm."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 197, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (4 * dim, dim),
                b + "mlp.fc1.bias": (4 * dim,),
                b + "mlp.fc2.weight": (dim, 4 * dim),
                b + "mlp.fc2.bias": (dim,),
            }
        )
    shapes.update(
        {
            "norm.weight": (dim,),
            "norm.bias": (dim,),
            "head.weight": (num_classes, dim),
            "head.bias": (num_classes,),
        }
    )
    return shapes


_POOL = 1 << 21


def _view(pool: torch.Tensor, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """A ``shape`` tensor reading ``pool`` with shifted, overlapping rows (no copy)."""
    if len(shape) == 1:
        return pool[offset : offset + shape[0]]
    inner = 1
    for s in shape[1:]:
        inner *= s
    row = 997 if shape[0] * 997 + inner < _POOL - offset else 13
    strides = [row]
    for i in range(1, len(shape)):
        strides.append(int(torch.tensor(shape[i + 1 :]).prod()) if i + 1 < len(shape) else 1)
    return pool.as_strided(shape, strides, offset)


def reference_weights(size: str, num_classes: int, pool: torch.Tensor, shift: int) -> dict:
    dim = WIDTH[size][0]
    out = {}
    for j, (name, shape) in enumerate(_reference_shapes(dim, num_classes).items()):
        t = _view(pool, shape, (shift + 7919 * j) % (_POOL // 4))
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            t = 1.0 + t  # a LayerNorm scale near one
        out[name] = t
    return out


def reference_checkpoint(
    size: str,
    dataset: str,
    *,
    linkage: str | None = "average",
    keep_rate: float = 0.7,
    ema_best: bool = True,
    with_args: bool = True,
    method: str = "atc",
    seed: int = 0,
) -> dict:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL, generator=g) * 0.02
    model = reference_weights(size, CLASSES[dataset], pool, 0)
    ema = reference_weights(size, CLASSES[dataset], pool, 104_729)
    ckpt = {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [], "fix_step": 0}]},
        "lr_scheduler": {"base_values": [1e-3], "t_in_epochs": False, "noise_range_t": None},
        "epoch": 29,
        "model_ema": ema,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
        "ema_best": ema_best,
    }
    if with_args:
        ns = argparse.Namespace(
            model=f"{method}_{size}_patch16_224",
            input_size=224,
            dataset=REF_DATASET[dataset],
            num_classes=CLASSES[dataset],
            reduction_loc=[3, 6, 9],
            reduction_ratio=[keep_rate],
            lr=0.001,
            drop_path=0.1,
            model_ema=True,
            output_dir="out/run",
            teacher_path="",
            opt_betas=None,
        )
        if method == "atc":
            ns.linkage = linkage
            ns.proportional_attn = True
        ckpt["args"] = ns
    return ckpt


def release_name(size: str, dataset: str, keep: float, linkage: str | None = "average") -> str:
    code = {0.25: "025", 0.5: "05", 0.7: "07", 0.9: "09"}[keep]
    return f"atc_{size}-{dataset}-{code}-{linkage}.pth"


def hand_model(weights: dict | None, size: str, num_classes: int = 1000, **patch):
    """The reference model by hand: timm VisionTransformer + the weights + apply_patch.

    Built on the meta device (no random init); ``weights=None`` leaves it there, for checking
    patch settings without a forward.
    """
    dim, heads = WIDTH[size]
    if weights is not None:
        num_classes = len(weights["head.bias"])
    with torch.device("meta"):
        model = VisionTransformer(
            patch_size=16, embed_dim=dim, depth=12, num_heads=heads, num_classes=num_classes
        )
    if weights is not None:
        model.load_state_dict({k: v.clone() for k, v in weights.items()}, strict=True, assign=True)
    model.eval()
    if patch:
        atc_patch.apply_patch(model, **patch)
    return model


def _images(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# --- release names ----------------------------------------------------------------------------


def test_release_catalogue() -> None:
    rel = pt.released_checkpoints()
    cls = [r for r in rel if r.task == "classification"]
    det = [r for r in rel if r.task == "detection"]
    assert len(cls) == 144 and len({r.repo_id for r in cls}) == 36
    assert len(det) == 32 and len({r.repo_id for r in det}) == 8
    assert ("joakimbh/atc_small-im1k-complete", "atc_small-im1k-07-complete.pth") in {
        (r.repo_id, r.filename) for r in cls
    }
    assert "joakimbh/tome_tiny-coco17" in {r.repo_id for r in det}
    for r in rel:
        info = pt.parse_filename(r.filename)
        assert info == {
            "method": r.method,
            "size": r.size,
            "dataset": r.dataset,
            "keep_rate": r.keep_rate,
            "linkage": r.linkage,
        }
    assert pt.parse_filename("best_checkpoint.pth") is None
    assert pt.parse_filename("atc_tiny-im1k-07.pth") is None  # ATC files name their linkage


# --- load_pretrained on local files ----------------------------------------------------------


@pytest.mark.parametrize(
    "size,dataset,linkage,keep,ema_best",
    [
        ("tiny", "im1k", "complete", 0.7, True),
        ("tiny", "nab", "single", 0.25, False),
        ("tiny", "coco", "average", 0.9, True),
        ("tiny", "nus", "complete", 0.5, False),
        ("small", "im1k", "average", 0.5, True),
    ],
)
def test_load_reference_layout(size, dataset, linkage, keep, ema_best, tmp_path) -> None:
    ckpt = reference_checkpoint(size, dataset, linkage=linkage, keep_rate=keep, ema_best=ema_best)
    path = tmp_path / release_name(size, dataset, keep, linkage)
    torch.save(ckpt, path)

    model = atc_patch.load_pretrained(path)

    assert not model.training
    assert model.embed_dim == WIDTH[size][0] and model.num_classes == CLASSES[dataset]
    assert model.pretrained_cfg["ema"] is ema_best
    s = atc_patch.patch_settings(model)
    assert (s["method"], s["linkage"], s["keep_rate"]) == ("atc", linkage, keep)
    assert s["reduction_loc"] == (3, 6, 9) and s["prop_attn"] is True
    weights = ckpt["model_ema"] if ema_best else ckpt["model"]
    other = ckpt["model"] if ema_best else ckpt["model_ema"]
    patch = dict(method="atc", linkage=linkage, keep_rate=keep, reduction_loc=(3, 6, 9))
    x = _images()
    out = _logits(model, x)
    assert out.shape == (1, CLASSES[dataset])
    assert torch.equal(out, _logits(hand_model(weights, size, **patch), x))
    assert not torch.equal(model.head.weight, other["head.weight"])
    # The reference evaluation transform of the dataset.
    squash = dataset in ("coco", "nus")
    assert model.pretrained_cfg["crop_pct"] == (1.0 if squash else 0.875)
    assert model.pretrained_cfg["crop_mode"] == ("squash" if squash else "center")


def test_load_deit_base(tmp_path) -> None:
    """The one DeiT-B test: width 768 / 12 heads read from the file, EMA weights by ema_best."""
    ckpt = reference_checkpoint("base", "im1k", linkage="single", keep_rate=0.25)
    path = tmp_path / release_name("base", "im1k", 0.25, "single")
    torch.save(ckpt, path)
    assert path.stat().st_size < 20 * 2**20  # strided views: one small storage
    model = atc_patch.load_pretrained(path)
    assert model.embed_dim == 768 and model.blocks[0].attn.num_heads == 12
    x = _images(1)
    ref = hand_model(
        ckpt["model_ema"], "base", linkage="single", keep_rate=0.25, reduction_loc=(3, 6, 9)
    )
    assert torch.equal(_logits(model, x), _logits(ref, x))


def test_ema_choice_and_name_only_settings(tmp_path) -> None:
    # No args: the settings come from the release file name.
    ckpt = reference_checkpoint("tiny", "nab", ema_best=True, with_args=False)
    path = tmp_path / release_name("tiny", "nab", 0.5, "single")
    torch.save(ckpt, path)
    x = _images()
    patch = dict(method="atc", linkage="single", keep_rate=0.5, reduction_loc=(3, 6, 9))
    for ema, weights in (
        (None, ckpt["model_ema"]),
        (True, ckpt["model_ema"]),
        (False, ckpt["model"]),
    ):
        model = atc_patch.load_pretrained(path, ema=ema)
        assert atc_patch.patch_settings(model)["linkage"] == "single"
        assert torch.equal(_logits(model, x), _logits(hand_model(weights, "tiny", **patch), x))

    # Neither args nor a release name: the settings must be given.
    plain = tmp_path / "best_checkpoint.pth"
    torch.save(ckpt, plain)
    with pytest.raises(ValueError, match="cannot tell how"):
        atc_patch.load_pretrained(plain)
    model = atc_patch.load_pretrained(plain, method="tome", keep_rate=0.7)
    s = atc_patch.patch_settings(model)
    assert (s["method"], s["keep_rate"], s["reduction_loc"]) == ("tome", 0.7, (3, 6, 9))

    no_ema = dict(ckpt, model_ema=None)
    torch.save(no_ema, path)
    with pytest.raises(ValueError, match="no EMA weights"):
        atc_patch.load_pretrained(path)


def test_overrides(tmp_path) -> None:
    ckpt = reference_checkpoint("tiny", "im1k", linkage="complete", keep_rate=0.7)
    path = tmp_path / release_name("tiny", "im1k", 0.7, "complete")
    torch.save(ckpt, path)
    w = ckpt["model_ema"]
    x = _images()
    cases = [
        (
            dict(keep_rate=0.5),
            dict(method="atc", linkage="complete", keep_rate=0.5, reduction_loc=(3, 6, 9)),
        ),
        (
            dict(linkage="single", prop_attn=False),
            dict(
                method="atc",
                linkage="single",
                keep_rate=0.7,
                reduction_loc=(3, 6, 9),
                prop_attn=False,
                size_mode="reset",  # a reference file: the reference's forward
            ),
        ),
        (dict(method="tome"), dict(method="tome", keep_rate=0.7, reduction_loc=(3, 6, 9))),
        (dict(r=8), dict(method="atc", linkage="complete", r=8)),
        (
            dict(proportional_attn=False),
            dict(
                method="atc",
                linkage="complete",
                keep_rate=0.7,
                reduction_loc=(3, 6, 9),
                prop_attn=False,
                size_mode="reset",
            ),
        ),
        (
            dict(proportional_attn=False, size_mode="keep"),
            dict(
                method="atc",
                linkage="complete",
                keep_rate=0.7,
                reduction_loc=(3, 6, 9),
                prop_attn=False,
            ),
        ),
    ]
    for i, (overrides, patch) in enumerate(cases):
        model = atc_patch.load_pretrained(path, **overrides)
        expected = atc_patch.patch_settings(hand_model(None, "tiny", **patch))
        assert atc_patch.patch_settings(model) == expected, overrides
        if i in (0, 2):  # and the logits, for two of them
            assert torch.equal(_logits(model, x), _logits(hand_model(w, "tiny", **patch), x))
    plain = atc_patch.load_pretrained(path, method=None)
    assert atc_patch.patch_settings(plain) is None
    assert torch.equal(_logits(plain, x), _logits(hand_model(w, "tiny"), x))

    with pytest.raises(ValueError, match="unknown option"):
        atc_patch.load_pretrained(path, ratio=0.5)
    with pytest.raises(ValueError, match="linkage must be one of"):
        atc_patch.load_pretrained(path, linkage="ward")
    with pytest.raises(ValueError, match="not both"):
        atc_patch.load_pretrained(path, prop_attn=True, proportional_attn=True)


def test_reference_token_counts(tmp_path) -> None:
    """A reference reduction_ratio of several values is the token counts kept per location."""
    ckpt = reference_checkpoint("tiny", "im1k", linkage="average", keep_rate=0.7)
    counts = [int(196 * 0.7 ** (j + 1)) for j in range(3)]  # what keep_rate=0.7 keeps
    ckpt["args"].reduction_ratio = [float(c) for c in counts]
    path = tmp_path / "counts.pth"
    torch.save(ckpt, path)
    model = atc_patch.load_pretrained(path)
    assert atc_patch.patch_settings(model)["r"] == [0, 0, 0, 59, 0, 0, 41, 0, 0, 29, 0, 0]
    x = _images()
    ref = hand_model(
        ckpt["model_ema"], "tiny", linkage="average", keep_rate=0.7, reduction_loc=(3, 6, 9)
    )
    assert torch.equal(_logits(model, x), _logits(ref, x))


def test_reference_file_without_proportional_attention(tmp_path) -> None:
    """A reference file trained without --proportional_attn runs the reference's forward:
    token sizes reset after every block (size_mode="reset"); ours keep what they were saved
    with."""
    ckpt = reference_checkpoint("tiny", "im1k", linkage="average", keep_rate=0.7)
    ckpt["args"].proportional_attn = False
    path = tmp_path / "noprop.pth"
    torch.save(ckpt, path)
    model = atc_patch.load_pretrained(path)
    s = atc_patch.patch_settings(model)
    assert (s["prop_attn"], s["size_mode"]) == (False, "reset")
    patch = dict(linkage="average", keep_rate=0.7, reduction_loc=(3, 6, 9), prop_attn=False)
    x = _images()
    ref = hand_model(ckpt["model_ema"], "tiny", **patch, size_mode="reset")
    assert torch.equal(_logits(model, x), _logits(ref, x))
    kept = atc_patch.load_pretrained(path, size_mode="keep")
    assert atc_patch.patch_settings(kept)["size_mode"] == "keep"
    # Proportional attention asked for: the sizes are kept (the reference never resets them then).
    with_prop = atc_patch.load_pretrained(path, prop_attn=True)
    assert atc_patch.patch_settings(with_prop)["size_mode"] == "keep"

    pt.save_pretrained(model, tmp_path / "ours.pth")
    again = atc_patch.load_pretrained(tmp_path / "ours.pth")
    assert atc_patch.patch_settings(again)["size_mode"] == "reset"
    assert torch.equal(_logits(again, x), _logits(model, x))


def test_unsafe_pickle_refused(tmp_path) -> None:
    marker = tmp_path / "executed"
    ckpt = reference_checkpoint("tiny", "im1k")
    ckpt["hook"] = _Evil(str(marker))
    path = tmp_path / release_name("tiny", "im1k", 0.7)
    torch.save(ckpt, path)
    with pytest.raises(pt.UnsafeCheckpointError, match="posix.system|os.system|nt.system") as e:
        atc_patch.load_pretrained(path)
    assert "weights_only=True" in str(e.value) and "add_safe_globals" in str(e.value)
    assert not marker.exists()

    ckpt = reference_checkpoint("tiny", "im1k")
    ckpt["args"].output_dir = Path("out/run")  # a pathlib object, not allow-listed either
    torch.save(ckpt, path)
    with pytest.raises(pt.UnsafeCheckpointError, match="PosixPath|WindowsPath"):
        atc_patch.load_pretrained(path)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_sources(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        atc_patch.load_pretrained(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="keep_rate= one of"):
        atc_patch.load_pretrained("joakimbh/atc_small-im1k-complete")
    with pytest.raises(ValueError, match="no file for keep_rate=0.6"):
        atc_patch.load_pretrained("joakimbh/atc_small-im1k-complete", keep_rate=0.6)
    with pytest.raises(ValueError, match="not a Hugging Face hub file URL"):
        atc_patch.load_pretrained("https://example.com/x.pth")
    path = tmp_path / "adapter.pth"
    torch.save({"state_dict": {"backbone.spm.fc1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="ViT-Adapter"):
        atc_patch.load_pretrained(path, method="atc")


# --- the Hugging Face cache, offline -------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A temporary HF_HUB_CACHE in huggingface_hub's layout, offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo_id: str, filename: str, checkpoint: dict) -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snap = repo / "snapshots" / COMMIT
        snap.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, snap / filename)
        return snap / filename

    return put


def test_hub_offline(hub_cache) -> None:
    repo = "joakimbh/atc_tiny-im1k-complete"
    name = release_name("tiny", "im1k", 0.7, "complete")
    ckpt = reference_checkpoint("tiny", "im1k", linkage="complete", keep_rate=0.7)
    file = hub_cache(repo, name, ckpt)
    x = _images()
    ref = _logits(
        hand_model(
            ckpt["model_ema"], "tiny", linkage="complete", keep_rate=0.7, reduction_loc=(3, 6, 9)
        ),
        x,
    )
    sources = [
        dict(source=repo, keep_rate=0.7),
        dict(source=f"{repo}/{name}"),
        dict(source=f"hf-hub:{repo}/{name}"),
        dict(source=f"https://huggingface.co/{repo}/resolve/main/{name}"),
    ]
    for kwargs in sources:
        model = atc_patch.load_pretrained(**kwargs)
        assert model.pretrained_cfg["hf_hub_id"] == repo
        assert Path(model.pretrained_cfg["file"]).resolve() == file.resolve()
        assert torch.equal(_logits(model, x), ref), kwargs

    with pytest.raises(FileNotFoundError) as e:
        atc_patch.load_pretrained(repo, keep_rate=0.5)
    msg = str(e.value)
    missing = release_name("tiny", "im1k", 0.5, "complete")
    assert repo in msg and missing in msg and "HF_HUB_OFFLINE" in msg
    assert f"load_pretrained('/path/to/{missing}')" in msg


def test_timm_pretrained_offline(hub_cache) -> None:
    repo, name = "joakimbh/atc_tiny-nab-single", release_name("tiny", "nab", 0.9, "single")
    ckpt = reference_checkpoint("tiny", "nab", linkage="single", keep_rate=0.9, ema_best=False)
    hub_cache(repo, name, ckpt)
    x = _images()
    ref = _logits(
        hand_model(ckpt["model"], "tiny", linkage="single", keep_rate=0.9, reduction_loc=(3, 6, 9)),
        x,
    )
    model = timm.create_model(
        "atc_tiny_patch16_224",
        pretrained=True,
        dataset="nab",
        linkage="single",
        keep_rate=0.9,
        reduction_loc=(3, 6, 9),
        proportional_attn=True,
    ).eval()
    assert model.pretrained_cfg["hf_hub_id"] == repo
    assert model.pretrained_cfg["hf_hub_filename"] == name
    assert torch.equal(_logits(model, x), ref)
    # The same file by its tag, evaluated at another keep rate.
    model = timm.create_model("atc_tiny_patch16_224.nab_single_09", pretrained=True, keep_rate=0.5)
    assert atc_patch.patch_settings(model)["keep_rate"] == 0.5
    assert model.num_classes == 555
    with pytest.raises(FileNotFoundError):  # timm / huggingface_hub: not cached, offline
        timm.create_model("atc_tiny_patch16_224", pretrained=True, keep_rate=0.25)
    with pytest.raises(ValueError, match="no released atc_tiny file"):
        timm.create_model("atc_tiny_patch16_224", pretrained=True, keep_rate=0.6)
    with pytest.raises(ValueError, match="ema chooses"):
        timm.create_model("atc_tiny_patch16_224", ema=True)
    with pytest.raises(ValueError, match="no fine-tuned tome DeiT"):
        timm.create_model("tome_tiny_patch16_224", pretrained=True, dataset="nab")


def test_timm_fb_in1k_weights_offline(hub_cache) -> None:
    """The .fb_in1k tag reads timm's DeiT weights (model.safetensors of timm's hub repository)
    through the same reader; timm drops a head of another size, as it does for its own."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = timm.create_model("deit_tiny_patch16_224").state_dict()
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in shapes.items()}
    path = hub_cache("timm/deit_tiny_patch16_224.fb_in1k", "model.safetensors", {})
    save_file(weights, str(path))
    model = timm.create_model("tome_tiny_patch16_224", pretrained=True, num_classes=10)
    own = model.state_dict()
    assert own["head.weight"].shape == (10, 192)
    assert all(torch.equal(own[k], v) for k, v in weights.items() if not k.startswith("head."))
    assert atc_patch.patch_settings(model)["method"] == "tome"


# --- every way a checkpoint enters is read weights-only ------------------------------------------


def _evil_checkpoint(marker: Path) -> dict:
    ckpt = reference_checkpoint("tiny", "im1k")
    ckpt["hook"] = _Evil(str(marker))
    return ckpt


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _serve(folder: Path):
    """``http://127.0.0.1:<port>`` serving ``folder``, for the length of the block."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_web_urls_are_read_weights_only(tmp_path, monkeypatch) -> None:
    """A web URL (the training scripts' --teacher-path https://...) is downloaded into torch's hub
    cache, as torch.hub does, and read by the same weights-only reader: refused, not run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker, served = tmp_path / "executed", tmp_path / "served"
    served.mkdir()
    torch.save(_evil_checkpoint(marker), served / "teacher.pth")
    torch.save({"model": {"w": torch.ones(2)}}, served / "fine.pth")
    with _serve(served) as base:
        with pytest.raises(pt.UnsafeCheckpointError, match="posix.system|os.system|nt.system"):
            pt.load_checkpoint(f"{base}/teacher.pth", any_url=True)
        fine = pt.load_checkpoint(f"{base}/fine.pth", any_url=True)
        assert torch.equal(fine["model"]["w"], torch.ones(2))
        with pytest.raises(ValueError, match="not a Hugging Face hub file URL"):
            pt.load_checkpoint(f"{base}/fine.pth")  # web URLs only where the caller allows them
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "teacher.pth"
    assert cached.exists()
    with pytest.raises(pt.UnsafeCheckpointError):  # the cached copy, read again without a server
        pt.load_checkpoint(f"{base}/teacher.pth", any_url=True)
    assert not marker.exists()


def test_hub_and_timm_paths_refuse_unsafe_pickles(hub_cache, tmp_path) -> None:
    marker = tmp_path / "executed"
    repo, name = "joakimbh/atc_tiny-im1k-average", release_name("tiny", "im1k", 0.7, "average")
    file = hub_cache(repo, name, _evil_checkpoint(marker))
    entries = {
        "load_pretrained(repo, keep_rate)": lambda: atc_patch.load_pretrained(repo, keep_rate=0.7),
        "load_pretrained(hub URL)": lambda: atc_patch.load_pretrained(
            f"https://huggingface.co/{repo}/resolve/main/{name}"
        ),
        "load_checkpoint(hub id)": lambda: pt.load_checkpoint(f"{repo}/{name}"),
        "timm pretrained=True": lambda: timm.create_model("atc_tiny_patch16_224", pretrained=True),
        "timm pretrained_cfg_overlay file": lambda: timm.create_model(
            "tome_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(file))
        ),
    }
    for what, load in entries.items():
        with pytest.raises(pt.UnsafeCheckpointError, match="posix.system|os.system|nt.system"):
            load()
        assert not marker.exists(), what


# --- timm names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", atc_patch.pretrained.timm_models.MODEL_NAMES)
def test_timm_registry(name) -> None:
    """Every name, bare and with overrides (on the meta device: no init); tiny ones also run."""
    method, size = name.split("_")[:2]
    with torch.device("meta"):
        model = timm.create_model(name)
    s = atc_patch.patch_settings(model)
    assert (s["method"], s["keep_rate"], s["reduction_loc"], s["prop_attn"]) == (
        method,
        0.7,
        (3, 6, 9),
        True,
    )
    assert s.get("linkage") == ("average" if method == "atc" else None)  # tome: no linkage
    assert model.embed_dim == WIDTH[size][0] and model.num_classes == 1000
    assert model.blocks[0].attn.num_heads == WIDTH[size][1] and len(model.blocks) == 12

    opts = dict(keep_rate=0.5, reduction_loc=(2, 5), proportional_attn=False, num_classes=10)
    if method == "atc":
        opts["linkage"] = "complete"
    patch = dict(keep_rate=0.5, reduction_loc=(2, 5), prop_attn=False, linkage=opts.get("linkage"))
    if method == "atc":  # the reference DeiT's forward without proportional attention
        patch["size_mode"] = "reset"
    with torch.device("meta"):
        model = timm.create_model(name, **opts)
        assert model.num_classes == 10
        expected = atc_patch.patch_settings(hand_model(None, size, 10, method=method, **patch))
        assert atc_patch.patch_settings(model) == expected
        bad = dict(linkage="ward") if method == "atc" else dict(linkage="average")
        with pytest.raises(ValueError, match="linkage"):
            timm.create_model(name, **bad)
        model = timm.create_model(name, r=4, r_schedule="decrease")
        assert atc_patch.patch_settings(model)["r_schedule"] == "decrease"
    if size == "tiny":
        model = timm.create_model(name, **opts).eval()
        ref = hand_model(model.state_dict(), size, method=method, **patch)
        x = _images()
        assert torch.equal(_logits(model, x), _logits(ref, x))


# --- our own checkpoints --------------------------------------------------------------------------


def test_save_pretrained_roundtrip(tmp_path) -> None:
    model = timm.create_model(
        "atc_tiny_patch16_224", num_classes=80, linkage="single", keep_rate=0.5
    )
    ema = timm.create_model("atc_tiny_patch16_224", num_classes=80).eval()
    path = pt.save_pretrained(
        model, tmp_path / "ours.pth", model_ema=ema, ema_best=True, dataset="coco", epoch=3
    )
    raw = pt.load_checkpoint(path)
    assert set(raw) == {"model", "model_ema", "ema_best", "args", "epoch"}
    assert raw["args"].model == "atc_tiny_patch16_224" and raw["args"].reduction_ratio == [0.5]
    assert raw["args"].dataset == "coco" and raw["args"].linkage == "single"

    loaded = atc_patch.load_pretrained(path)
    s = atc_patch.patch_settings(loaded)
    assert (s["method"], s["linkage"], s["keep_rate"]) == ("atc", "single", 0.5)
    assert loaded.pretrained_cfg["crop_mode"] == "squash"
    atc_patch.apply_patch(
        ema, method="atc", linkage="single", keep_rate=0.5, reduction_loc=(3, 6, 9)
    )
    x = _images()
    assert torch.equal(_logits(loaded, x), _logits(ema, x))

    # A per-block r schedule survives the round trip exactly.
    atc_patch.apply_patch(model, method="tome", r=[4] * 12)
    pt.save_pretrained(model, path)
    loaded = atc_patch.load_pretrained(path)
    assert atc_patch.patch_settings(loaded)["r"] == [4] * 12
    model.eval()
    assert torch.equal(_logits(loaded, x), _logits(model, x))

    with pytest.raises(ValueError, match="needs the EMA weights"):
        pt.save_pretrained(model, path, ema_best=True)


def _hf_vit() -> torch.nn.Module:
    import transformers

    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=4,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: timm.create_model("deit3_small_patch16_224", img_size=64), "layer scale"),
        (lambda: timm.create_model("vit_small_patch16_224", img_size=64, reg_tokens=4), "register"),
        (
            lambda: timm.create_model("vit_small_patch16_224", img_size=64, global_pool="avg"),
            "global_pool='avg'",
        ),
        (_hf_vit, "transformers"),
    ],
    ids=["deit3", "reg_tokens", "global_pool_avg", "transformers_vit"],
)
def test_save_pretrained_refuses_what_load_pretrained_cannot_read(build, reason, tmp_path) -> None:
    """Models load_pretrained cannot rebuild are refused at save time with the reason, and
    nothing is written; the training writer still writes them, and load_pretrained then says
    the same reason instead of a raw load_state_dict error."""
    torch.manual_seed(0)
    model = build()
    atc_patch.apply_patch(model, method="atc", r=2)
    path = tmp_path / "ckpt.pth"
    with pytest.raises(ValueError, match=f"not saved: load_pretrained could not read .*{reason}"):
        pt.save_pretrained(model, path)
    with pytest.raises(ValueError, match=reason):
        pt.save_pretrained(timm.create_model("deit_tiny_patch16_224"), path, model_ema=model)
    assert not path.exists()
    pt.write_checkpoint(model, path)  # what train_deit.py --model <any timm name> writes
    with pytest.raises(ValueError, match=reason):
        atc_patch.load_pretrained(path)


def test_timm_names_reject_method() -> None:
    """The name fixes the method: method= is a ValueError naming the valid keywords."""
    with torch.device("meta"):
        with pytest.raises(ValueError, match=r"use 'tome_tiny_patch16_224'.*keep_rate.*linkage"):
            timm.create_model("atc_tiny_patch16_224", method="tome")
        with pytest.raises(ValueError, match=r"deit_small_patch16_224.*apply_patch"):
            timm.create_model("tome_small_patch16_224", method="kmedoids")
        with pytest.raises(ValueError, match="prop_attn or proportional_attn"):
            timm.create_model("atc_tiny_patch16_224", prop_attn=True, proportional_attn=True)


def test_distilled_roundtrip(tmp_path) -> None:
    """A DeiT with a distillation token (train_deit.py --distillation-type) saves and loads."""
    opts = dict(distilled=True, img_size=32, num_classes=5, keep_rate=0.5, reduction_loc=(1, 2))
    model = timm.create_model("tome_tiny_patch16_224", **opts).eval()
    assert model.dist_token is not None
    path = pt.save_pretrained(model, tmp_path / "distilled.pth")
    loaded = atc_patch.load_pretrained(path)
    assert loaded.dist_token is not None and loaded.num_classes == 5
    assert atc_patch.patch_settings(loaded) == atc_patch.patch_settings(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="no distillation token"):
        timm.create_model("atc_tiny_patch16_224.im1k_average_07", distilled=True, pretrained=True)


@pytest.mark.parametrize("dataset", ["im1k", "coco"])
def test_eval_transform_is_the_reference_one(dataset) -> None:
    """resolve_data_config on a loaded model gives the reference validate_deit.py transform."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    with torch.device("meta"):
        model = timm.create_model(f"atc_tiny_patch16_224.{dataset}_average_07")
    ours = create_transform(**resolve_data_config({}, model=model))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if dataset == "im1k":  # timm create_transform(224, is_training=False): crop_pct 0.875
        head = [T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)]
    else:  # build_coco_transform(is_train=False)
        head = [T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC)]
    ref = T.Compose([*head, T.ToTensor(), T.Normalize(mean, std)])
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    assert torch.equal(ours(img), ref(img))
