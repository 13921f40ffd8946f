"""Golden outputs of the ATC repository's throughput benchmark models (``ATC_Benchmark/models``).

    python scripts/reference/benchmark.py /work/.mirror/JoakimHaurum+ATC/repo

``benchmark_merging_method.py`` builds its models through ``ATC_Benchmark/models_act.py``,
whose builders import ``..ICCV_Benchmark.models.*`` (a package the repository does not
contain; the relative import also reaches above the top-level package), so the script does not
run as shipped. The model classes are built here directly, with the arguments those builders
and ``benchmark_merging_method.py`` pass (``reduction_loc=[3, 6, 9]``, ``proportional_attn``,
``k_neighbors=5``, ``equal_weight=False``), on the :data:`~_reference_golden.DEIT` shape in
float64. No shim of the code itself is needed.

* ``tome.py``: ``ToMeVisionTransformer``, keep rates 0.9 / 0.7 / 0.5 / 0.25 at blocks 3, 6, 9;
  ours is ``apply_patch(method="tome", keep_rate_mode="reference", prop_attn=True)``. Writes
  ``benchmark_tome.npz`` (tokens after each block, partitions, logits).
* ``dpcknn.py``: the clustering step ``cluster_dpc_knn`` (distances ``cdist(x, x) / sqrt(C)``,
  5 neighbours, density noise from ``torch.rand`` seeded here) on seeded points, against
  ``atc_patch.kernel.centers.dpcknn_labels`` on the same distances. Writes
  ``benchmark_dpcknn.npz``. The benchmark's DPC-KNN *model* is not reproduced: it clusters the
  hidden states before a block and merges with a learned token score (a new ``Linear`` per
  location), which a patch of a pretrained model has no weights for; atc_patch's ``dpcknn``
  clusters the attention keys between attention and MLP and merges by token size.
* ``kmedoids.py`` is not reproduced, see docs/pretrained.md ("Fidelity").
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _official import OfficialTree, mirror_args
from _official import golden as G
from torch import nn

SEED = 31
LOC = (3, 6, 9)
KEEP_RATES = (0.9, 0.7, 0.5, 0.25)
CLUSTERS = (57, 32, 16, 8)  # of 64 points
K_NEIGHBORS = 5
POINTS = dict(batch=G.BATCH, num_tokens=64, dim=48)


def tome_reference(tome, keep: float, x: torch.Tensor) -> dict:
    args = argparse.Namespace(reduction_ratio=[keep], reduction_loc=list(LOC))
    model = tome.ToMeVisionTransformer(
        **G.DEIT, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), args=args
    )
    model = G.seeded(model, SEED)
    counts, parts = [], []
    orig = tome.merge_wavg

    def recording_merge_wavg(merge, x, size=None):
        b, n, _ = x.shape
        eye = torch.eye(n, dtype=x.dtype)[None].expand(b, n, n)
        parts.append(merge(eye, mode="sum").argmax(dim=1))
        return orig(merge, x, size)

    tome.merge_wavg = recording_merge_wavg
    hooks = [
        b.register_forward_hook(lambda m, a, o: counts.append(o[0].shape[1])) for b in model.blocks
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        tome.merge_wavg = orig
        for h in hooks:
            h.remove()
    return {"counts": counts, "partitions": parts, "outputs": {"logits": logits}}


def main() -> None:
    args = mirror_args(__doc__)
    files = ["ATC_Benchmark/models/tome.py", "ATC_Benchmark/models/dpcknn.py"]
    torch.set_default_dtype(torch.float64)
    with OfficialTree(args.mirror, files) as tree:
        tome = tree.load("ATC_Benchmark/models/tome.py")
        dpcknn = tree.load("ATC_Benchmark/models/dpcknn.py")

        x = G.seeded_images(SEED, G.BATCH, G.DEIT["img_size"])
        arrays, settings = {}, {}
        for keep in KEEP_RATES:
            key = f"keep{keep}"
            settings[key] = {"keep_rate": keep}
            arrays.update(G.golden_arrays(key, tome_reference(tome, keep, x)))
            ours = G.ours_benchmark_tome(settings[key], x, SEED, LOC)
            print(f"tome   {key:10s} {G.compare(ours, arrays, key)}")
        meta = tree.meta(
            path="ATC_Benchmark ToMe DeiT (models/tome.py)",
            shape=G.DEIT,
            batch=G.BATCH,
            seed=SEED,
            reduction_loc=LOC,
            settings=settings,
        )
        if not args.dry_run:
            print("wrote", G.save_golden("benchmark_tome", meta, arrays))

        points = G.dpcknn_points(SEED, **POINTS)
        arrays, settings = {}, {}
        for k in CLUSTERS:
            key = f"clusters{k}"
            settings[key] = {"num_clusters": k, "k_neighbors": K_NEIGHBORS}
            torch.manual_seed(SEED)  # the density noise
            labels, _ = dpcknn.cluster_dpc_knn(points, k, K_NEIGHBORS)
            arrays[f"{key}/labels"] = G.canonical(labels)
            same = (G.ours_dpcknn(points, k, K_NEIGHBORS) == arrays[f"{key}/labels"]).all(1)
            print(f"dpcknn {key:10s} partitions equal {int(same.sum())}/{len(same)}")
        meta = tree.meta(
            path="ATC_Benchmark DPC-KNN clustering step (models/dpcknn.py cluster_dpc_knn)",
            points=POINTS,
            seed=SEED,
            settings=settings,
        )
        if not args.dry_run:
            print("wrote", G.save_golden("benchmark_dpcknn", meta, arrays))
    torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
