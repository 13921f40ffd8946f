"""The model steps that ``gpu_model.py`` models and ``gpu_check.py`` measures: one table.

A *setup* is a model at one size (:data:`SETUPS`: SD-1.5 at 512² and 1024², SDXL at 1024²,
Flux at 1024² and 2048², batch 1 and 2; DeiT-S at 224², batch 256; :data:`CURRENT_SETUPS`:
issue 22's image transformers, QwenImage at 1328², Z-Image, FLUX.2, Chroma, CogView4, HiDream
and Sana at 1024², Sana at 4096²; :data:`VIDEO_SETUPS`: the video transformers, Wan 2.1 14B at
480x832 x 81 frames, CogVideoX-5b, LTX-Video, HunyuanVideo), built from its real configuration
with random weights (no download) on any device, meta included. A *row* is a
patch setting ``(label, method, options)`` (:data:`DIFFUSION_ROWS`, :data:`VIT_ROWS`): adding a
setting is one line. Both scripts write :data:`COLUMNS`, so their CSVs join on
``(model, resolution, batch, label)``.

    from _steps import SETUPS, rows_for, build, apply_row

    setup = SETUPS[0]
    model, inputs = build(setup, "meta", torch.bfloat16)
    for row in rows_for(setup):
        status, why = apply_row(model, row)  # "ok" or "n/a (option not available)", message
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from _rope_vits import ROPE_VITS, build_rope_vit, rope_vit_inputs

import atc_patch

# The CSV columns of gpu_model.py (modelled) and gpu_check.py's "steps" section (measured).
COLUMNS = (
    "source",  # "modelled (<hardware> constants)" or "measured (<GPU name>)"
    "model",  # sd15 | sdxl | flux | deit_s
    "resolution",  # image side in pixels
    "batch",
    "setup",  # e.g. "SD-1.5 512² B=2"
    "label",  # the row
    "method",
    "options",
    "status",  # ok | n/a (option not available | not for this model | rejected) | failed: ...
    # | skipped (time)
    "ms",  # per model call (modelled; measured: median)
    "ms_q25",  # measured only: spread of the repeats
    "ms_q75",
    "ratio",  # ms / unpatched ms of the same setup (measured: median of each round's ratio)
    "ratio_q25",
    "ratio_q75",
    "launches",  # kernel launches per call
    "syncs",  # host synchronisations per call
    "cluster_calls",  # cluster_tokens calls per model call
    "calls_per_resolution",  # of those, per token resolution clustered
    "cluster_launches",  # modelled only: the most launches of one clustering call
    "hbm_gb",  # modelled only: HBM bytes read + written per call
    "cluster_ms",  # modelled only: the clustering calls' share of ms
    "attention_ms",  # modelled only: flash attention's share of ms
    "note",
)

NAMES = {"sd15": "SD-1.5", "sdxl": "SDXL", "flux": "Flux", "deit_s": "DeiT-S"}
TINY_UNETS = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl"}  # atc_patch.testing kinds
FAMILIES = {"sd15": "unet", "sdxl": "unet", "flux": "flux", "deit_s": "vit"}


@dataclass(frozen=True)
class Setup:
    """One model at one size.

    Attributes:
        model: ``"sd15"``, ``"sdxl"``, ``"flux"`` (FLUX.1-dev) or ``"deit_s"``.
        resolution: image side in pixels (latents are 1/8 of it; Flux packs 2x2 latents).
        batch: batch size of one model call.
        tiny: the model's tiny stand-in (same block layout, a few channels; tests, smoke runs):
            ``tiny-sd`` / ``tiny-sdxl`` UNets, ``tiny-flux``, a 2-block ViT-Ti.
    """

    model: str
    resolution: int
    batch: int
    tiny: bool = False

    @property
    def family(self) -> str:
        return FAMILIES[self.model]

    @property
    def name(self) -> str:
        tiny = " (tiny)" if self.tiny else ""
        if self.model in VIDEO_DITS:
            return f"{NAMES[self.model]}{tiny} {VIDEO_DITS[self.model].size} B={self.batch}"
        return f"{NAMES[self.model]}{tiny} {self.resolution}² B={self.batch}"

    @property
    def tokens(self) -> int:
        """Image tokens of one sample where the patches cluster by default: SD-1.5's latent grid
        (1/8), SDXL's first attention level (1/16), Flux's packed latents (1/16), DeiT's
        16-pixel patches plus the class token (the RoPE / NaFlex ViTs: :data:`ROPE_VITS`; the
        current image DiTs: :data:`CURRENT_DITS`)."""
        if self.model in ROPE_VITS:
            return ROPE_VITS[self.model].tokens(self.resolution, self.tiny)
        if self.model in CURRENT_DITS:
            return CURRENT_DITS[self.model].tokens(self.resolution)
        if self.model in VIDEO_DITS:
            return VIDEO_DITS[self.model].tokens(self.tiny)
        side = self.resolution // (8 if self.model == "sd15" else 16)
        return side * side + (self.family == "vit")


SETUPS: tuple[Setup, ...] = tuple(
    Setup(m, res, b)
    for m, res in (("sd15", 512), ("sd15", 1024), ("sdxl", 1024), ("flux", 1024), ("flux", 2048))
    for b in (1, 2)
) + (Setup("deit_s", 224, 256),)
TINY_SETUPS: tuple[Setup, ...] = (
    Setup("sd15", 64, 2, tiny=True),
    Setup("sdxl", 64, 2, tiny=True),
    Setup("flux", 64, 1, tiny=True),
    Setup("deit_s", 64, 2, tiny=True),
)


@dataclass(frozen=True)
class Row:
    """A patch setting: ``atc_patch.apply_patch(model, method, **options)`` (``method=None``:
    the unpatched model). ``reuse_steps`` in ``options`` makes a step the mean of that many
    consecutive calls (the plans computed on the first are reused by the others)."""

    label: str
    method: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def calls(self) -> int:
        return int(self.options.get("reuse_steps", 1))

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


HALF = {"ratio": 0.5}
TILED = {**HALF, "backend": "triton", "tile": (32, 32)}
REUSE = {"plan_scope": "resolution", "reuse_steps": 4}
GPU = {**HALF, "tile": (16, 16), **REUSE}
SAME = {**HALF, "seed": 0, **REUSE}
MLP = {"merge_mlp": True}
DIFFUSION_ROWS: tuple[Row, ...] = (
    Row("unpatched"),
    Row("tome_sd", "tome_sd", {**HALF, "seed": 0}),
    Row("atc", "atc", HALF),  # the defaults (backend "auto")
    Row("atc torch", "atc", {**HALF, "backend": "torch"}),
    Row("atc triton", "atc", {**HALF, "backend": "triton"}),
    # Issue 21's settings for the diffusion core (n/a where the installed atc_patch lacks them).
    Row("atc tiled 32x32", "atc", TILED),
    Row("atc tiled, per resolution", "atc", {**TILED, "plan_scope": "resolution"}),
    Row(
        "atc tiled, per resolution, reuse 4",
        "atc",
        {**TILED, "plan_scope": "resolution", "reuse_steps": 4},
    ),
    Row(
        "atc tiled, per resolution, kv", "atc", {**TILED, "plan_scope": "resolution", "merge": "kv"}
    ),
    # The settings the docs recommend on a GPU: 16 x 16 tiles (256-token rows, the fused path
    # under backend="auto"), one plan per resolution kept for 4 calls; tome_sd alike, for the
    # same tokens removed. "mlp": the MLPs run on merged tokens too; max_downsample=4: UNets'
    # lower levels too (rejected on Flux).
    Row("tome_sd, per resolution, reuse 4", "tome_sd", SAME),
    Row("atc 16x16, per resolution, reuse 4", "atc", GPU),
    Row("atc 16x16, per resolution, reuse 4, kv", "atc", {**GPU, "merge": "kv"}),
    Row("tome_sd, per resolution, reuse 4, mlp", "tome_sd", {**SAME, **MLP}),
    Row("atc 16x16, per resolution, reuse 4, mlp", "atc", {**GPU, **MLP}),
    Row("atc 16x16, per resolution, reuse 4, mlp, kv", "atc", {**GPU, **MLP, "merge": "kv"}),
    Row(
        "atc 16x16, per resolution, reuse 4, mlp, max_downsample 4",
        "atc",
        {**GPU, **MLP, "max_downsample": 4},
    ),
)
# The recommended row per family (docs/diffusers.md, docs/dit.md) and tome_sd's with the same
# tokens removed: what gpu_model.py checks issue 21's goals on.
RECOMMENDED = {
    family: ("atc 16x16, per resolution, reuse 4", "tome_sd, per resolution, reuse 4")
    for family in ("unet", "flux")
}
VIT_ROWS: tuple[Row, ...] = (
    Row("unpatched"),
    Row("tome r=16", "tome", {"r": 16}),
    Row("atc r=16", "atc", {"r": 16}),  # backend "auto": the fused path on a GPU
    Row("atc r=16 torch", "atc", {"r": 16, "backend": "torch"}),
)


def rows_for(setup: Setup) -> tuple[Row, ...]:
    if setup.model in ROPE_VITS:
        return _rope_vit_rows(setup)
    if setup.model in CURRENT_DITS:
        return SANA_ROWS if setup.model == "sana" else CURRENT_ROWS
    if setup.model in VIDEO_DITS:
        return VIDEO_ROWS
    return VIT_ROWS if setup.family == "vit" else DIFFUSION_ROWS


def record(setup: Setup, row: Row, source: str) -> dict[str, Any]:
    """The identifying :data:`COLUMNS` of ``row`` on ``setup`` (the figures come after)."""
    return {
        "source": source,
        "model": setup.model,
        "resolution": setup.resolution,
        "batch": setup.batch,
        "setup": setup.name,
        "label": row.label,
        "method": row.method or "",
        "options": row.describe(),
    }


# --------------------------------------------------------------------------------------------
# Building a setup
# --------------------------------------------------------------------------------------------
@contextmanager
def _construction(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters made on ``device`` in ``dtype`` directly (no float32 copy of a 12B model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def flux_config() -> dict[str, Any]:
    """FLUX.1-dev's transformer configuration: 19 double- and 38 single-stream blocks."""
    from atc_patch.testing import transformer_config

    _, kw = transformer_config("flux-width")
    return dict(kw, num_layers=19, num_single_layers=38)


def build_model(setup: Setup, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The random-init model of ``setup`` on ``device`` (``"meta"``: shapes only), eval mode."""
    if setup.model in ROPE_VITS:
        with _construction(device, dtype):
            return build_rope_vit(setup.model, tiny=setup.tiny)
    if setup.model in CURRENT_DITS:
        return build_current(setup, device, dtype)
    if setup.model in VIDEO_DITS:
        return build_video(setup, device, dtype)
    with torch.random.fork_rng(devices=[]), _construction(device, dtype):
        torch.manual_seed(0)
        if setup.family == "unet":
            from diffusers import UNet2DConditionModel

            from atc_patch.testing import unet_config

            kind = TINY_UNETS[setup.model] if setup.tiny else setup.model
            model = UNet2DConditionModel(**unet_config(kind))
        elif setup.family == "flux":
            from diffusers import FluxTransformer2DModel

            from atc_patch.testing import transformer_config

            config = transformer_config("tiny-flux")[1] if setup.tiny else flux_config()
            model = FluxTransformer2DModel(**config)
        else:
            import timm

            name, kw = "deit_small_patch16_224", {}
            if setup.tiny:
                name, kw = "vit_tiny_patch16_224", {"depth": 2, "img_size": setup.resolution}
            model = timm.create_model(name, pretrained=False, **kw)
    return model.eval()


def model_inputs(model: torch.nn.Module, setup: Setup, device: str | torch.device) -> dict:
    """Keyword inputs of one call at ``setup``'s size: SD text 77 tokens, Flux-dev text 512
    tokens with guidance (8 for tiny models), DeiT images. Small tensors are made on the CPU
    (their values matter: timesteps, position ids; move them with :func:`move`), images on
    ``device`` directly."""
    if setup.model in ROPE_VITS:
        return rope_vit_inputs(setup.model, model, setup.batch, device, setup.tiny)
    if setup.model in CURRENT_DITS:
        return current_inputs(model, setup)
    if setup.model in VIDEO_DITS:
        return video_inputs(model, setup)
    if setup.family == "unet":
        from atc_patch.testing import unet_inputs

        side, text = setup.resolution // 8, 8 if setup.tiny else 77
        return unet_inputs(model, batch=setup.batch, height=side, width=side, seq_len=text)
    if setup.family == "flux":
        from atc_patch.testing import transformer_inputs

        side, text = setup.resolution // 16, 8 if setup.tiny else 512
        return transformer_inputs(model, batch=setup.batch, height=side, width=side, seq_len=text)
    dtype = next(model.parameters()).dtype
    shape = (setup.batch, 3, setup.resolution, setup.resolution)
    return {"x": torch.randn(shape, device=device, dtype=dtype)}


def build(setup: Setup, device: str | torch.device, dtype: torch.dtype) -> tuple[Any, dict]:
    """``(model, inputs)`` for ``setup`` on ``device``; the inputs still on the CPU are moved by
    :func:`move` (the cost model moves them with their values instead)."""
    model = build_model(setup, device, dtype)
    return model, model_inputs(model, setup, device)


def move(tree: Any, device: str | torch.device) -> Any:
    """Every tensor in ``tree`` (dicts, lists) on ``device``."""
    return torch.utils._pytree.tree_map(
        lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree
    )


def at_step(inputs: dict, step: int) -> dict:
    """The inputs of denoising call ``step`` (0 = as built): the timestep moves on as a sampler
    moves it, so a patch sees a new call. Run it outside the timed/modelled region."""
    if not step or "timestep" not in inputs:
        return inputs
    t = inputs["timestep"]
    return dict(inputs, timestep=t - step * (0.02 if t.is_floating_point() else 20))


def call(model: Any, inputs: dict) -> Any:
    """One model call."""
    if set(inputs) == {"x"}:  # a ViT's images (Z-Image's latents are "x" among others)
        return model(inputs["x"])
    return model(**inputs)


# --------------------------------------------------------------------------------------------
# Patching a row
# --------------------------------------------------------------------------------------------
def apply_row(model: Any, row: Row) -> tuple[str, str]:
    """Patch ``model`` as ``row`` says. Returns ``(status, note)``: ``("ok", "")``, or
    ``"n/a (not for this model)"`` (an option the model's family has no use for, e.g.
    ``max_downsample`` on Flux), ``"n/a (option not available)"`` / ``"n/a (rejected)"`` with
    atc_patch's message when the installed atc_patch declines the row (the model is then left
    unpatched)."""
    atc_patch.remove_patch(model)
    if row.method is None:
        return "ok", ""
    family, _ = atc_patch.patch.find_family(model)
    unused = sorted(set(getattr(family, "UNUSED", {})) & set(row.options))
    if unused:
        return "n/a (not for this model)", f"{unused} has no use for {family.WHAT}"
    try:
        atc_patch.apply_patch(model, method=row.method, **row.options)
    except (ValueError, TypeError) as err:
        atc_patch.remove_patch(model)
        unknown = "unknown option" in str(err)
        return f"n/a ({'option not available' if unknown else 'rejected'})", str(err)
    return "ok", ""


@contextmanager
def wrapped_cluster_tokens(wrapper: Callable[..., Any]) -> Iterator[None]:
    """Route every loaded atc_patch module's ``cluster_tokens`` through
    ``wrapper(original, *args, **kwargs)`` (the family patches bind it at import)."""
    from atc_patch import kernel

    original = kernel.cluster_tokens

    def routed(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    swapped = [
        mod
        for name, mod in list(sys.modules.items())
        if name.split(".")[0] == "atc_patch" and getattr(mod, "cluster_tokens", None) is original
    ]
    for mod in swapped:
        mod.cluster_tokens = routed
    try:
        yield
    finally:
        for mod in swapped:
            mod.cluster_tokens = original


@contextmanager
def counted_cluster_calls() -> Iterator[list[int]]:
    """``with counted_cluster_calls() as n:`` ... ``n[0]`` is the number of clustering calls."""
    n = [0]

    def count(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        n[0] += 1
        return original(*args, **kwargs)

    with wrapped_cluster_tokens(count):
        yield n


# --------------------------------------------------------------------------------------------
# RoPE and NaFlex ViTs (issue 22): the classes it added, at real size (_rope_vits.py)
# --------------------------------------------------------------------------------------------
NAMES.update({k: v.title for k, v in ROPE_VITS.items()})
FAMILIES.update(dict.fromkeys(ROPE_VITS, "vit"))
SETUPS = SETUPS + tuple(Setup(m, v.resolution, 32) for m, v in ROPE_VITS.items())
TINY_SETUPS = TINY_SETUPS + tuple(Setup(m, 64, 2, tiny=True) for m in ROPE_VITS)


def _rope_vit_rows(setup: Setup) -> tuple[Row, ...]:
    spec = ROPE_VITS[setup.model]
    return tuple(Row(*row) for row in spec.rows(*((2, 16) if setup.tiny else ())))


# --------------------------------------------------------------------------------------------
# Issue 22: the current image transformers. Not in SETUPS (gpu_check.py's measured run stays
# as it is); gpu_model.py models them when --models names them.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageDiT:
    """A current image transformer: its ``atc_patch.testing`` configuration (``"<kind>-width"``
    with ``depth``, the published block counts; ``"tiny-<kind>"`` for tiny setups), the image
    pixels per token side (VAE stride x patch size) and its text tokens."""

    kind: str
    depth: Mapping[str, Any]
    pixels: int
    text: int
    name: str

    def tokens(self, resolution: int) -> int:
        return (resolution // self.pixels) ** 2


CURRENT_DITS = {
    d.kind: d
    for d in (
        ImageDiT("qwenimage", {"num_layers": 60}, 16, 256, "QwenImage"),
        ImageDiT("zimage", {"n_layers": 30, "n_refiner_layers": 2}, 16, 512, "Z-Image"),
        ImageDiT("flux2", {"num_layers": 8, "num_single_layers": 48}, 16, 512, "FLUX.2"),
        ImageDiT("chroma", {"num_layers": 19, "num_single_layers": 38}, 16, 512, "Chroma"),
        ImageDiT("cogview4", {"num_layers": 28}, 16, 128, "CogView4"),
        ImageDiT(
            "hidream",
            {"num_layers": 16, "num_single_layers": 32, "llama_layers": list(range(48))},
            16,
            128,
            "HiDream",
        ),
        ImageDiT("sana", {"num_layers": 20}, 32, 300, "Sana"),
    )
}
NAMES.update({k: d.name for k, d in CURRENT_DITS.items()})
FAMILIES.update({k: "dit" for k in CURRENT_DITS})
CURRENT_SETUPS: tuple[Setup, ...] = (
    Setup("qwenimage", 1328, 1),  # Qwen-Image's default size: 6889 tokens
    Setup("zimage", 1024, 1),
    Setup("flux2", 1024, 1),
    Setup("chroma", 1024, 1),
    Setup("cogview4", 1024, 1),
    Setup("hidream", 1024, 1),
    Setup("sana", 1024, 1),  # 1024 tokens through the /32 DC-AE
    Setup("sana", 4096, 1),  # Sana 4K: 16384 tokens
)
CURRENT_TINY_SETUPS: tuple[Setup, ...] = tuple(
    Setup(k, 8 * d.pixels, 1, tiny=True) for k, d in CURRENT_DITS.items()
)
_MLP = {"merge_mlp": True}
CURRENT_ROWS: tuple[Row, ...] = (
    Row("unpatched"),
    Row("tome_sd", "tome_sd", {**HALF, "seed": 0}),
    Row("atc", "atc", HALF),
    Row("tome_sd +mlp", "tome_sd", {**HALF, "seed": 0, **_MLP}),
    Row("atc +mlp", "atc", {**HALF, **_MLP}),
    Row("tome_sd, per resolution, reuse 4", "tome_sd", SAME),  # issue 21's recommended setting
    Row("atc 16x16, per resolution, reuse 4", "atc", GPU),
    Row("tome_sd, per resolution, reuse 4, mlp", "tome_sd", {**SAME, **_MLP}),
    Row("atc 16x16, per resolution, reuse 4, mlp", "atc", {**GPU, **_MLP}),
)
RECOMMENDED["dit"] = RECOMMENDED["flux"]
SANA_ROWS: tuple[Row, ...] = (
    CURRENT_ROWS[:3]
    + (  # a conv MLP: its cross-attention instead
        Row("tome_sd +cross", "tome_sd", {**HALF, "seed": 0, "merge_crossattn": True}),
        Row("atc +cross", "atc", {**HALF, "merge_crossattn": True}),
        *CURRENT_ROWS[5:7],
    )
)


def build_current(setup: Setup, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A current image transformer at its published size (tiny: a few channels), eval mode.
    HiDream's MoE feed-forwards route tokens on the host (no meta kernel for their
    ``bincount``): they run as a stand-in of the same work, their top-k experts densely on
    every token (:func:`_dense_moe`)."""
    import diffusers

    from atc_patch.testing import transformer_config

    dit = CURRENT_DITS[setup.model]
    name, kw = transformer_config(f"tiny-{dit.kind}" if setup.tiny else f"{dit.kind}-width")
    with torch.random.fork_rng(devices=[]), _construction(device, dtype):
        torch.manual_seed(0)
        model = getattr(diffusers, name)(**(kw if setup.tiny else {**kw, **dit.depth}))
    if setup.model == "hidream":
        for m in model.modules():
            if type(m).__name__ == "MOEFeedForwardSwiGLU":
                m.forward = _dense_moe.__get__(m)
    return model.eval()


def _dense_moe(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HiDream's MoE feed-forward with the work of its routing: the first ``top_k`` experts on
    every token plus the shared expert (each token runs ``top_k`` routed experts)."""
    y = self.shared_experts(x)
    for expert in self.experts[: self.num_activated_experts]:
        y = y + expert(x)
    return y


def current_inputs(model: torch.nn.Module, setup: Setup) -> dict:
    """A current image transformer's inputs at ``setup``'s size (text: 8 tokens when tiny).
    HiDream's are patchified, with the grid as numbers (``img_sizes``): from latents it makes
    that grid on the device and reads it back in its ``unpatchify``, which meta cannot."""
    from atc_patch.testing import transformer_inputs

    dit = CURRENT_DITS[setup.model]
    side = setup.resolution // dit.pixels
    text = 8 if setup.tiny else dit.text
    inputs = transformer_inputs(model, batch=setup.batch, height=side, width=side, seq_len=text)
    if setup.model == "hidream":
        x, p = inputs["hidden_states"], model.config.patch_size
        b, c = x.shape[:2]
        tokens = (
            x.reshape(b, c, side, p, side, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        )
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        inputs.update(
            hidden_states=tokens,
            img_ids=ids.reshape(1, -1, 3).expand(b, -1, -1),
            img_sizes=[(side, side)] * b,
            hidden_states_masks=torch.ones(b, side * side, dtype=x.dtype),
        )
    return inputs


# --------------------------------------------------------------------------------------------
# Issue 22: the video transformers, likewise (gpu_model.py --models wan ...).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoDiT:
    """A video transformer: its ``atc_patch.testing`` configuration (``"<kind>-width"`` with
    ``depth``, the published block counts), its token grid ``(frames, height, width)`` at
    ``size`` (latent frames and packed patches) and its text tokens."""

    kind: str
    depth: Mapping[str, Any]
    grid: tuple[int, int, int]
    text: int
    name: str
    size: str

    def tokens(self, tiny: bool = False) -> int:
        f, h, w = TINY_VIDEO_GRID if tiny else self.grid
        return f * h * w


TINY_VIDEO_GRID = (2, 4, 4)
VIDEO_DITS = {
    d.kind: d
    for d in (
        # 81 frames / 4 + 1 = 21 latent frames; 480x832 / 8 / 2 = 30 x 52
        VideoDiT("wan", {"num_layers": 40}, (21, 30, 52), 512, "Wan 2.1 14B", "480x832x81"),
        VideoDiT("cogvideox", {"num_layers": 42}, (13, 30, 45), 226, "CogVideoX-5b", "480x720x49"),
        # /32 spatial, /8 temporal, patch 1: 21 x 15 x 22
        VideoDiT("ltx", {"num_layers": 28}, (21, 15, 22), 128, "LTX-Video 2B", "704x480x161"),
        # 61 frames (16 latent ones) at 544x960: 16 x 34 x 60
        VideoDiT(
            "hunyuanvideo",
            {"num_layers": 20, "num_single_layers": 40},
            (16, 34, 60),
            256,
            "HunyuanVideo",
            "544x960x61",
        ),
    )
}
NAMES.update({k: d.name for k, d in VIDEO_DITS.items()})
FAMILIES.update({k: "video" for k in VIDEO_DITS})
VIDEO_SETUPS: tuple[Setup, ...] = tuple(
    Setup(k, int(d.size.split("x")[0]), 1) for k, d in VIDEO_DITS.items()
)
VIDEO_TINY_SETUPS: tuple[Setup, ...] = tuple(Setup(k, 64, 1, tiny=True) for k in VIDEO_DITS)
# The GPU settings (docs/dit.md): 2 x 8 x 8 space-time tiles (128-token rows: the fused path
# under backend="auto"), one plan per resolution kept for 4 calls; tome_sd alike.
VIDEO_GPU = {**HALF, "tile": (2, 8, 8), **REUSE}
RECOMMENDED["video"] = ("atc 2x8x8, per resolution, reuse 4", "tome_sd, per resolution, reuse 4")
VIDEO_ROWS: tuple[Row, ...] = (
    Row("unpatched"),
    Row("tome_sd", "tome_sd", {**HALF, "seed": 0}),
    Row("tome_sd, per resolution, reuse 4", "tome_sd", SAME),
    Row("atc 2x8x8, per resolution, reuse 4", "atc", VIDEO_GPU),
    Row("tome_sd, per resolution, reuse 4, mlp", "tome_sd", {**SAME, **_MLP}),
    Row("atc 2x8x8, per resolution, reuse 4, mlp", "atc", {**VIDEO_GPU, **_MLP}),
)


def build_video(setup: Setup, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A video transformer at its published size (tiny: a few channels), eval mode."""
    import diffusers

    from atc_patch.testing import transformer_config

    dit = VIDEO_DITS[setup.model]
    name, kw = transformer_config(f"tiny-{dit.kind}" if setup.tiny else f"{dit.kind}-width")
    with torch.random.fork_rng(devices=[]), _construction(device, dtype):
        torch.manual_seed(0)
        model = getattr(diffusers, name)(**(kw if setup.tiny else {**kw, **dit.depth}))
    return model.eval()


def video_inputs(model: torch.nn.Module, setup: Setup) -> dict:
    """A video transformer's inputs on its grid (text: 8 tokens when tiny)."""
    from atc_patch.testing import transformer_inputs

    dit = VIDEO_DITS[setup.model]
    f, h, w = TINY_VIDEO_GRID if setup.tiny else dit.grid
    text = 8 if setup.tiny else dit.text
    return transformer_inputs(model, batch=setup.batch, frames=f, height=h, width=w, seq_len=text)
