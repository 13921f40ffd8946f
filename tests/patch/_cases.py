"""The table of the family contract test: one tiny model per supported root class.

A :class:`Case` builds the model a user would patch (``build``), optionally what holds it
(``holder``: a pipeline, task model, feature wrapper or detector), runs it (``run``: a tensor
output, deterministic for a fixed model and inputs) and says which options reduce tokens and
which reduce none, per method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    build: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module, str], torch.Tensor]  # (model, device) -> output
    methods: tuple[str, ...]
    reduce: dict[str, Any]  # options that reduce tokens (every method)
    zero: dict[str, Any]  # options that reduce nothing
    other: dict[str, Any]  # a second reducing setting (re-apply replaces the first)
    bad_at_apply: dict[str, Any]  # valid options that the model itself rejects at apply time
    holder: Callable[[torch.nn.Module], Any] | None = None  # what holds the root, built on it
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method extra options
    # {"compile" | "meta": why}: what the unpatched model itself cannot do (rows skipped)
    model_cannot: dict[str, str] = field(default_factory=dict)

    def options(self, method: str, base: dict[str, Any]) -> dict[str, Any]:
        return {**base, **self.extra.get(method, {})}


def _counts_from_r(n: int, rs: list[int]) -> list[int]:
    """Token counts after each block when block ``i`` removes ``rs[i]`` of ``n`` tokens."""
    out = []
    for r in rs:
        n -= r
        out.append(n)
    return out


# Token counts per block of a ViT with 64 patches + 1 class token and 4 blocks, per schedule
# (every ViT family must give the same): (options, counts), ids in SCHEDULE_IDS.
SCHEDULES = [
    ({"method": "atc", "r": 5}, _counts_from_r(65, [5, 5, 5, 5])),
    ({"method": "atc", "linkage": "single", "r": [0, 10, 0, 20]}, [65, 55, 55, 35]),
    (  # ToMe's decreasing schedule: linear from 2r to 0
        {"method": "kmedoids", "r": 4, "r_schedule": "decrease"},
        _counts_from_r(65, [int(8 - i * 8 / 3) for i in range(4)]),
    ),
    (
        {"method": "dpcknn", "keep_rate": 0.7, "reduction_loc": (1, 3)},
        [65, 1 + int(64 * 0.7), 1 + int(64 * 0.7), 1 + int(64 * 0.7**2)],
    ),
    ({"method": "tome", "r": 12}, [53, 41, 29, 17]),  # at most (N - 1) // 2 per block
]
SCHEDULE_IDS = ["atc-constant", "atc-list", "kmedoids-decrease", "dpcknn-keep_rate", "tome"]


def _images(size: int = 32, batch: int = 2, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)


def to_device(obj: Any, device: str) -> Any:
    """Tensors in ``obj`` (nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _timm() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)  # every build the same model (the table compares builds)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
        embed_dim=32, num_heads=2, num_classes=10,
    ).eval()  # fmt: skip


def _timm_features(vit: torch.nn.Module) -> Any:
    from timm.models._features import FeatureGetterNet

    return FeatureGetterNet(vit, out_indices=(1, 2), output_fmt="NLC", prune=False)  # vit unchanged


def _torchvision() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    ).eval()  # fmt: skip
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the classifier
    return model


def _hf_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def _hf_task(vit: torch.nn.Module) -> Any:
    from transformers import ViTForImageClassification

    task = ViTForImageClassification(vit.config).eval()
    task.vit = vit
    return task


# --- RoPE and NaFlex ViTs -------------------------------------------------------------------------


def _timm_tiny(name: str, **kw: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(
            name, pretrained=False, depth=3, embed_dim=32, num_heads=2, num_classes=10, **kw
        ).eval()

    return build


def naflex_batch(
    sizes: tuple[tuple[int, int], ...] = ((32, 24), (16, 32)),
    patch: int = 8,
    length: int = 16,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """A NaFlex batch as timm's loader makes it (``Patchify`` + ``NaFlexCollator``): one random
    image per ``(height, width)``, padded to ``length`` patches."""
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import Patchify

    gen = torch.Generator().manual_seed(1)
    patchify = Patchify(patch)
    samples = [(patchify(torch.randn(3, h, w, generator=gen)), 0) for h, w in sizes]
    batch, _ = NaFlexCollator(max_seq_len=length)(samples)
    keys = ("patches", "patch_coord", "patch_valid")
    return {k: batch[k].to(device) for k in keys}


def siglip2_batch(
    sizes: tuple[tuple[int, int], ...] = ((4, 3), (2, 4)),
    patch: int = 8,
    length: int = 16,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """What ``Siglip2ImageProcessor`` gives: ``pixel_values (B, L, P*P*3)`` patches then zero
    padding, ``pixel_attention_mask (B, L)``, ``spatial_shapes (B, 2)`` (patch grid per image)."""
    gen = torch.Generator().manual_seed(1)
    values = torch.zeros(len(sizes), length, patch * patch * 3)
    mask = torch.zeros(len(sizes), length, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        values[i, : h * w] = torch.randn(h * w, patch * patch * 3, generator=gen)
        mask[i, : h * w] = 1
    inputs = {"pixel_values": values, "pixel_attention_mask": mask}
    return to_device({**inputs, "spatial_shapes": torch.tensor(sizes)}, device)


_HF_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)


def _hf_dinov3() -> torch.nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(**_HF_TINY, image_size=32, patch_size=8, num_register_tokens=4)
    torch.manual_seed(0)
    return DINOv3ViTModel._from_config(cfg, attn_implementation="sdpa").eval()


def _hf_siglip2() -> torch.nn.Module:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    cfg = Siglip2VisionConfig(**_HF_TINY, num_patches=16, patch_size=8)
    torch.manual_seed(0)
    return Siglip2VisionModel._from_config(cfg, attn_implementation="sdpa").eval()


def _hf_aimv2() -> torch.nn.Module:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    cfg = Aimv2VisionConfig(**_HF_TINY, image_size=32, patch_size=8)
    torch.manual_seed(0)
    return Aimv2VisionModel._from_config(cfg, attn_implementation="sdpa").eval()


def _hf_pair(kind: str) -> Callable[[torch.nn.Module], Any]:
    """The two-tower model (``Siglip2Model``, ``Aimv2Model``) holding a vision model."""

    def holder(vision: torch.nn.Module) -> Any:
        import transformers

        text = dict(_HF_TINY, num_hidden_layers=1)
        config = getattr(transformers, f"{kind}Config")(
            text_config=text, vision_config=vision.config.to_dict()
        )
        pair = getattr(transformers, f"{kind}Model")(config).eval()
        pair.vision_model = vision
        return pair

    return holder


def _run_hf(model: torch.nn.Module, device: str = "cpu", **inputs: Any) -> torch.Tensor:
    """The tokens and the pooled output, side by side."""
    out = model(**to_device(inputs, device))
    pooled = [] if out.pooler_output is None else [out.pooler_output]
    return torch.cat([out.last_hidden_state.flatten(1), *pooled], dim=1)


def _unet() -> torch.nn.Module:
    from atc_patch.testing import build_unet

    return build_unet("tiny-sdxl")  # no attention at stride 1: max_downsample=1 is refused


def _run_unet(unet: torch.nn.Module, device: str = "cpu") -> torch.Tensor:
    from atc_patch.testing import unet_inputs

    return unet(**to_device(unet_inputs(unet, batch=2, height=16, width=16), device)).sample


def _pipe_with(root: torch.nn.Module, kind: str) -> Any:
    from atc_patch.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(kind)
    if kind == "tiny-sdxl":
        pipe.unet = root
    else:
        pipe.transformer = root
    return pipe


def _dit(kind: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from atc_patch.testing import build_transformer

        return build_transformer(kind)

    return build


def _run_dit(model: torch.nn.Module, device: str = "cpu") -> torch.Tensor:
    from atc_patch.testing import transformer_inputs

    plain = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its model's inputs
    out = model(**to_device(transformer_inputs(plain, batch=2, height=8, width=8), device)).sample
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image: a list per image


# The pipelines of the current image transformers, holding only the transformer (their text
# encoders are multi-billion-parameter models; the record only needs the holder).
PIPELINES = {
    "tiny-qwenimage": "QwenImagePipeline",
    "tiny-zimage": "ZImagePipeline",
    "tiny-flux2": "Flux2Pipeline",
    "tiny-chroma": "ChromaPipeline",
    "tiny-cogview4": "CogView4Pipeline",
    "tiny-hidream": "HiDreamImagePipeline",
    "tiny-sana": "SanaPipeline",
    "tiny-wan": "WanPipeline",
    "tiny-cogvideox": "CogVideoXPipeline",
    "tiny-ltx": "LTXPipeline",
    "tiny-hunyuanvideo": "HunyuanVideoPipeline",
    "tiny-hunyuanvideo-i2v": "HunyuanVideoImageToVideoPipeline",
}


def _pipeline_holding(root: torch.nn.Module, kind: str) -> Any:
    import inspect

    import diffusers

    cls = getattr(diffusers, PIPELINES[kind])
    params = inspect.signature(cls.__init__).parameters
    return cls(**{n: None for n in list(params)[1:] if n != "transformer"}, transformer=root)


def _adapter() -> torch.nn.Module:
    import mmcv.ops  # noqa: F401

    from atc_patch.mmdet import ViTAdapter

    torch.manual_seed(0)
    return ViTAdapter(
        embed_dim=64, depth=4, num_heads=2, deform_num_heads=2, conv_inplane=16, init_values=0.5,
        interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
    ).eval()  # fmt: skip


def _run_adapter(model: torch.nn.Module, device: str = "cpu") -> torch.Tensor:
    return torch.cat([f.flatten(1) for f in model(_images(64, 1, device))], dim=1)


VIT_METHODS = ("atc", "tome", "kmedoids", "dpcknn")
DIFFUSION_METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")
_VIT = dict(
    methods=VIT_METHODS,
    reduce={"r": 4},
    zero={"r": 0},
    other={"keep_rate": 0.5, "reduction_loc": (1,)},
    bad_at_apply={"keep_rate": 0.5, "reduction_loc": (7,)},  # past the last block
)
_DIFFUSION = dict(
    methods=DIFFUSION_METHODS,
    reduce={"ratio": 0.5},
    zero={"ratio": 0.0},
    other={"ratio": 0.25, "merge_mlp": True},
)

# Models with cross-attention to text (Wan, LTX-Video): its queries merge in the "other" row.
_CROSS = {**_DIFFUSION, "other": {**_DIFFUSION["other"], "merge_crossattn": True}}

# Issue 21's options on top (tiles where the method takes them): the same contract holds.
_GPU = {"plan_scope": "resolution", "reuse_steps": 2, "merge": "kv"}
_DIFFUSION_GPU = dict(
    methods=DIFFUSION_METHODS,
    reduce={"ratio": 0.5, **_GPU},
    zero={"ratio": 0.0, **_GPU},
    other={"ratio": 0.25, "merge_mlp": True, "plan_scope": "resolution"},
    extra={m: {"tile": (4, 4)} for m in DIFFUSION_METHODS if m != "tome_sd"},
)


def _run_video_i2v(model: torch.nn.Module, device: str = "cpu") -> torch.Tensor:
    """A video transformer on 3 frames of 4 x 4 tokens, the first an image-to-video
    conditioning frame (a per-token timestep, 0 on it)."""
    from atc_patch.testing import transformer_inputs

    plain = getattr(model, "_orig_mod", model)
    inputs = transformer_inputs(plain, batch=2, height=4, width=4, frames=3, i2v=True)
    return model(**to_device(inputs, device)).sample


# Video transformers: 3-D windows for tome_sd, (tt, th, tw) tiles for the others.
_VIDEO_GPU = dict(
    _DIFFUSION_GPU,
    extra={m: {"tile": (2, 4, 4)} if m != "tome_sd" else {"st": 2} for m in DIFFUSION_METHODS},
)


def _video(
    name: str, options: dict[str, Any], kind: str | None = None, run: Callable[..., Any] = _run_dit
) -> Case:
    """A video transformer's row: the tiny model ``kind`` (default ``name``), held by its
    pipeline when ``name`` is a pipeline kind (an image-to-video run has its own row)."""
    holder = None
    if name in PIPELINES:
        holder = functools.partial(_pipeline_holding, kind=name)
    return Case(
        name, "dit", _dit(kind or name), run, holder=holder, bad_at_apply={"blocks": (0, 99)},
        **options,
    )  # fmt: skip


CASES = [
    Case(
        "timm",
        "timm",
        _timm,
        lambda m, d="cpu": m(_images(device=d)),
        holder=_timm_features,
        **_VIT,
    ),
    Case(
        "torchvision", "torchvision", _torchvision, lambda m, d="cpu": m(_images(device=d)), **_VIT
    ),
    Case(
        "transformers-vit",
        "transformers",
        _hf_vit,
        lambda m, d="cpu": m(pixel_values=_images(device=d)).last_hidden_state,
        holder=_hf_task,
        **_VIT,
    ),  # fmt: skip
    Case(
        "timm-eva-dinov3",
        "timm",
        _timm_tiny("vit_base_patch16_dinov3", img_size=32, patch_size=8),
        lambda m, d="cpu": m(_images(device=d)),
        holder=_timm_features,
        **_VIT,
    ),
    Case(
        "timm-naflex",
        "timm",
        _timm_tiny("naflexvit_base_patch16_siglip", patch_size=8),
        lambda m, d="cpu": m(naflex_batch(device=d)),
        holder=_timm_features,
        model_cannot={
            "compile": "timm's NaFlex embedding and rotary tables are torch.compiler.disable()d",
            "meta": "timm's NaFlex grid sizes are read on the host (.item())",
        },
        **_VIT,
    ),
    Case(
        "transformers-dinov3",
        "transformers",
        _hf_dinov3,
        lambda m, d="cpu": _run_hf(m, d, pixel_values=_images()),
        **_VIT,
    ),
    Case(
        "transformers-siglip2",
        "transformers",
        _hf_siglip2,
        lambda m, d="cpu": _run_hf(m, d, **siglip2_batch()),
        holder=_hf_pair("Siglip2"),
        model_cannot={"meta": "Siglip2's position resizing checks its sizes on the host"},
        **_VIT,
    ),
    Case(
        "transformers-aimv2",
        "transformers",
        _hf_aimv2,
        lambda m, d="cpu": _run_hf(m, d, pixel_values=_images()),
        holder=_hf_pair("Aimv2"),
        **_VIT,
    ),
    Case(
        "unet",
        "unet",
        _unet,
        _run_unet,
        holder=lambda u: _pipe_with(u, "tiny-sdxl"),
        bad_at_apply={"max_downsample": 1},
        **_DIFFUSION,
    ),  # fmt: skip
    *(
        Case(
            kind,
            "dit",
            _dit(kind),
            _run_dit,
            holder=lambda t, k=kind: _pipe_with(t, k),
            bad_at_apply={"blocks": (0, 99)},
            **_DIFFUSION,
        )  # fmt: skip
        for kind in ("tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit")
    ),
    *(
        Case(
            kind,
            "dit",
            _dit(kind),
            _run_dit,
            holder=lambda t, k=kind: _pipeline_holding(t, k),
            bad_at_apply={"blocks": (0, 99)},
            **_DIFFUSION,
        )  # fmt: skip
        for kind in ("tiny-qwenimage", "tiny-zimage", "tiny-flux2", "tiny-chroma", "tiny-cogview4")
    ),
    Case(
        "tiny-hidream",
        "dit",
        _dit("tiny-hidream"),
        _run_dit,
        holder=lambda t: _pipeline_holding(t, "tiny-hidream"),
        bad_at_apply={"blocks": (0, 99)},
        model_cannot={
            w: "its MoE feed-forward counts tokens per expert on the host (bincount().cpu())"
            for w in ("compile", "meta")
        },
        **_DIFFUSION,
    ),  # fmt: skip
    Case(
        "tiny-sana",
        "dit",
        _dit("tiny-sana"),
        _run_dit,
        holder=lambda t: _pipeline_holding(t, "tiny-sana"),
        bad_at_apply={"merge_mlp": True},  # a conv MLP: merged tokens have no grid
        methods=DIFFUSION_METHODS,
        reduce={"ratio": 0.5},
        zero={"ratio": 0.0},
        other={"ratio": 0.25, "merge_crossattn": True},
    ),  # fmt: skip
    Case(
        "unet-gpu-options",
        "unet",
        _unet,
        _run_unet,
        bad_at_apply={"max_downsample": 1},
        **_DIFFUSION_GPU,
    ),  # fmt: skip
    Case(
        "tiny-flux-gpu-options",
        "dit",
        _dit("tiny-flux"),
        _run_dit,
        bad_at_apply={"blocks": (0, 99)},
        **_DIFFUSION_GPU,
    ),  # fmt: skip
    _video("tiny-wan", _CROSS),
    _video("tiny-cogvideox", _DIFFUSION),
    _video("tiny-ltx", _CROSS),
    _video("tiny-ltx-i2v", _DIFFUSION, "tiny-ltx", _run_video_i2v),
    _video("tiny-hunyuanvideo", _DIFFUSION),
    _video("tiny-hunyuanvideo-i2v", _DIFFUSION),
    _video("tiny-wan-ti2v", _DIFFUSION, "tiny-wan", _run_video_i2v),
    _video("tiny-wan-gpu-options", _VIDEO_GPU, "tiny-wan"),
    Case(
        "vit-adapter",
        "vit_adapter",
        _adapter,
        _run_adapter,
        methods=("atc", "tome"),
        reduce={"reduction_ratio": 0.5, "reduction_loc": (1, 3)},  # 4 blocks: not (3, 6, 9)
        zero={"reduction_ratio": 1.0, "reduction_loc": (1, 3)},
        other={"reduction_ratio": 0.7, "reduction_loc": (1, 2)},
        bad_at_apply={"reduction_ratio": 0.5, "reduction_loc": (9,)},
        model_cannot={
            w: "mmcv's multi_scale_deformable_attn_pytorch splits its values by the sizes in a "
            "tensor (.item())"
            for w in ("compile", "meta")
        },
    ),  # fmt: skip
]

# One (case, method) per row of the contract table.
TABLE = [(case, method) for case in CASES for method in case.methods]


def table_id(row: tuple[Case, str]) -> str:
    return f"{row[0].name}-{row[1]}"
