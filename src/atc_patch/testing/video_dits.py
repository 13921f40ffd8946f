"""Random-init configurations and inputs for the video diffusion transformers: Wan 2.x,
CogVideoX, LTX-Video and HunyuanVideo.

``"tiny-<name>"``: the real block types with a few channels; ``"<name>-width"``: the published
width (``config.json`` of the model named in :data:`SOURCES`) with one block of each kind.
Used through :func:`atc_patch.testing.build_transformer` and
:func:`~atc_patch.testing.transformer_inputs` (``frames`` latent frames of ``height x width``
tokens; ``i2v=True``: the first frame is an image-to-video conditioning frame)::

    model = build_transformer("tiny-wan")
    out = model(**transformer_inputs(model, batch=2, height=4, width=4, frames=3)).sample
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .image_dits import lookup

SOURCES = {
    "wan": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "cogvideox": "THUDM/CogVideoX-5b",
    "ltx": "Lightricks/LTX-Video",
    "hunyuanvideo": "hunyuanvideo-community/HunyuanVideo",
    "hunyuanvideo-i2v": "hunyuanvideo-community/HunyuanVideo-I2V",
}

CLASSES = {
    "wan": "WanTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel",
    "ltx": "LTXVideoTransformer3DModel",
    "hunyuanvideo": "HunyuanVideoTransformer3DModel",
    "hunyuanvideo-i2v": "HunyuanVideoTransformer3DModel",
}

TINY: dict[str, dict[str, Any]] = {
    "wan": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ),
    "cogvideox": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16,
        sample_frames=9, patch_size=2, max_text_seq_length=6,
        use_rotary_positional_embeddings=True,
    ),
    "ltx": dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=32,
    ),
    "hunyuanvideo": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    ),
    "hunyuanvideo-i2v": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
        guidance_embeds=False, image_condition_type="token_replace",
    ),
}  # fmt: skip

WIDTH: dict[str, dict[str, Any]] = {
    "wan": dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=1,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    ),
    "cogvideox": dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
        time_embed_dim=512, text_embed_dim=4096, num_layers=1, sample_width=90,
        sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
        use_rotary_positional_embeddings=True,
    ),
    "ltx": dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
        attention_head_dim=64, cross_attention_dim=2048, num_layers=1, caption_channels=4096,
    ),
    "hunyuanvideo": dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
        num_layers=1, num_single_layers=1, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
        rope_theta=256.0, rope_axes_dim=(16, 56, 56),
    ),
}  # fmt: skip

KINDS = tuple(f"tiny-{n}" for n in TINY) + tuple(f"{n}-width" for n in WIDTH)


def config(kind: str) -> tuple[str, dict[str, Any]] | None:
    """``(class name, keyword arguments)`` for ``kind`` (one of :data:`KINDS`), else ``None``."""
    return lookup(kind, CLASSES, TINY, WIDTH)


Randn = Callable[..., torch.Tensor]


def inputs(
    model: Any, randn: Randn, batch: int, frames: int, h: int, w: int, seq_len: int, i2v: bool
) -> dict[str, Any] | None:
    """Keyword inputs for ``model`` (one of :data:`CLASSES`) on a ``frames x h x w`` token grid
    with ``seq_len`` text tokens, as its pipeline calls it; ``i2v``: a per-token timestep, 0 on
    the first latent frame (Wan 2.2 TI2V, LTX-Video image-to-video). ``None`` for another
    class."""
    name = next((n for n, c in CLASSES.items() if type(model).__name__ == c), None)
    if name is None:
        return None
    return _MAKERS[name](model.config, randn, batch, frames, h, w, seq_len, i2v, model.dtype)


def _per_token(batch: int, frames: int, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, frames * h * w)`` timesteps: 500, and 0 on the first frame (the clean image)."""
    t = torch.full((batch, frames, h, w), 500.0, dtype=dtype)
    t[:, 0] = 0
    return t.flatten(1)


def _wan(cfg, randn, batch, frames, h, w, seq_len, i2v, dtype) -> dict[str, Any]:
    pt, ph, pw = cfg.patch_size
    t = _per_token(batch, frames, h, w, dtype) if i2v else torch.full((batch,), 500.0)
    return dict(
        hidden_states=randn(batch, cfg.in_channels, frames * pt, h * ph, w * pw),
        timestep=t,
        encoder_hidden_states=randn(batch, seq_len, cfg.text_dim),
    )


def _cogvideox(cfg, randn, batch, frames, h, w, seq_len, i2v, dtype) -> dict[str, Any]:
    """Rotary tables as ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` makes them
    (1.0: ``patch_size_t=None``)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    rotary = None
    if cfg.use_rotary_positional_embeddings:
        base = (cfg.sample_width // p, cfg.sample_height // p)
        rotary = get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=get_resize_crop_region_for_grid((h, w), *base),
            grid_size=(h, w),
            temporal_size=frames,
        )
        rotary = tuple(r.to(dtype) for r in rotary)
    return dict(
        hidden_states=randn(batch, frames * pt, cfg.in_channels, h * p, w * p),
        encoder_hidden_states=randn(batch, seq_len, cfg.text_embed_dim),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        image_rotary_emb=rotary,
    )


def _ltx(cfg, randn, batch, frames, h, w, seq_len, i2v, dtype) -> dict[str, Any]:
    """Packed latents ``(B, F * H * W, C)``; ``i2v``: ``LTXImageToVideoPipeline``'s timestep
    ``t * (1 - conditioning_mask)``, 0 on the first frame."""
    mask = torch.ones(batch, seq_len, dtype=dtype)
    mask[-1, max(seq_len - 2, 1) :] = 0  # a shorter prompt in the last sample
    t = _per_token(batch, frames, h, w, dtype) if i2v else torch.full((batch,), 500.0)
    return dict(
        hidden_states=randn(batch, frames * h * w, cfg.in_channels),
        encoder_hidden_states=randn(batch, seq_len, cfg.caption_channels),
        timestep=t,
        encoder_attention_mask=mask,
        num_frames=frames,
        height=h,
        width=w,
        rope_interpolation_scale=(8 / 25, 32, 32),  # (temporal VAE ratio / fps, 32, 32)
    )


def _hunyuanvideo(cfg, randn, batch, frames, h, w, seq_len, i2v, dtype) -> dict[str, Any]:
    """A right-padded prompt in the last sample (the model counts its valid tokens)."""
    p, pt = cfg.patch_size, cfg.patch_size_t
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, max(seq_len - 2, 1) :] = 0
    out = dict(
        hidden_states=randn(batch, cfg.in_channels, frames * pt, h * p, w * p),
        timestep=torch.full((batch,), 500.0, dtype=dtype),
        encoder_hidden_states=randn(batch, seq_len, cfg.text_embed_dim),
        encoder_attention_mask=mask,
        pooled_projections=randn(batch, cfg.pooled_projection_dim),
    )
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((batch,), 6000.0, dtype=dtype)
    return out


_MAKERS = {
    "wan": _wan,
    "cogvideox": _cogvideox,
    "ltx": _ltx,
    "hunyuanvideo": _hunyuanvideo,
    "hunyuanvideo-i2v": _hunyuanvideo,
}
