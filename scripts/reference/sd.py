"""Golden outputs of the ATC repository's Stable Diffusion patch (``SD_setup/token_reduc_sd``),
its ToMe-SD path and its ATC path, against atc_patch's diffusers patch.

    python scripts/reference/sd.py /work/.mirror/JoakimHaurum+ATC/repo

The reference ``apply_patch`` is applied to the tiny SD 1.x-layout ``UNet2DConditionModel`` of
``atc_patch.testing`` (a diffusers ``ModelMixin``, which the patch accepts as it is) with the
arguments ``sd_generate.py`` passes; ours gets the same weights and ``apply_patch`` options
(:func:`_reference_golden.sd_options`). Float64, batch 2, 16 x 16 latents (256 tokens at
downsample 1).

ToMe-SD (``merge_fn_str="tome"``) runs as shipped. With ``use_rand`` the reference forks its
generator from the global RNG on its first merge (``torch.manual_seed(rand_seed)`` just before
the call here); ours draws from ``torch.Generator().manual_seed(rand_seed)``.

The ATC path does not run as shipped: ``merge.agglomerative_clustering`` evaluates
``np.triu_indices(T, k=1)`` with ``T`` undefined (a ``NameError`` on its first call); the result
is never used. Shim: that one line is removed. Nothing else is changed.

Writes ``tests/data/reference/sd_{tome,atc}.npz``: per setting the partition of every merging
block and a fixed random projection of the UNet's output.
"""

from __future__ import annotations

import torch
from _official import OfficialTree, Shim, mirror_args
from _official import golden as G

SEED = 41
FILES = [
    "SD_setup/token_reduc_sd/__init__.py",
    "SD_setup/token_reduc_sd/merge.py",
    "SD_setup/token_reduc_sd/patch.py",
    "SD_setup/token_reduc_sd/utils.py",
]
SHIMS = (
    Shim(
        "SD_setup/token_reduc_sd/merge.py",
        "        upper_traingle_indexes = np.triu_indices(T, k=1)\n",
        "",
        "NameError: T is undefined in agglomerative_clustering (the value is never used)",
    ),
)


def settings() -> dict[str, dict]:
    base = dict(
        ratio=0.5,
        max_downsample=1,
        sx=2,
        sy=2,
        use_rand=False,
        merge_attn=True,
        merge_crossattn=False,
        merge_mlp=False,
        merge_fn_str="tome",
        linkage="",
        rand_seed=0,
    )
    out = {
        "tome-0.5": dict(base),
        "tome-0.5-rand": dict(base, use_rand=True, rand_seed=5),
        "tome-0.3-all-ds2": dict(
            base, ratio=0.3, max_downsample=2, merge_crossattn=True, merge_mlp=True, sy=1
        ),
    }
    for linkage in ("single", "complete", "average"):
        out[f"atc-{linkage}-0.5"] = dict(base, merge_fn_str="atc", linkage=linkage)
    out["atc-average-0.1-ds2"] = dict(
        base, merge_fn_str="atc", linkage="average", ratio=0.1, max_downsample=2
    )
    return out


def reference(token_reduc_sd, s: dict) -> dict:
    unet = G.sd_unet(SEED)
    args = G.sd_inputs(unet, SEED)
    token_reduc_sd.apply_patch(
        unet,
        ratio=s["ratio"],
        max_downsample=s["max_downsample"],
        sx=s["sx"],
        sy=s["sy"],
        use_rand=s["use_rand"],
        merge_attn=s["merge_attn"],
        merge_crossattn=s["merge_crossattn"],
        merge_mlp=s["merge_mlp"],
        merge_fn_str=s["merge_fn_str"],
        atc_linkage=s["linkage"],
    )
    info = unet._tome_info["args"]
    orig, parts, counts = info["merge_fn"], [], []

    def recording_merge_fn(x, *args, **kwargs):
        m, u = orig(x, *args, **kwargs)
        b, n, c = x.shape
        k = m(x).shape[1]
        if k < n:  # a merge (r > 0): unmerge each output token's index to the tokens it holds
            # (the ATC merge/unmerge closures only take tensors as wide as the metric)
            index = torch.arange(k, dtype=x.dtype)[None, :, None].expand(b, k, c)
            parts.append(u(index)[..., 0].round().long())
            counts.append(k)
        return m, u

    info["merge_fn"] = recording_merge_fn
    torch.manual_seed(s["rand_seed"])  # the generator is forked from this state
    with torch.no_grad():
        out = unet(*args).sample
    return {
        "counts": counts,
        "partitions": parts,
        "independent": True,
        "outputs": {"sample": G.project(out, SEED, width=16)},
    }


def main() -> None:
    args = mirror_args(__doc__)
    torch.set_default_dtype(torch.float64)
    with OfficialTree(args.mirror, FILES, SHIMS) as tree:
        token_reduc_sd = tree.package("SD_setup.token_reduc_sd")
        for method in ("tome", "atc"):
            group = {k: s for k, s in settings().items() if s["merge_fn_str"] == method}
            arrays = {}
            for key, s in group.items():
                arrays.update(G.golden_arrays(key, reference(token_reduc_sd, s)))
                print(f"{key:22s} {G.compare(G.ours_sd(s, SEED), arrays, key)}")
            meta = tree.meta(
                path=f"SD_setup token_reduc_sd ({'ToMe-SD' if method == 'tome' else 'ATC'} path)",
                unet="atc_patch.testing.unet_config('tiny-sd')",
                batch=G.SD_BATCH,
                seed=SEED,
                settings=group,
            )
            if not args.dry_run:
                print("wrote", G.save_golden(f"sd_{method}", meta, arrays))
    torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
