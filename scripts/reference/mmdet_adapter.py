"""Golden outputs of the ATC paper's detection backbone, ``ToMeATCViTAdapter`` (``MMDet_setup``,
the ``tomeatc-adapter-{t,s}-*-ftune`` configs), against ``atc_patch.mmdet.ViTAdapter``.

    python scripts/reference/mmdet_adapter.py /work/.mirror/JoakimHaurum+ATC/repo

The official backbone is written for mmdet 2.x / mmcv 1.x and a compiled deformable-attention
extension; mmdet 3.3 / mmcv 2.1 are installed here. Shims, none of which touches the backbone's
algorithm:

* module stubs: ``mmcv.runner`` (``BaseModule`` is mmengine's now; only ``base/vit.py``'s other
  classes use it), ``mmdet.models.builder`` (``BACKBONES.register_module()``, registration
  only), ``mmdet.utils.get_root_logger`` (logging in ``base/vit.py``'s weight loading),
  ``MMDet_setup.mmcv_custom`` (checkpoint loading and optimizer hooks for mmcv 1.x, unused);
* ``MultiScaleDeformableAttention``, the C++/CUDA extension built by ``MMDet_setup/ops/make.sh``:
  a stub whose ``ms_deform_attn_forward`` calls the repository's own pure-PyTorch
  ``ms_deform_attn_core_pytorch`` (``ops/functions/ms_deform_attn_func.py``);
* one text shim in ``base/vit.py``: ``PatchEmbed.__init__`` also accepts (and ignores) the
  ``dynamic_img_pad`` / ``device`` / ``dtype`` keywords timm >= 1.0's ``VisionTransformer``
  passes to its ``embed_layer``.

The backbone is built as the configs build it (``interaction_indexes``, ``deform_num_heads=6``,
``cffn_ratio=0.25``, ``reduction_loc=[3, 6, 9]``) at width 48 on 128 x 128 images, float64;
ours gets the same weights under its names (``atc_patch.mmdet.checkpoint`` maps them).

Writes ``tests/data/reference/mmdet_adapter.npz``: per setting the tokens after each block, the
partition of the 8 x 8 grid after every merge and a fixed random projection of each of the four
output maps.
"""

from __future__ import annotations

import logging
import sys
import types

import torch
from _official import OfficialTree, Shim, mirror_args
from _official import golden as G

SEED = 37
ROOT = "MMDet_setup/mmdet_custom/models/backbones/"
FILES = [
    ROOT + "tome_atc_adapter.py",
    ROOT + "adapter_modules.py",
    ROOT + "base/tome_atc_vit.py",
    ROOT + "base/vit.py",
    "MMDet_setup/ops/modules/__init__.py",
    "MMDet_setup/ops/modules/ms_deform_attn.py",
    "MMDet_setup/ops/functions/__init__.py",
    "MMDet_setup/ops/functions/ms_deform_attn_func.py",
]
SHIMS = (
    Shim(
        ROOT + "base/vit.py",
        "norm_layer=None, flatten=True, bias=True):",
        "norm_layer=None, flatten=True, bias=True, **timm_kwargs):",
        "timm >= 1.0 passes dynamic_img_pad/device/dtype to embed_layer",
    ),
)
STUBS = (
    "mmcv.runner: BaseModule from mmengine.model (mmcv 2 moved it)",
    "mmdet.models.builder: BACKBONES.register_module() as a no-op (mmdet 3 removed builder)",
    "mmdet.utils.get_root_logger: logging.getLogger (mmdet 3 removed it)",
    "MMDet_setup.mmcv_custom: empty (mmcv 1.x checkpoint/optimizer helpers, unused here)",
    "MultiScaleDeformableAttention (compiled extension): ms_deform_attn_forward = the repo's "
    "ms_deform_attn_core_pytorch",
)


def settings() -> dict[str, dict]:
    out = {}
    for linkage in ("single", "complete", "average"):
        for ratio in (0.7, 0.5):
            out[f"{linkage}-{ratio}-prop"] = dict(
                method="atc", linkage=linkage, reduction_ratio=ratio, proportional_attn=True
            )
    out["average-0.7-noprop"] = dict(
        method="atc", linkage="average", reduction_ratio=0.7, proportional_attn=False
    )
    for ratio in (0.7, 0.25):
        out[f"tome-{ratio}-prop"] = dict(
            method="tome", linkage=None, reduction_ratio=ratio, proportional_attn=True
        )
    return out


def install_stubs() -> None:
    from mmengine.model import BaseModule

    runner = types.ModuleType("mmcv.runner")
    runner.BaseModule = BaseModule
    builder = types.ModuleType("mmdet.models.builder")

    class Registry:
        def register_module(self, *args, **kwargs):
            return lambda cls: cls

    builder.BACKBONES = Registry()
    custom = types.ModuleType("MMDet_setup.mmcv_custom")
    custom.my_load_checkpoint = None
    msda = types.ModuleType("MultiScaleDeformableAttention")

    def ms_deform_attn_forward(value, shapes, level_start, locations, weights, im2col_step):
        from MMDet_setup.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch

        return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    msda.ms_deform_attn_forward = ms_deform_attn_forward
    sys.modules.update(
        {
            "mmcv.runner": runner,
            "mmdet.models.builder": builder,
            "MMDet_setup.mmcv_custom": custom,
            "MultiScaleDeformableAttention": msda,
        }
    )
    import mmdet.utils

    mmdet.utils.get_root_logger = logging.getLogger


def reference(adapter_cls, s: dict, x: torch.Tensor) -> dict:
    shape = dict(G.ADAPTER)
    model = adapter_cls(
        **shape,
        patch_size=16,
        mlp_ratio=4,
        drop_path_rate=0.0,
        with_cffn=True,
        add_vit_feature=True,
        use_extra_extractor=True,
        layer_scale=False,
        window_attn=[False] * 12,
        window_size=[None] * 12,
        pretrained=None,
        reduction_loc=[3, 6, 9],
        reduction_ratio=s["reduction_ratio"],
        linkage=s["linkage"] if s["method"] == "atc" else "tome",
        proportional_attn=s["proportional_attn"],
    )
    model = G.seeded(model, SEED)
    counts, parts = [], []

    def hook(module, args, out):
        counts.append(out[0].shape[1])
        merge = out[2]
        if merge is not None:
            b, n = args[0].shape[:2]
            eye = torch.eye(n, dtype=args[0].dtype)[None].expand(b, n, n)
            parts.append(merge(eye, mode="sum").argmax(dim=1))

    hooks = [b.register_forward_hook(hook) for b in model.blocks]
    try:
        with torch.no_grad():
            maps = model(x)
    finally:
        for h in hooks:
            h.remove()
    maps = torch.stack([G.project(m, SEED) for m in maps])  # (4, B, 8)
    return {"counts": counts, "partitions": parts, "outputs": {"maps": maps}}


def main() -> None:
    args = mirror_args(__doc__)
    x = G.seeded_images(SEED, G.ADAPTER_BATCH, G.ADAPTER_IMAGE)
    torch.set_default_dtype(torch.float64)
    saved = {k: sys.modules.get(k) for k in ("mmcv.runner", "mmdet.models.builder")}
    with OfficialTree(args.mirror, FILES, SHIMS) as tree:
        install_stubs()
        module = tree.package("MMDet_setup.mmdet_custom.models.backbones.tome_atc_adapter")
        arrays = {}
        for key, s in settings().items():
            arrays.update(G.golden_arrays(key, reference(module.ToMeATCViTAdapter, s, x)))
            print(f"{key:22s} {G.compare(G.ours_adapter(s, x, SEED), arrays, key)}")
        meta = tree.meta(
            path="MMDet_setup ToMeATCViTAdapter (tomeatc-adapter configs)",
            stubs=list(STUBS),
            shape=G.ADAPTER,
            image=G.ADAPTER_IMAGE,
            batch=G.ADAPTER_BATCH,
            seed=SEED,
            settings=settings(),
        )
        if not args.dry_run:
            print("wrote", G.save_golden("mmdet_adapter", meta, arrays))
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
    torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
