"""Golden outputs of the ATC repository's ``SSLBackbone_setup`` patches: its MAE fine-tuning model
(``train_mae.py --merge_fn atc --r-count R --r-sched constant``) and its off-the-shelf study of
MAE, SWAG and AugReg backbones (``validate_ots_sslbackbone.py --r R --r-sched decrease``).

    python scripts/reference/ssl_backbones.py /work/.mirror/JoakimHaurum+ATC/repo \\
        --swag /work/.mirror/facebookresearch+SWAG/repo

Reference models, on the :data:`~_reference_golden.DEIT` shape in float64:

* ``mae``: ``SSLBackbone_setup/models_vit_mae.VisionTransformer(global_pool=True)`` patched by
  ``token_reduc.patch.mae`` (no proportional attention, size-weighted average pooling), as
  ``train_mae.py`` and the off-the-shelf script build it. It is run the way its patched
  ``forward`` runs it (``_tome_info`` reset, ``forward_features``) and the features go through
  ``head``, MAE's own forward: with timm >= 1.0 ``VisionTransformer.forward_head`` asserts on
  ``global_pool=True`` (with timm 0.9 it would apply ``fc_norm`` a second time).
* ``augreg``: timm's ``VisionTransformer`` patched by ``token_reduc.patch.timm``.
* ``swag``: SWAG's own ``models/vision_transformer.py`` (github:facebookresearch/SWAG, what
  ``torch.hub.load("facebookresearch/swag", ...)`` builds) patched by
  ``token_reduc.patch.swag``; ours is torchvision's ViT (the architecture of torchvision's SWAG
  weights) with the same weights under torchvision's names.

Each with ``--merge_fn atc`` (single, complete, average) and ``tome``, ``r`` constant (the MAE
recipe) and decreasing (the off-the-shelf study). No shim is needed. Note the reference's ATC
step: it makes ``T - r`` clusters of the ``T - 1`` tokens after the class token, so it removes
``r - 1`` tokens per block; ours is built from the same flags by
``atc_patch.train.models.reference_r``.

Writes ``tests/data/reference/ssl_{mae,augreg,swag}_{constant,decrease}.npz``: per setting the
tokens after each block, the partition of the input tokens after every merge and the logits (the
script also prints the agreement of the pre-logits features).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
from _official import OfficialTree, git_head, git_show
from _official import golden as G
from torch import nn

SEED = 29
R = 4
LINKAGES = ("single", "complete", "average")
FILES = [
    "SSLBackbone_setup/models_vit_mae.py",
    "SSLBackbone_setup/token_reduc/__init__.py",
    "SSLBackbone_setup/token_reduc/merge.py",
    "SSLBackbone_setup/token_reduc/utils.py",
    "SSLBackbone_setup/token_reduc/patch/__init__.py",
    "SSLBackbone_setup/token_reduc/patch/mae.py",
    "SSLBackbone_setup/token_reduc/patch/swag.py",
    "SSLBackbone_setup/token_reduc/patch/timm.py",
]


def settings() -> list[dict]:
    out = []
    for sched in ("constant", "decrease"):
        for linkage in LINKAGES:
            out.append(dict(method="atc", linkage=linkage, r=R, r_schedule=sched))
        out.append(dict(method="tome", linkage=None, r=R, r_schedule=sched))
    return out


def setting_name(s: dict) -> str:
    what = s["linkage"] if s["method"] == "atc" else "tome"
    return f"{what}-r{s['r']}-{s['r_schedule']}"


def swag_model(swag_src: str) -> type:
    namespace: dict = {"__name__": "official_swag_vision_transformer"}
    exec(compile(swag_src, "SWAG/models/vision_transformer.py", "exec"), namespace)
    return namespace["VisionTransformer"]


def swag_name(tv_name: str) -> str:
    """torchvision's ViT state-dict key -> SWAG's."""
    name = tv_name.replace("encoder.layers.encoder_layer_", "encoder.layers.layer_")
    name = name.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2.")
    return name.replace("heads.head.", "head.layers.head.")


def reference(kind: str, s: dict, x: torch.Tensor, swag_cls: type) -> dict:
    token_reduc = sys.modules["SSLBackbone_setup.token_reduc"]
    from SSLBackbone_setup import models_vit_mae
    from SSLBackbone_setup.token_reduc.utils import parse_r

    shape = G.DEIT
    norm = partial(nn.LayerNorm, eps=1e-6)
    ours, _, _ = G.ssl_model(kind, SEED)  # the weights, under our names
    weights = ours.state_dict()
    if kind == "mae":
        model = models_vit_mae.VisionTransformer(
            global_pool=True, **shape, mlp_ratio=4, qkv_bias=True, norm_layer=norm
        )
        blocks, head = model.blocks, model.head
    elif kind == "augreg":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**shape)
        blocks, head = model.blocks, model.head
    else:
        model = swag_cls(
            image_size=shape["img_size"],
            patch_size=shape["patch_size"],
            num_layers=shape["depth"],
            num_heads=shape["num_heads"],
            hidden_dim=shape["embed_dim"],
            mlp_dim=4 * shape["embed_dim"],
            num_classes=shape["num_classes"],
        )
        weights = {swag_name(k): v for k, v in weights.items()}
        weights["encoder.pos_embedding"] = weights["encoder.pos_embedding"].transpose(0, 1)
        blocks, head = list(model.encoder.layers), model.head
    model = model.double()
    if kind == "swag":
        nn.Module.load_state_dict(model, weights)  # SWAG's own load_state_dict interpolates
    else:
        model.load_state_dict(weights)
    model.eval()

    patch = {"mae": token_reduc.patch.mae, "augreg": token_reduc.patch.timm}
    patch["swag"] = token_reduc.patch.swag
    patch[kind](model, s["method"], s["linkage"] or "average")
    model.r = s["r"] if s["r_schedule"] == "constant" else (s["r"], -1)

    counts, parts, feats = [], [], []
    module = sys.modules[
        "SSLBackbone_setup.token_reduc.patch." + ("swag" if kind == "swag" else "timm")
    ]
    orig = module.merge_wavg

    def recording_merge_wavg(merge, x, size=None):
        b, n, _ = x.shape
        eye = torch.eye(n, dtype=x.dtype)[None].expand(b, n, n)
        parts.append(merge(eye, mode="amax").argmax(dim=1))  # (B, N): the output row of a token
        return orig(merge, x, size)

    module.merge_wavg = recording_merge_wavg
    hooks = [b.register_forward_hook(lambda m, a, o: counts.append(o.shape[1])) for b in blocks]
    hooks.append(head.register_forward_hook(lambda m, a, o: feats.append(a[0])))
    try:
        with torch.no_grad():
            if kind == "mae":  # the patched forward's prologue, then MAE's forward
                model._tome_info.update(r=parse_r(len(model.blocks), model.r), size=None)
                logits = model.head(model.forward_features(x)[:, 0])
            else:
                logits = model(x)
    finally:
        module.merge_wavg = orig
        for h in hooks:
            h.remove()
    return {
        "counts": counts,
        "partitions": parts,
        "outputs": {"logits": logits, "features": feats[0]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mirror", help="git directory of github:JoakimHaurum/ATC")
    p.add_argument("--swag", required=True, help="git directory of github:facebookresearch/SWAG")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    swag_path = "models/vision_transformer.py"
    swag_cls = swag_model(git_show(args.swag, f"HEAD:{swag_path}"))
    x = G.seeded_images(SEED, G.BATCH, G.DEIT["img_size"])
    torch.set_default_dtype(torch.float64)
    with OfficialTree(args.mirror, FILES) as tree:
        __import__("SSLBackbone_setup.token_reduc")
        __import__("SSLBackbone_setup.models_vit_mae")
        for kind in G.SSL_MODELS:
            for sched in ("constant", "decrease"):
                group = [s for s in settings() if s["r_schedule"] == sched]
                arrays = {}
                for s in group:
                    key = setting_name(s)
                    ref = reference(kind, s, x, swag_cls)
                    features = ref["outputs"].pop("features")
                    arrays.update(G.golden_arrays(key, ref))
                    ours = G.ours_ssl(kind, s, x, SEED)
                    report = G.compare(ours, arrays, key)
                    report["features"] = G.relative_error(ours["outputs"]["features"], features)
                    print(f"{kind:6s} {key:26s} {report}")
                meta = tree.meta(
                    path=f"SSLBackbone_setup token_reduc.patch ({kind}, r {sched})",
                    kind=kind,
                    shape=G.DEIT,
                    batch=G.BATCH,
                    seed=SEED,
                    settings={setting_name(s): s for s in group},
                )
                if kind == "swag":
                    meta["swag"] = {
                        "reference": "github:facebookresearch/SWAG",
                        "commit": git_head(args.swag),
                        "files": [swag_path],
                    }
                if not args.dry_run:
                    print("wrote", G.save_golden(f"ssl_{kind}_{sched}", meta, arrays))
    torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
