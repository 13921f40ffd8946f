"""Random-init diffusion models and pipelines built in memory (no download), for tests, docs
and benchmarks. Weights are random, so images are noise: these are for shapes, code paths and
timing. diffusers and transformers are imported when a builder runs::

    from atc_patch.testing import build_tiny_pipeline
    pipe = build_tiny_pipeline("tiny-sdxl")    # or tiny-sd, tiny-flux, tiny-sd3, tiny-pixart,
                                               # tiny-dit
"""

from .dit import TRANSFORMER_KINDS, build_transformer, transformer_config, transformer_inputs
from .pipelines import (
    PIPELINE_KINDS,
    build_tiny_pipeline,
    tiny_clip_tokenizer,
    tiny_pipeline_call_kwargs,
)
from .unet import UNET_KINDS, build_unet, unet_config, unet_inputs

__all__ = [
    "PIPELINE_KINDS",
    "TRANSFORMER_KINDS",
    "UNET_KINDS",
    "build_tiny_pipeline",
    "build_transformer",
    "build_unet",
    "tiny_clip_tokenizer",
    "tiny_pipeline_call_kwargs",
    "transformer_config",
    "transformer_inputs",
    "unet_config",
    "unet_inputs",
]
