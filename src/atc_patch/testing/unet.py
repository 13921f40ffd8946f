"""Random-init ``UNet2DConditionModel`` in the SD 1.x, SD 2.x or SDXL layout, full size
(``"sd15"``, ``"sd2"``, ``"sdxl"``) or tiny (``"tiny-sd"``, ``"tiny-sdxl"``: a few channels,
the same block layout), and keyword inputs for one call::

    unet = build_unet("tiny-sdxl")
    out = unet(**unet_inputs(unet, batch=2)).sample   # (2, 4, 16, 16)
"""

from __future__ import annotations

from typing import Any

import torch

UNET_KINDS = ("tiny-sd", "tiny-sdxl", "sd15", "sd2", "sdxl")

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def unet_config(kind: str = "tiny-sd") -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments for one of :data:`UNET_KINDS`.

    The tiny configurations keep the real block layout: ``"tiny-sd"`` has attention at the
    latent resolution and at 1/2 (then a plain block), ``"tiny-sdxl"`` has none at the latent
    resolution (``DownBlock2D`` first), attention at 1/2 and 1/4, ``transformer_layers_per_block``
    and SDXL's ``text_time`` added conditioning.
    """
    if kind == "sd15":  # runwayml/stable-diffusion-v1-5 unet/config.json
        return dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    if kind == "sd2":  # stabilityai/stable-diffusion-2-1 unet/config.json
        return dict(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
        )
    if kind == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        return dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    if kind == "tiny-sd":
        return dict(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    if kind == "tiny-sdxl":
        return dict(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + 6 time ids
        )
    raise ValueError(f"kind must be one of {UNET_KINDS}, got {kind!r}")


def build_unet(kind: str = "tiny-sd", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init ``UNet2DConditionModel`` (eval mode) for ``kind``; same seed, same weights."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(kind))
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval()


def unet_inputs(
    unet: Any,
    batch: int = 2,
    height: int | None = None,
    width: int | None = None,
    seq_len: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword inputs for ``unet(**inputs)``: ``sample`` ``(B, C, h, w)`` latents, a timestep,
    ``encoder_hidden_states`` ``(B, seq_len, cross_attention_dim)`` and, for SDXL-style UNets,
    ``added_cond_kwargs`` (``text_embeds``, ``time_ids``). Sizes are in latent pixels.
    """
    cfg = unet.config
    h = height or cfg.sample_size
    w = width or cfg.sample_size
    g = torch.Generator().manual_seed(seed)
    dtype = unet.dtype
    cross = cfg.cross_attention_dim
    inputs: dict[str, Any] = dict(
        sample=torch.randn(batch, cfg.in_channels, h, w, generator=g).to(dtype),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, seq_len, cross, generator=g).to(dtype),
    )
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, pooled, generator=g).to(dtype),
            time_ids=torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]] * batch),
        )
    return inputs
