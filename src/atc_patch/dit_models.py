"""Random-init diffusion transformers built in memory (no download), for tests and benchmarks.

* :func:`build_transformer` / :func:`transformer_inputs`: a ``FluxTransformer2DModel``,
  ``SD3Transformer2DModel``, ``PixArtTransformer2DModel`` or ``DiTTransformer2DModel`` with a
  tiny configuration (``"tiny-flux"``, ``"tiny-sd3"``, ``"tiny-pixart"``, ``"tiny-dit"``: the
  real block types, a few channels) or the real width at reduced depth (``"flux-width"``:
  FLUX.1's 3072 channels with 2 double + 4 single blocks; ``"sd3-width"``: SD3-medium's 1536
  channels with 4 joint blocks), and keyword inputs for one call.
* :func:`build_tiny_pipeline`: a complete tiny ``FluxPipeline``, ``StableDiffusion3Pipeline``,
  ``PixArtAlphaPipeline`` or ``DiTPipeline`` (transformer, VAE, text encoders, in-memory
  tokenizers, scheduler) that runs end to end offline.

Weights are random: images are noise. What these are for is shapes, code paths and timing.
Imports diffusers/transformers lazily, so importing :mod:`atc_patch` never needs them.
"""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit", "flux-width", "sd3-width")
PIPELINES = ("tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit")


def transformer_config(kind: str) -> tuple[str, dict[str, Any]]:
    """``(class name, keyword arguments)`` of the transformer for one of :data:`KINDS`."""
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
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


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
) -> dict[str, Any]:
    """Keyword inputs for ``model(**inputs)`` on an ``height x width`` grid of image tokens.

    Flux: packed latents ``(B, height * width, in_channels)`` with raster ``img_ids`` (each
    token a 2x2 latent patch, as ``FluxPipeline`` packs them). SD3 / PixArt / DiT: latents
    ``(B, C, height * p, width * p)`` with ``p`` the patch size. Text: ``seq_len`` tokens.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = model.dtype
    name = type(model).__name__

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

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


# --------------------------------------------------------------------------------------------
# Tiny pipelines
# --------------------------------------------------------------------------------------------
def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=1.0,
        shift_factor=0.0,
    ).eval()


def _tiny_clip(tokenizer, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def _tiny_t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def build_tiny_pipeline(kind: str = "tiny-flux", seed: int = 0):
    """A tiny random-init pipeline of one of :data:`PIPELINES` that runs fully offline.

    The T5 tokenizers are stand-ins (the in-memory character-level CLIP tokenizer of
    :func:`atc_patch.sd_models.tiny_clip_tokenizer`); DiT's classes are ``"class 0"`` ..
    ``"class 9"``. Images are 8x the latent size (Flux/SD3/PixArt/DiT VAEs downsample by 8);
    use ``height=width=128`` (16x16 latents).
    """
    import diffusers

    from .sd_models import tiny_clip_tokenizer

    if kind not in PIPELINES:
        raise ValueError(f"kind must be one of {PIPELINES}, got {kind!r}")
    tok = tiny_clip_tokenizer(model_max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_transformer(kind, seed=seed)
        if kind == "tiny-flux":
            pipe = diffusers.FluxPipeline(
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                vae=_tiny_vae(4),
                text_encoder=_tiny_clip(tok),
                tokenizer=tok,
                text_encoder_2=_tiny_t5(tok),
                tokenizer_2=tiny_clip_tokenizer(model_max_length=16),
                transformer=transformer,
            )
        elif kind == "tiny-sd3":
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=transformer,
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                vae=_tiny_vae(4),
                text_encoder=_tiny_clip(tok, projection=True),
                tokenizer=tok,
                text_encoder_2=_tiny_clip(tok, projection=True),
                tokenizer_2=tiny_clip_tokenizer(model_max_length=16),
                text_encoder_3=_tiny_t5(tok),
                tokenizer_3=tiny_clip_tokenizer(model_max_length=16),
            )
        elif kind == "tiny-pixart":
            pipe = diffusers.PixArtAlphaPipeline(
                tokenizer=tok,
                text_encoder=_tiny_t5(tok),
                vae=_tiny_vae(4),
                transformer=transformer,
                scheduler=diffusers.DPMSolverMultistepScheduler(),
            )
        else:
            pipe = diffusers.DiTPipeline(
                transformer=transformer,
                vae=_tiny_vae(4),
                scheduler=diffusers.DDIMScheduler(),
                id2label={i: f"class {i}" for i in range(10)},
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline_call_kwargs(kind: str) -> dict[str, Any]:
    """Extra ``pipe(...)`` keyword arguments the tiny pipelines need (short text, no binning)."""
    if kind == "tiny-flux":
        return dict(max_sequence_length=16)
    if kind == "tiny-sd3":
        return dict(max_sequence_length=16)
    if kind == "tiny-pixart":
        return dict(max_sequence_length=16, use_resolution_binning=False, clean_caption=False)
    return {}
