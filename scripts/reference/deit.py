"""Golden outputs of the ATC paper's DeiT (``ATC_setup/models/atc.py``), with and without
proportional attention, against atc_patch's patched timm DeiT.

    python scripts/reference/deit.py /work/.mirror/JoakimHaurum+ATC/repo

The reference model is ``AgglomerativeClusteringVisionTransformer`` built as ``models_act.py``
builds ``atc_*_patch16_224`` (``qkv_bias``, LayerNorm eps 1e-6) with ``args.reduction_ratio =
[keep]``, ``reduction_loc = [3, 6, 9]``, ``linkage``, ``proportional_attn``, on the
:data:`~_reference_golden.DEIT` shape, float64 (``torch.set_default_dtype``: its merge buffers
are created in the default dtype). No shim is needed. Ours: the same weights in timm's
``VisionTransformer`` with ``apply_patch(method="atc", ...)``; without proportional attention
with ``size_mode="reset"`` (the reference forgets token sizes after every block).

Writes ``tests/data/reference/deit_{prop,noprop}.npz``: per setting the tokens after each
block, the partition of every reduction (class token included) and the logits of 4 images.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _official import OfficialTree, mirror_args
from _official import golden as G
from torch import nn

NAME = "deit"
SEED = 23
LINKAGES = ("single", "complete", "average")
KEEP_RATES = (0.9, 0.5)
LOC = (3, 6, 9)


def settings() -> list[dict]:
    return [
        dict(linkage=linkage, keep_rate=keep, prop_attn=prop)
        for prop in (True, False)
        for linkage in LINKAGES
        for keep in KEEP_RATES
    ]


def setting_name(s: dict) -> str:
    return f"{s['linkage']}-keep{s['keep_rate']}-{'prop' if s['prop_attn'] else 'noprop'}"


def ours(s: dict, x: torch.Tensor) -> dict:
    return G.ours_deit(s, x, SEED, LOC)


def reference(atc, s: dict, x: torch.Tensor) -> dict:
    args = argparse.Namespace(
        reduction_ratio=[s["keep_rate"]],
        reduction_loc=list(LOC),
        linkage=s["linkage"],
        proportional_attn=s["prop_attn"],
    )
    shape = {k: v for k, v in G.DEIT.items()}
    model = atc.AgglomerativeClusteringVisionTransformer(
        **shape, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), args=args
    )
    model = G.seeded(model, SEED)
    counts, parts = [], []

    def hook(module, args, out):
        counts.append(out[0].shape[1])
        if out[2] is not None:
            parts.append(out[2])

    hooks = [b.register_forward_hook(hook) for b in model.blocks]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return {"counts": counts, "partitions": parts, "outputs": {"logits": logits}}


def main() -> None:
    args = mirror_args(__doc__)
    x = G.seeded_images(SEED, G.BATCH, G.DEIT["img_size"])
    torch.set_default_dtype(torch.float64)
    with OfficialTree(args.mirror, ["ATC_setup/models/atc.py"]) as tree:
        atc = tree.load("ATC_setup/models/atc.py")
        for prop in (True, False):
            name = f"{NAME}_{'prop' if prop else 'noprop'}"
            group = [s for s in settings() if s["prop_attn"] == prop]
            arrays = {}
            for s in group:
                key = setting_name(s)
                arrays.update(G.golden_arrays(key, reference(atc, s, x)))
                print(f"{key:28s} {G.compare(ours(s, x), arrays, key)}")
            meta = tree.meta(
                path="ATC_setup DeiT (models/atc.py)",
                shape=G.DEIT,
                batch=G.BATCH,
                seed=SEED,
                reduction_loc=LOC,
                settings={setting_name(s): s for s in group},
            )
            if not args.dry_run:
                print("wrote", G.save_golden(name, meta, arrays))
    torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
