"""Random-init Stable Diffusion parts built in memory (no download), for tests and benchmarks.

* :func:`unet_config` / :func:`build_unet`: a ``UNet2DConditionModel`` in the SD 1.x, SD 2.x or
  SDXL layout, full size (``"sd15"``, ``"sd2"``, ``"sdxl"``) or tiny (``"tiny-sd"``,
  ``"tiny-sdxl"``: a few channels, same block layout, runs in milliseconds on a CPU).
* :func:`build_tiny_pipeline`: a complete tiny ``StableDiffusionPipeline`` (UNet, VAE, CLIP text
  encoder, an in-memory CLIP tokenizer and a DDIM scheduler) that runs end to end offline.

Weights are random: images are noise. What these are for is shapes, code paths and timing.
Imports diffusers/transformers lazily, so importing :mod:`atc_patch` never needs them.
"""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("tiny-sd", "tiny-sdxl", "sd15", "sd2", "sdxl")

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def unet_config(kind: str = "tiny-sd") -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments for one of :data:`KINDS`.

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
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


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


def tiny_clip_tokenizer(model_max_length: int = 16):
    """A working ``CLIPTokenizer`` built in memory: printable ASCII characters, no merges."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_tiny_pipeline(seed: int = 0):
    """A tiny random-init ``StableDiffusionPipeline`` (SD 1.x layout) that runs fully offline.

    Latents are 8x smaller than the image, as in SD: ``height=width=128`` gives 16x16 latents.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet("tiny-sd", seed=seed)
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
        ).eval()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
