"""Tiny random-init diffusers pipelines that run end to end offline: the denoiser of
:mod:`~atc_patch.testing.unet` or :mod:`~atc_patch.testing.dit`, a small VAE, small text
encoders, in-memory tokenizers and the pipeline's usual scheduler::

    pipe = build_tiny_pipeline("tiny-flux")
    image = pipe("a cat", height=128, width=128, num_inference_steps=2,
                 **tiny_pipeline_call_kwargs("tiny-flux")).images[0]
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from .dit import build_transformer
from .unet import build_unet

PIPELINE_KINDS = (
    "tiny-sd",
    "tiny-sdxl",
    "tiny-flux",
    "tiny-sd3",
    "tiny-pixart",
    "tiny-dit",
    "tiny-chroma",
)


def tiny_clip_tokenizer(model_max_length: int = 16):
    """A working ``CLIPTokenizer`` built in memory: printable ASCII characters, no merges."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _tiny_vae(latent_channels: int = 4, **scaling: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        **scaling,
    ).eval()


def _tiny_clip(tokenizer, projection: bool = False, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
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


def build_tiny_pipeline(kind: str = "tiny-sd", seed: int = 0):
    """A tiny random-init pipeline of one of :data:`PIPELINE_KINDS`; same seed, same weights.

    ``"tiny-sd"``: ``StableDiffusionPipeline`` (SD 1.x layout, DDIM); ``"tiny-sdxl"``:
    ``StableDiffusionXLPipeline`` (two CLIP text encoders, pooled text and time ids);
    ``"tiny-flux"`` / ``"tiny-sd3"`` / ``"tiny-pixart"`` / ``"tiny-dit"`` / ``"tiny-chroma"``:
    ``FluxPipeline``, ``StableDiffusion3Pipeline``, ``PixArtAlphaPipeline``, ``DiTPipeline``,
    ``ChromaPipeline``. The T5 tokenizers
    are stand-ins (:func:`tiny_clip_tokenizer`); DiT's classes are ``"class 0"`` ..
    ``"class 9"``. Images are 8x the latent size: ``height=width=128`` gives 16x16 latents.
    Pass :func:`tiny_pipeline_call_kwargs` to the call.

    Raises:
        ValueError: an unknown ``kind``, naming the valid ones.
    """
    import diffusers

    if kind not in PIPELINE_KINDS:
        raise ValueError(f"kind must be one of {PIPELINE_KINDS}, got {kind!r}")
    tok = tiny_clip_tokenizer(model_max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in ("tiny-sd", "tiny-sdxl"):
            unet = build_unet(kind, seed=seed)
            if kind == "tiny-sd":
                pipe = diffusers.StableDiffusionPipeline(
                    vae=_tiny_vae(),
                    text_encoder=_tiny_clip(tok),
                    tokenizer=tok,
                    unet=unet,
                    scheduler=_ddim(),
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
            else:  # the two encoders' hidden states concatenate to cross_attention_dim=32
                pipe = diffusers.StableDiffusionXLPipeline(
                    vae=_tiny_vae(),
                    text_encoder=_tiny_clip(tok, hidden_size=16),
                    text_encoder_2=_tiny_clip(tok, projection=True, hidden_size=16),
                    tokenizer=tok,
                    tokenizer_2=tiny_clip_tokenizer(model_max_length=16),
                    unet=unet,
                    scheduler=_ddim(),
                    add_watermarker=False,
                )
        else:
            pipe = _tiny_transformer_pipeline(diffusers, kind, tok, build_transformer(kind, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def _tiny_transformer_pipeline(diffusers: Any, kind: str, tok: Any, transformer: Any):
    vae = partial(_tiny_vae, 4, scaling_factor=1.0, shift_factor=0.0)  # built in call order
    if kind == "tiny-flux":
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=vae(),
            text_encoder=_tiny_clip(tok),
            tokenizer=tok,
            text_encoder_2=_tiny_t5(tok),
            tokenizer_2=tiny_clip_tokenizer(model_max_length=16),
            transformer=transformer,
        )
    if kind == "tiny-chroma":  # FLUX.1's layout; always passes a (text, image) attention mask
        return diffusers.ChromaPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=vae(),
            text_encoder=_tiny_t5(tok),
            tokenizer=tok,
            transformer=transformer,
        )
    if kind == "tiny-sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=vae(),
            text_encoder=_tiny_clip(tok, projection=True),
            tokenizer=tok,
            text_encoder_2=_tiny_clip(tok, projection=True),
            tokenizer_2=tiny_clip_tokenizer(model_max_length=16),
            text_encoder_3=_tiny_t5(tok),
            tokenizer_3=tiny_clip_tokenizer(model_max_length=16),
        )
    if kind == "tiny-pixart":
        return diffusers.PixArtAlphaPipeline(
            tokenizer=tok,
            text_encoder=_tiny_t5(tok),
            vae=vae(),
            transformer=transformer,
            scheduler=diffusers.DPMSolverMultistepScheduler(),
        )
    return diffusers.DiTPipeline(
        transformer=transformer,
        vae=vae(),
        scheduler=diffusers.DDIMScheduler(),
        id2label={i: f"class {i}" for i in range(10)},
    )


def tiny_pipeline_call_kwargs(kind: str) -> dict[str, Any]:
    """Extra ``pipe(...)`` keyword arguments the tiny pipelines need (short text, no binning)."""
    if kind in ("tiny-flux", "tiny-sd3", "tiny-chroma"):
        return dict(max_sequence_length=16)
    if kind == "tiny-pixart":
        return dict(max_sequence_length=16, use_resolution_binning=False, clean_caption=False)
    return {}
