"""Random-init diffusion transformers: ``FluxTransformer2DModel``, ``SD3Transformer2DModel``,
``PixArtTransformer2DModel`` or ``DiTTransformer2DModel`` with a tiny configuration
(``"tiny-flux"``, ``"tiny-sd3"``, ``"tiny-pixart"``, ``"tiny-dit"``: the real block types, a few
channels) or the real width at reduced depth (``"flux-width"``, ``"sd3-width"``); the current
image transformers likewise (:mod:`.image_dits`: ``"tiny-qwenimage"``, ``"qwenimage-width"``,
..., Z-Image, FLUX.2, Chroma, CogView4, HiDream, Sana) and the video transformers
(:mod:`.video_dits`: ``"tiny-wan"``, ``"wan-width"``, ...); and keyword inputs for one call::

    model = build_transformer("tiny-flux")
    out = model(**transformer_inputs(model, batch=2, height=8, width=8)).sample  # (2, 64, 16)
"""

from __future__ import annotations

from typing import Any

import torch

from . import image_dits, video_dits

TRANSFORMER_KINDS = (
    "tiny-flux",
    "tiny-sd3",
    "tiny-pixart",
    "tiny-dit",
    "flux-width",  # FLUX.1's 3072 channels, 2 double + 4 single blocks
    "sd3-width",  # SD3-medium's 1536 channels, 4 joint blocks
    *image_dits.KINDS,
    *video_dits.KINDS,
)


def transformer_config(kind: str) -> tuple[str, dict[str, Any]]:
    """``(class name, keyword arguments)`` of the transformer of one of
    :data:`TRANSFORMER_KINDS`."""
    found = image_dits.config(kind) or video_dits.config(kind)
    if found is not None:
        return found
    if kind == "tiny-flux":
        return "FluxTransformer2DModel", dict(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6),
        )
    if kind == "flux-width":  # black-forest-labs/FLUX.1-dev transformer/config.json, 2+4 blocks
        return "FluxTransformer2DModel", dict(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    if kind == "tiny-sd3":
        return "SD3Transformer2DModel", dict(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),  # SD3.5's extra image-only attention in block 0
            qk_norm="rms_norm",
        )
    if kind == "sd3-width":  # stabilityai/stable-diffusion-3-medium transformer config, 4 blocks
        return "SD3Transformer2DModel", dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
    if kind == "tiny-pixart":
        return "PixArtTransformer2DModel", dict(
            sample_size=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=16,
            caption_channels=32,
            patch_size=2,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
    if kind == "tiny-dit":
        return "DiTTransformer2DModel", dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=16,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
    raise ValueError(f"kind must be one of {TRANSFORMER_KINDS}, got {kind!r}")


def build_transformer(kind: str = "tiny-flux", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init transformer (eval mode) for ``kind``; same seed, same weights."""
    import diffusers

    name, kwargs = transformer_config(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, name)(**kwargs)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def transformer_inputs(
    model: Any,
    batch: int = 2,
    height: int = 8,
    width: int = 8,
    seq_len: int = 6,
    seed: int = 0,
    refs: int = 0,
    frames: int = 3,
    i2v: bool = False,
) -> dict[str, Any]:
    """Keyword inputs for ``model(**inputs)`` on an ``height x width`` grid of image tokens.

    Flux: packed latents ``(B, height * width, in_channels)`` with raster ``img_ids`` (each
    token a 2x2 latent patch, as ``FluxPipeline`` packs them). SD3 / PixArt / DiT: latents
    ``(B, C, height * p, width * p)`` with ``p`` the patch size. Text: ``seq_len`` tokens. The
    current image transformers: as their pipelines call them (:func:`.image_dits.inputs`;
    ``refs`` reference images of the target's size for QwenImage-Edit and FLUX.2). The video
    transformers: ``frames`` latent frames of ``height x width`` tokens (``i2v``: the first
    one an image-to-video conditioning frame; :func:`.video_dits.inputs`).
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = model.dtype
    name = type(model).__name__

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    current = image_dits.inputs(model, randn, batch, height, width, seq_len, refs)
    if current is not None:
        return current
    video = video_dits.inputs(model, randn, batch, frames, height, width, seq_len, i2v)
    if video is not None:
        return video

    if name.startswith("Flux"):
        ids = torch.zeros(height, width, 3)
        ids[..., 1] = torch.arange(height)[:, None]
        ids[..., 2] = torch.arange(width)[None, :]
        out: dict[str, Any] = dict(
            hidden_states=randn(batch, height * width, cfg.in_channels),
            encoder_hidden_states=randn(batch, seq_len, cfg.joint_attention_dim),
            pooled_projections=randn(batch, cfg.pooled_projection_dim),
            timestep=torch.full((batch,), 0.5, dtype=dtype),
            img_ids=ids.reshape(-1, 3).to(dtype),
            txt_ids=torch.zeros(seq_len, 3, dtype=dtype),
        )
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
        return out
    p = cfg.patch_size
    latents = randn(batch, cfg.in_channels, height * p, width * p)
    if name.startswith("SD3"):
        return dict(
            hidden_states=latents,
            encoder_hidden_states=randn(batch, seq_len, cfg.joint_attention_dim),
            pooled_projections=randn(batch, cfg.pooled_projection_dim),
            timestep=torch.full((batch,), 500.0),
        )
    if name.startswith("PixArt"):
        return dict(
            hidden_states=latents,
            encoder_hidden_states=randn(batch, seq_len, cfg.caption_channels),
            timestep=torch.full((batch,), 500),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if name.startswith("DiT"):
        return dict(
            hidden_states=latents,
            timestep=torch.full((batch,), 500),
            class_labels=torch.arange(batch) % 10,
        )
    raise TypeError(f"no inputs known for {name}")
