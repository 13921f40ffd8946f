"""The RoPE and NaFlex ViTs of issue 22 at their published configurations (random init): one
table for the cost model's setups (``_steps.py``, ``gpu_model.py``, ``gpu_check.py``) and the CPU
benchmark (``vit_speed.py``).

    from _rope_vits import ROPE_VITS, build_rope_vit, rope_vit_inputs

    model = build_rope_vit("hf_dinov3_l", depth=4)          # DINOv3-L/16, 4 of its 24 layers
    inputs = rope_vit_inputs("hf_dinov3_l", model, batch=2, device="cpu")   # 512² images
    ROPE_VITS["hf_dinov3_l"].rows(depth=4)                   # the patch settings to compare
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RopeViT:
    """One model at its published configuration.

    Attributes:
        title: for tables.
        library: ``"timm"`` (``source`` a model name) or ``"transformers"`` (``source`` the
            model class, ``config_class`` its config class, ``config`` the arguments).
        resolution: image side in pixels (NaFlex: the image filling all ``slots``).
        patch, prefix: patch size and prefix tokens (class, registers).
        depth: the published number of blocks.
        slots: NaFlex batches: the padded length (every other image fills 3/4 of it).
    """

    title: str
    library: str
    source: str
    config: Mapping[str, Any]
    resolution: int
    patch: int
    prefix: int
    depth: int
    config_class: str = ""
    slots: int = 0

    def tokens(self, resolution: int, tiny: bool = False) -> int:
        """Tokens entering the first block at ``resolution`` (NaFlex: the slots)."""
        side = resolution // self.patch
        return self.slots if self.slots and not tiny else side * side + self.prefix

    def rows(
        self, depth: int | None = None, patches: int | None = None
    ) -> tuple[tuple[str, str | None, dict[str, Any]], ...]:
        """``(label, method, options)`` of the settings compared: unpatched; the ATC paper's
        DeiT setting scaled to ``depth`` blocks (default: all; ``keep_rate=0.7`` at a quarter,
        half and three quarters of them) and ToMe's constant ``r`` (1/32 of the ``patches`` per
        block; ``depth`` blocks remove as many as all the model's blocks would); ToMe and ATC
        (the fused path on a GPU, and the torch rounds)."""
        depth = depth or self.depth
        patches = patches or (self.resolution // self.patch) ** 2
        locs = tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))
        keep = {"keep_rate": 0.7, "reduction_loc": locs}
        r = max(1, patches * self.depth // (32 * depth))
        return (
            ("unpatched", None, {}),
            ("tome keep 0.7", "tome", keep),
            ("atc keep 0.7", "atc", keep),
            ("atc keep 0.7 torch", "atc", {**keep, "backend": "torch"}),
            (f"tome r={r}", "tome", {"r": r}),
            (f"atc r={r}", "atc", {"r": r}),
        )


ROPE_VITS: dict[str, RopeViT] = {
    "eva_dinov3_l": RopeViT(
        "timm Eva DINOv3-L/16", "timm", "vit_large_patch16_dinov3", {}, 512, 16, 5, 24
    ),
    "naflex_so400m": RopeViT(
        "timm NaFlexVit SigLIP2-so400m", "timm", "naflexvit_so400m_patch16_siglip", {}, 256, 16,
        0, 27,
    ),
    "hf_dinov3_l": RopeViT(
        "HF DINOv3ViT-L/16", "transformers", "DINOv3ViTModel",
        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
             num_register_tokens=4, patch_size=16, image_size=512),
        512, 16, 5, 24, config_class="DINOv3ViTConfig",
    ),
    "hf_siglip2_so400m": RopeViT(
        "HF SigLIP2-so400m NaFlex", "transformers", "Siglip2VisionModel",
        dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=16,
             num_patches=256),
        256, 16, 0, 27, config_class="Siglip2VisionConfig", slots=256,
    ),
    "hf_aimv2_l": RopeViT(
        "HF AIMv2-L/14", "transformers", "Aimv2VisionModel",
        dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, patch_size=14,
             image_size=448),
        448, 14, 0, 24, config_class="Aimv2VisionConfig",
    ),
}  # fmt: skip
TINY_WIDTH = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}


def build_rope_vit(name: str, depth: int | None = None, tiny: bool = False) -> torch.nn.Module:
    """The random-init :data:`ROPE_VITS` model ``name``, eval mode: its published configuration
    with ``depth`` blocks (default: all), or a narrow one of 2 blocks (``tiny``). Made on the
    default device in the default dtype (the caller sets them)."""
    spec = ROPE_VITS[name]
    depth = 2 if tiny else depth or spec.depth
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.library == "timm":
            import timm

            kw = {"embed_dim": 64, "num_heads": 2} if tiny else {}
            size = {} if "naflex" in spec.source else {"img_size": 64 if tiny else spec.resolution}
            model = timm.create_model(spec.source, pretrained=False, depth=depth, **kw, **size)
        else:
            import transformers

            config = dict(spec.config, num_hidden_layers=depth)
            if tiny:
                config.update(TINY_WIDTH, image_size=64, num_patches=16)
            config = getattr(transformers, spec.config_class)(**config)
            model = getattr(transformers, spec.source)._from_config(
                config, attn_implementation="sdpa"
            )
    return model.eval()


def rope_vit_inputs(
    name: str, model: torch.nn.Module, batch: int, device: str | torch.device, tiny: bool = False
) -> dict:
    """Keyword inputs of one call (``x`` for timm, ``pixel_values`` & co. for transformers):
    images at the model's resolution on ``device``; SigLIP2's NaFlex batch as its processor
    makes it, every other image filling 3/4 of the slots (the rest padding; the mask and
    shapes on the CPU)."""
    spec = ROPE_VITS[name]
    dtype = next(model.parameters()).dtype
    side = 64 if tiny else spec.resolution
    if spec.source != "Siglip2VisionModel":
        images = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        return {"x" if spec.library == "timm" else "pixel_values": images}
    p, slots = model.config.patch_size, model.config.num_patches
    grid = int(slots**0.5)
    shapes = torch.tensor([[grid, grid * (4 - i % 2) // 4] for i in range(batch)])
    mask = torch.arange(slots)[None] < shapes.prod(-1)[:, None]
    values = torch.randn(batch, slots, 3 * p * p, dtype=dtype) * mask[..., None]
    return {
        "pixel_values": values.to(device),
        "pixel_attention_mask": mask.long(),
        "spatial_shapes": shapes,
    }
