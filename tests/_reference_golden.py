"""What the golden reference tests and the scripts that record them share.

The scripts in ``scripts/reference/`` run the official ATC code (github:JoakimHaurum/ATC) on
small random-init models and store what it computes in ``tests/data/reference/*.npz``; the tests
run atc_patch on the same models and compare. Both sides build their weights and inputs here, so
nothing but this module (and no reference code) is needed to replay a golden file.

* Weights: :func:`seeded_weights` gives every tensor of a state dict values drawn from a numpy
  generator seeded by ``(seed, crc32(name))``, so a tensor's values depend only on its name and
  shape, not on the model class, the parameter order or the library versions.
* Inputs: :func:`seeded_images`.
* Partitions: :func:`canonical` renumbers labels by first occurrence, so two label vectors
  describe the same partition exactly when their canonical forms are equal.
* Our side of a forward: :class:`PlanRecorder` (the merge plans a forward made, in order) and
  :class:`BlockCounter` (the tokens each block hands on).
* Golden files: :func:`save_golden` / :func:`load_golden`: one ``.npz`` per model path (and
  setting group) with a ``meta`` JSON string (the reference commit, shims, settings) and arrays
  named ``<setting>/<what>``; :func:`golden_arrays` writes a forward's result, :func:`compare`
  measures one against them.
* The cases, our side: each model path built the way the paper's scripts build it, from public
  API only: :func:`ours_deit`, :func:`ours_ssl`, :func:`ours_benchmark_tome`,
  :func:`ours_dpcknn`, :func:`ours_adapter`, :func:`ours_sd`.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import atc_patch
from atc_patch.kernel.plan import MergePlan

GOLDEN_DIR = Path(__file__).parent / "data" / "reference"


# --- weights and inputs --------------------------------------------------------------------------


def _values(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    normal = rng.standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return 0.5 + rng.uniform(size=shape)
    if leaf == "running_mean" or leaf.endswith("bias"):
        return 0.1 * normal
    if len(shape) == 1 and leaf == "weight":  # norm scales
        return 1.0 + 0.2 * normal
    if leaf.endswith("weight") and len(shape) >= 2:
        return normal / np.sqrt(float(np.prod(shape[1:])))
    return 0.5 * normal  # class tokens, position and level embeddings, gates


def seeded_weights(
    state_dict: Mapping[str, Tensor], seed: int, rename: Callable[[str], str] | None = None
) -> dict[str, Tensor]:
    """Values for every floating tensor of ``state_dict`` (others are copied), float64.

    ``rename`` maps a key to the name its values are drawn for (to give two models with
    different key names the same weights). Linear/conv weights are ``N(0, 1 / fan_in)``, norm
    scales ``1 + 0.2 N``, biases ``0.1 N``, other parameters ``0.5 N``.
    """
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        name = rename(key) if rename is not None else key
        out[key] = torch.from_numpy(_values(name, tuple(value.shape), seed))
    return out


def seeded(model: nn.Module, seed: int, rename: Callable[[str], str] | None = None) -> nn.Module:
    """``model`` in float64 with :func:`seeded_weights`, in eval mode."""
    model = model.double()
    model.load_state_dict(seeded_weights(model.state_dict(), seed, rename))
    return model.eval()


def seeded_images(seed: int, batch: int, size: int | tuple[int, int], channels: int = 3) -> Tensor:
    """``(batch, channels, H, W)`` float64 standard-normal images."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([seed, 7])
    return torch.from_numpy(rng.standard_normal((batch, channels, h, w)))


# --- partitions ----------------------------------------------------------------------------------


def canonical(labels: np.ndarray | Tensor) -> np.ndarray:
    """``(B, N)`` labels renumbered in order of first occurrence in each row (int16)."""
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    out = np.empty(labels.shape, dtype=np.int16)
    for b, row in enumerate(labels.reshape(-1, labels.shape[-1])):
        names: dict[int, int] = {}
        out.reshape(-1, labels.shape[-1])[b] = [names.setdefault(int(v), len(names)) for v in row]
    return out


def composite(steps: Iterable[np.ndarray | Tensor]) -> list[np.ndarray]:
    """The partitions of the input tokens after each merge step, canonical.

    ``steps`` are the label vectors ``(B, N_k)`` of consecutive merges, each over the tokens the
    previous one output, in their slot order. Composed, they say which input tokens share a
    token after each step, whatever order each implementation keeps its tokens in. Steps that
    merge nothing (the same number of clusters as before, e.g. a permutation) are dropped.
    """
    out: list[np.ndarray] = []
    grid: np.ndarray | None = None
    for labels in steps:
        labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
        grid = labels if grid is None else np.take_along_axis(labels, grid, axis=1)
        part = canonical(grid)
        clusters = int(part.max()) + 1 if part.size else 0
        before = int(out[-1].max()) + 1 if out else part.shape[-1]
        if clusters < before:
            out.append(part)
    return out


class PlanRecorder:
    """Record the merge plans atc_patch applies while the ``with`` block runs.

    Every :class:`~atc_patch.kernel.plan.MergePlan` that merges something is recorded once, in
    the order of its first use: ``labels`` (``(B, N)`` int64 numpy, the output slot of every
    token), ``num_in``, ``num_out``. Identity plans (nothing merges) are not recorded.
    """

    def __init__(self) -> None:
        self.plans: list[dict[str, Any]] = []
        self._seen: set[int] = set()
        self._orig = MergePlan.merge

    def __enter__(self) -> PlanRecorder:
        recorder, orig = self, self._orig

        def merge(plan: MergePlan, x: Tensor, mode: str = "mean") -> Tensor:
            if not plan.is_identity and id(plan) not in recorder._seen:
                recorder._seen.add(id(plan))
                recorder.plans.append(
                    {
                        "labels": plan.labels.cpu().numpy(),
                        "num_in": plan.num_in,
                        "num_out": plan.num_out,
                        "plan": plan,  # keeps id() unique while recording
                    }
                )
            return orig(plan, x, mode)

        MergePlan.merge = merge  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        MergePlan.merge = self._orig  # type: ignore[method-assign]
        for p in self.plans:
            p.pop("plan", None)


class BlockCounter:
    """Tokens leaving each of ``blocks`` in the forwards run inside the ``with`` block.

    Reads the first tensor of a block's output (a tensor, a tuple's first item, or ``.x``).
    """

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.counts: list[int] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> BlockCounter:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            x = out.x if hasattr(out, "x") else out[0] if isinstance(out, tuple) else out
            self.counts.append(int(x.shape[1]))

        self._hooks = [b.register_forward_hook(hook) for b in self.blocks]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()


# --- golden files --------------------------------------------------------------------------------


def save_golden(name: str, meta: dict[str, Any], arrays: Mapping[str, Any]) -> Path:
    """Write ``tests/data/reference/<name>.npz`` (compressed) with ``meta`` as JSON."""
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    path = GOLDEN_DIR / f"{name}.npz"
    data = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez_compressed(path, meta=np.array(json.dumps(meta, sort_keys=True)), **data)
    return path


def load_golden(name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` of ``tests/data/reference/<name>.npz``."""
    with np.load(GOLDEN_DIR / f"{name}.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
        meta = json.loads(str(f["meta"]))
    return meta, arrays


# --- comparing a forward with a golden file ------------------------------------------------------


def relative_error(ours: Tensor | np.ndarray, ref: np.ndarray) -> float:
    """``max |ours - ref| / max |ref|`` (0 for two empty arrays)."""
    ours = np.asarray(ours.detach().cpu() if isinstance(ours, Tensor) else ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {ours.shape} != reference {ref.shape}")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return float(np.abs(ours - ref).max()) / scale if ref.size else 0.0


def compare(result: Mapping[str, Any], golden: Mapping[str, np.ndarray], prefix: str) -> dict:
    """Agreement of one forward (``result``, from a ``run_*`` function below) with the golden
    arrays ``<prefix>/...``: ``counts_equal``, ``partitions`` (equal, total; the composite
    partitions of the input tokens, see :func:`composite`) and the relative error of every
    float output the golden file holds."""
    out: dict[str, Any] = {}
    counts = golden[f"{prefix}/counts"]
    out["counts_equal"] = list(result["counts"]) == counts.tolist()
    ref = golden.get(f"{prefix}/labels", np.zeros((0,), np.int8))
    ours = list(stack_partitions(partitions_of(result), ref.shape[-1] if ref.size else 0))
    equal = sum(1 for p, q in zip(ours, ref) if p.shape == q.shape and np.array_equal(p, q))
    out["partitions"] = (equal if len(ours) == len(ref) else 0, len(ref))
    for name, value in result["outputs"].items():
        if f"{prefix}/{name}" in golden:
            out[name] = relative_error(value, golden[f"{prefix}/{name}"])
    return out


def partitions_of(result: Mapping[str, Any]) -> list[np.ndarray]:
    """The partitions a golden file stores for ``result``: :func:`composite` of consecutive
    merges (a ViT), or each merge's own canonical partition when ``result["independent"]``
    (merges over the same full token grid, as the diffusion patch's blocks)."""
    if result.get("independent"):
        return [canonical(p) for p in result["partitions"]]
    return composite(result["partitions"])


def stack_partitions(parts: list[np.ndarray], width: int = 0) -> np.ndarray:
    """``(P, B, N)`` int16 of partitions over up to ``N`` tokens (at least ``width``), shorter
    ones padded with -1 (a diffusion UNet merges grids of several sizes)."""
    if not parts:
        return np.zeros((0,), np.int16)
    n = max([width, *(p.shape[-1] for p in parts)])
    out = np.full((len(parts), *parts[0].shape[:-1], n), -1, dtype=np.int16)
    for i, p in enumerate(parts):
        out[i, ..., : p.shape[-1]] = p
    return out


def golden_arrays(prefix: str, result: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``result`` (counts, the label vectors of its merges, outputs) as golden arrays under
    ``prefix`` (the partitions stored composite, see :func:`composite`)."""
    arrays = {f"{prefix}/counts": np.asarray(result["counts"], dtype=np.int16)}
    parts = partitions_of(result)
    if parts:
        arrays[f"{prefix}/labels"] = stack_partitions(parts)
    for name, value in result["outputs"].items():
        arrays[f"{prefix}/{name}"] = np.asarray(
            value.detach().cpu() if isinstance(value, Tensor) else value, dtype=np.float64
        )
    return arrays


# --- the cases: our side -------------------------------------------------------------------------

# A DeiT shape small enough for tests: 64 px images in 8 px patches (64 patch tokens + class
# token), 12 blocks so the paper's reduction_loc (3, 6, 9) applies.
DEIT = dict(img_size=64, patch_size=8, embed_dim=48, depth=12, num_heads=3, num_classes=10)
BATCH = 4


def deit(seed: int, **kwargs: Any) -> nn.Module:
    """timm's ``VisionTransformer`` of shape :data:`DEIT` (class token pooling), float64, eval,
    with :func:`seeded_weights`."""
    from timm.models.vision_transformer import VisionTransformer

    return seeded(VisionTransformer(**{**DEIT, **kwargs}), seed)


def run_model(
    model: nn.Module, blocks: Iterable[nn.Module], head: nn.Module, x: Tensor
) -> dict[str, Any]:
    """One forward ``model(x)``: the tokens leaving each of ``blocks``, the label vector of
    every merge (in order), and the ``logits`` and pre-logits ``features`` (the input of
    ``head``)."""
    seen: list[Tensor] = []
    hook = head.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad(), PlanRecorder() as rec, BlockCounter(blocks) as cnt:
            logits = model(x)
    finally:
        hook.remove()
    return {
        "counts": cnt.counts,
        "partitions": [p["labels"] for p in rec.plans],
        "outputs": {"logits": logits, "features": seen[0]},
    }


def run_vit(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """:func:`run_model` of a (patched) timm ViT, logits only."""
    out = run_model(model, model.blocks, model.head, x)
    del out["outputs"]["features"]
    return out


def ours_deit(setting: Mapping[str, Any], x: Tensor, seed: int, loc: tuple[int, ...]) -> dict:
    """The ATC DeiT of ``ATC_setup`` the reference way: ``apply_patch(method="atc")`` with the
    setting's ``linkage``, ``keep_rate``, ``prop_attn`` at ``loc``; without proportional
    attention ``size_mode="reset"`` (the reference forgets token sizes after every block)."""
    model = deit(seed)
    size_mode = "keep" if setting["prop_attn"] else "reset"
    atc_patch.apply_patch(
        model, method="atc", reduction_loc=loc, size_mode=size_mode, **dict(setting)
    )
    return run_vit(model, x)


# The ATC repository's off-the-shelf study and MAE recipe (``SSLBackbone_setup``): ``r`` tokens
# per block, constant or ToMe's decreasing ramp, on three backbones.
SSL_MODELS = ("mae", "augreg", "swag")


def ssl_model(kind: str, seed: int) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """``(model, blocks, head)`` of shape :data:`DEIT` for ``kind``: ``"mae"`` (timm ViT with
    global average pooling and ``fc_norm``, as MAE's ``models_vit``), ``"augreg"`` (timm ViT,
    class token) or ``"swag"`` (torchvision's ViT, the architecture of the SWAG weights)."""
    if kind == "swag":
        from torchvision.models.vision_transformer import VisionTransformer as TV

        model = TV(
            image_size=DEIT["img_size"],
            patch_size=DEIT["patch_size"],
            num_layers=DEIT["depth"],
            num_heads=DEIT["num_heads"],
            hidden_dim=DEIT["embed_dim"],
            mlp_dim=4 * DEIT["embed_dim"],
            num_classes=DEIT["num_classes"],
        )
        model = seeded(model, seed)
        return model, list(model.encoder.layers), model.heads
    model = deit(seed, global_pool="avg") if kind == "mae" else deit(seed)
    return model, list(model.blocks), model.head


def ours_ssl(kind: str, setting: Mapping[str, Any], x: Tensor, seed: int) -> dict[str, Any]:
    """Our model for the reference flags ``--merge_fn``, ``--r``/``--r-count``, ``--r-sched``,
    ``--linkage`` on ``kind``: what ``benchmarks/off_the_shelf.py`` and
    ``examples/train_mae.py`` build (:func:`atc_patch.train.models.reference_r`; no
    proportional attention on MAE, as the reference's MAE patch)."""
    from atc_patch.train.models import reference_r

    model, blocks, head = ssl_model(kind, seed)
    method = setting["method"]
    r = reference_r(method, setting["r"], setting["r_schedule"], len(blocks))
    opts: dict[str, Any] = (
        {"r": r} if isinstance(r, list) else dict(r=r, r_schedule=setting["r_schedule"])
    )
    if method == "atc":
        opts["linkage"] = setting["linkage"]
    atc_patch.apply_patch(model, method=method, prop_attn=kind != "mae", **opts)
    return run_model(model, blocks, head, x)


# The ATC repository's throughput benchmark (``ATC_Benchmark/models``): its ToMe DeiT, and the
# clustering step of its DPC-KNN (TCFormer's ``cluster_dpc_knn`` on hidden states).


def ours_benchmark_tome(
    setting: Mapping[str, Any], x: Tensor, seed: int, loc: tuple[int, ...]
) -> dict[str, Any]:
    """The benchmark's ToMe DeiT: ``keep_rate`` at ``loc`` with the reference's fixed
    per-location deltas (``keep_rate_mode="reference"``) and proportional attention."""
    model = deit(seed)
    atc_patch.apply_patch(
        model,
        method="tome",
        keep_rate=setting["keep_rate"],
        reduction_loc=loc,
        keep_rate_mode="reference",
        prop_attn=True,
    )
    return run_vit(model, x)


def dpcknn_points(seed: int, batch: int, num_tokens: int, dim: int) -> Tensor:
    """``(batch, num_tokens, dim)`` float64 points for the DPC-KNN clustering step."""
    rng = np.random.default_rng([seed, 11])
    return torch.from_numpy(rng.standard_normal((batch, num_tokens, dim)))


def ours_dpcknn(points: Tensor, num_clusters: int, k: int) -> np.ndarray:
    """Our DPC-KNN clustering on the benchmark's distance, ``cdist(x, x) / sqrt(C)``:
    canonical ``(B, N)`` labels."""
    from atc_patch.kernel.centers import dpcknn_labels

    dist = torch.cdist(points, points) / points.shape[-1] ** 0.5
    return canonical(dpcknn_labels(dist, num_clusters, k))


# The ATC paper's detection backbone (``MMDet_setup``): the ViT-Adapter of the
# ``tomeatc-adapter-{t,s}`` configs, at a width small enough for tests.
ADAPTER = dict(
    pretrain_size=224,
    embed_dim=48,
    depth=12,
    num_heads=3,
    conv_inplane=16,
    n_points=4,
    deform_num_heads=6,
    cffn_ratio=0.25,
    deform_ratio=1.0,
    interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
)
ADAPTER_IMAGE = 128  # an 8 x 8 grid of ViT tokens
ADAPTER_BATCH = 2


def adapter_reference_key(key: str) -> str:
    """Our ``ViTAdapter`` key -> the reference ``ToMeATCViTAdapter``'s (the inverse of
    :func:`atc_patch.mmdet.checkpoint.convert_backbone_key`)."""
    return re.sub(r"(\.ffn\.dwconv)\.(weight|bias)$", r"\1.dwconv.\2", key)


def project(maps: Tensor, seed: int, width: int = 8) -> Tensor:
    """``(B, ...)`` -> ``(B, width)``: a fixed random projection (seeded by the shape), so a
    golden file holds a few numbers per output map that move with every element of it."""
    flat = maps.reshape(maps.shape[0], -1)
    rng = np.random.default_rng([seed, flat.shape[1], width])
    p = torch.from_numpy(rng.standard_normal((flat.shape[1], width)) / np.sqrt(flat.shape[1]))
    return flat.to(torch.float64) @ p


def ours_adapter(setting: Mapping[str, Any], x: Tensor, seed: int) -> dict[str, Any]:
    """``atc_patch.mmdet.ViTAdapter`` with the reference configs' reduction (blocks 3, 6, 9;
    ``keep_rate_mode="reference"``, as the packaged ``tomeatc-adapter`` configs): tokens after
    each block, the partition of the grid after every merge, and the four output maps (each
    by :func:`project`, stacked)."""
    from atc_patch.mmdet import ViTAdapter

    model = ViTAdapter(
        **ADAPTER,
        method=setting["method"],
        linkage=setting.get("linkage"),
        reduction_loc=(3, 6, 9),
        reduction_ratio=setting["reduction_ratio"],
        proportional_attn=setting["proportional_attn"],
        keep_rate_mode="reference",
    )
    model = seeded(model, seed, rename=adapter_reference_key)
    counts: list[int] = []
    plans: list[np.ndarray] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        counts.append(int(out[0].shape[1]))
        if out[2] is not None:
            plans.append(out[2].labels.cpu().numpy())

    hooks = [b.register_forward_hook(hook) for b in model.blocks]
    try:
        with torch.no_grad():
            maps = model(x)
    finally:
        for h in hooks:
            h.remove()
    maps = torch.stack([project(m, seed) for m in maps])  # (4, B, 8)
    return {"counts": counts, "partitions": plans, "outputs": {"maps": maps}}


# The ATC repository's Stable Diffusion patch (``SD_setup/token_reduc_sd``, ToMe-SD's recipe with
# ATC as a second merge function) on the tiny SD 1.x-layout UNet of :mod:`atc_patch.testing`.
SD_BATCH = 2  # even: the reference draws random destinations only for even batches


def sd_unet(seed: int) -> nn.Module:
    """The ``"tiny-sd"`` ``UNet2DConditionModel`` (16 x 16 latents), float64, seeded weights."""
    from diffusers import UNet2DConditionModel

    from atc_patch.testing import unet_config

    return seeded(UNet2DConditionModel(**unet_config("tiny-sd")), seed)


def sd_inputs(unet: nn.Module, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(sample, timestep, encoder_hidden_states)`` float64, for a positional call."""
    cfg = unet.config
    rng = np.random.default_rng([seed, 13])
    size = (SD_BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    sample = torch.from_numpy(rng.standard_normal(size))
    context = torch.from_numpy(rng.standard_normal((SD_BATCH, 8, cfg.cross_attention_dim)))
    return sample, torch.tensor(500), context


def sd_options(setting: Mapping[str, Any]) -> dict[str, Any]:
    """``apply_patch`` options for a setting of the reference's ``apply_patch`` arguments
    (``merge_fn_str``: ``"tome"`` is ToMe-SD; ``use_rand`` draws from a generator seeded with
    ``setting["rand_seed"]``, the state the reference forks from the global one)."""
    opts: dict[str, Any] = dict(
        ratio=setting["ratio"],
        max_downsample=setting["max_downsample"],
        merge_attn=setting["merge_attn"],
        merge_crossattn=setting["merge_crossattn"],
        merge_mlp=setting["merge_mlp"],
    )
    if setting["merge_fn_str"] == "atc":
        return dict(opts, method="atc", linkage=setting["linkage"])
    opts.update(method="tome_sd", sx=setting["sx"], sy=setting["sy"], use_rand=setting["use_rand"])
    if setting["use_rand"]:
        opts["generator"] = torch.Generator().manual_seed(setting["rand_seed"])
    return opts


def ours_sd(setting: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The tiny UNet patched as the reference setting says: the partition of every merging
    block (each over its own full grid) and a :func:`project`-ion of the UNet's output."""
    unet = sd_unet(seed)
    args = sd_inputs(unet, seed)
    atc_patch.apply_patch(unet, **sd_options(setting))
    with torch.no_grad(), PlanRecorder() as rec:
        out = unet(*args).sample
    return {
        "counts": [p["num_out"] for p in rec.plans],
        "partitions": [p["labels"] for p in rec.plans],
        "independent": True,
        "outputs": {"sample": project(out, seed, width=16)},
    }
