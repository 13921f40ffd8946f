"""Random-init configurations and inputs for the current image diffusion transformers:
QwenImage, Z-Image, FLUX.2, Chroma, CogView4, HiDream and Sana.

``"tiny-<name>"``: the real block types with a few channels; ``"<name>-width"``: the published
width (``config.json`` of the model named in :data:`SOURCES`) with one block of each kind.
Used through :func:`atc_patch.testing.build_transformer` and
:func:`~atc_patch.testing.transformer_inputs`::

    model = build_transformer("tiny-qwenimage")
    out = model(**transformer_inputs(model, batch=2, height=8, width=8)).sample  # (2, 64, 16)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SOURCES = {
    "qwenimage": "Qwen/Qwen-Image",
    "zimage": "Tongyi-MAI/Z-Image-Turbo",
    "flux2": "black-forest-labs/FLUX.2-dev",
    "chroma": "lodestones/Chroma1-HD",
    "cogview4": "THUDM/CogView4-6B",
    "hidream": "HiDream-ai/HiDream-I1-Full",
    "sana": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
}

CLASSES = {
    "qwenimage": "QwenImageTransformer2DModel",
    "zimage": "ZImageTransformer2DModel",
    "flux2": "Flux2Transformer2DModel",
    "chroma": "ChromaTransformer2DModel",
    "cogview4": "CogView4Transformer2DModel",
    "hidream": "HiDreamImageTransformer2DModel",
    "sana": "SanaTransformer2DModel",
}

TINY: dict[str, dict[str, Any]] = {
    "qwenimage": dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ),
    "zimage": dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
        axes_lens=[1024, 64, 64],
    ),
    "flux2": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
        mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
    ),
    "chroma": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    ),
    "cogview4": dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=8,
        pos_embed_max_size=32, sample_size=16, rope_axes_dim=(32, 32),
    ),
    "hidream": dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, caption_channels=[32, 16],
        text_emb_dim=24, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(8, 4, 4),
        max_resolution=(32, 32), llama_layers=[0, 1, 2, 3],
    ),
    "sana": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
        cross_attention_dim=32, caption_channels=32, mlp_ratio=2.5, sample_size=16, patch_size=1,
    ),
}  # fmt: skip

WIDTH: dict[str, dict[str, Any]] = {
    "qwenimage": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
    ),
    "zimage": dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=1,
        n_refiner_layers=1, n_heads=30, n_kv_heads=30, cap_feat_dim=2560, rope_theta=256.0,
        axes_dims=[32, 48, 48],
    ),
    "flux2": dict(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
        attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
        timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    ),
    "chroma": dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
        approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5,
    ),
    "cogview4": dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=128,
        num_attention_heads=32, text_embed_dim=4096, time_embed_dim=512, condition_dim=256,
        pos_embed_max_size=128, sample_size=128, rope_axes_dim=(256, 256),
    ),
    "hidream": dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096],
        text_emb_dim=2048, num_routed_experts=4, num_activated_experts=2,
        axes_dims_rope=(64, 32, 32), max_resolution=(128, 128), llama_layers=[0, 1],
    ),
    "sana": dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
        num_layers=1, num_cross_attention_heads=20, cross_attention_head_dim=112,
        cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32,
        patch_size=1,
    ),
}  # fmt: skip

KINDS = tuple(f"tiny-{n}" for n in CLASSES) + tuple(f"{n}-width" for n in CLASSES)


def config(kind: str) -> tuple[str, dict[str, Any]] | None:
    """``(class name, keyword arguments)`` for ``kind`` (one of :data:`KINDS`), else ``None``."""
    return lookup(kind, CLASSES, TINY, WIDTH)


def lookup(
    kind: str, classes: dict[str, str], tiny: dict[str, dict], width: dict[str, dict]
) -> tuple[str, dict[str, Any]] | None:
    """``"tiny-<name>"`` -> ``(classes[name], tiny[name])``, ``"<name>-width"`` ->
    ``(classes[name], width[name])`` (a copy of the keyword arguments), else ``None``."""
    if kind.startswith("tiny-") and kind[5:] in tiny:
        return classes[kind[5:]], dict(tiny[kind[5:]])
    if kind.endswith("-width") and kind[:-6] in width:
        return classes[kind[:-6]], dict(width[kind[:-6]])
    return None


Randn = Callable[..., torch.Tensor]


def inputs(
    model: Any, randn: Randn, batch: int, h: int, w: int, seq_len: int, refs: int
) -> dict[str, Any] | None:
    """Keyword inputs for ``model`` (one of :data:`CLASSES`) on an ``h x w`` token grid with
    ``seq_len`` text tokens and ``refs`` reference images of the same size (QwenImage, FLUX.2);
    ``None`` for another class."""
    name = next((n for n, c in CLASSES.items() if type(model).__name__ == c), None)
    if name is None:
        return None
    if refs and name not in ("qwenimage", "flux2"):
        raise ValueError(f"refs= applies to QwenImage and FLUX.2, not {CLASSES[name]}")
    cfg, dtype = model.config, model.dtype
    t = torch.full((batch,), 0.5, dtype=dtype)
    return _MAKERS[name](cfg, randn, batch, h, w, seq_len, refs, t)


def _text_mask(batch: int, seq_len: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """All ones but the last two tokens of the last sample (a shorter prompt)."""
    mask = torch.ones(batch, seq_len, dtype=dtype)
    mask[-1, max(seq_len - 2, 1) :] = 0
    return mask


def _qwenimage(cfg, randn, batch, h, w, seq_len, refs, t) -> dict[str, Any]:
    return dict(
        hidden_states=randn(batch, h * w * (1 + refs), cfg.in_channels),
        encoder_hidden_states=randn(batch, seq_len, cfg.joint_attention_dim),
        encoder_hidden_states_mask=_text_mask(batch, seq_len),
        timestep=t,
        img_shapes=[[(1, h, w)] * (1 + refs)] * batch,
    )


def _zimage(cfg, randn, batch, h, w, seq_len, refs, t) -> dict[str, Any]:
    p = cfg.all_patch_size[0]
    lens = [seq_len if i % 2 == 0 else max(seq_len - 2, 1) for i in range(batch)]
    return dict(
        x=[randn(cfg.in_channels, 1, p * h, p * w) for _ in range(batch)],
        t=t,
        cap_feats=[randn(n, cfg.cap_feat_dim) for n in lens],
    )


def _flux2(cfg, randn, batch, h, w, seq_len, refs, t) -> dict[str, Any]:
    grids = [torch.cartesian_prod(torch.tensor([10 * i]), torch.arange(h), torch.arange(w),
                                  torch.arange(1)) for i in range(1 + refs)]  # fmt: skip
    ids = torch.cat(grids).float()
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                               torch.arange(seq_len)).float()  # fmt: skip
    return dict(
        hidden_states=randn(batch, ids.shape[0], cfg.in_channels),
        encoder_hidden_states=randn(batch, seq_len, cfg.joint_attention_dim),
        timestep=t,
        img_ids=ids[None].expand(batch, -1, -1),
        txt_ids=txt[None].expand(batch, -1, -1),
        guidance=torch.full((batch,), 4.0, dtype=t.dtype),
    )


def _chroma(cfg, randn, batch, h, w, seq_len, refs, t) -> dict[str, Any]:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    # ChromaPipeline._prepare_attention_mask: [text mask, ones for the image tokens]
    mask = torch.cat([_text_mask(batch, seq_len), torch.ones(batch, h * w, dtype=torch.long)], 1)
    return dict(
        hidden_states=randn(batch, h * w, cfg.in_channels),
        encoder_hidden_states=randn(batch, seq_len, cfg.joint_attention_dim),
        timestep=t,
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(seq_len, 3),
        attention_mask=mask.to(t.dtype),
    )


def _cogview4(cfg, randn, batch, h, w, seq_len, refs, t) -> dict[str, Any]:
    p = cfg.patch_size
    size = torch.tensor([[h * p * 8.0, w * p * 8.0]], dtype=t.dtype).expand(batch, 2)
    return dict(
        hidden_states=randn(batch, cfg.in_channels, h * p, w * p),
        encoder_hidden_states=randn(batch, seq_len, cfg.text_embed_dim),
        timestep=t * 1000,
        original_size=size,
        target_size=size,
        crop_coords=torch.zeros(batch, 2, dtype=t.dtype),
    )


def _hidream(cfg, randn, batch, h, w, seq_len, refs, t) -> dict[str, Any]:
    p = cfg.patch_size
    layers = max(cfg.llama_layers) + 1
    return dict(
        hidden_states=randn(batch, cfg.in_channels, h * p, w * p),
        timesteps=t * 1000,
        encoder_hidden_states_t5=randn(batch, seq_len, cfg.caption_channels[0]),
        encoder_hidden_states_llama3=randn(layers, batch, seq_len, cfg.caption_channels[1]),
        pooled_embeds=randn(batch, cfg.text_emb_dim),
    )


def _sana(cfg, randn, batch, h, w, seq_len, refs, t) -> dict[str, Any]:
    p = cfg.patch_size
    return dict(
        hidden_states=randn(batch, cfg.in_channels, h * p, w * p),
        encoder_hidden_states=randn(batch, seq_len, cfg.caption_channels),
        timestep=t * 1000,
        encoder_attention_mask=_text_mask(batch, seq_len, t.dtype),
    )


_MAKERS = {
    "qwenimage": _qwenimage,
    "zimage": _zimage,
    "flux2": _flux2,
    "chroma": _chroma,
    "cogview4": _cogview4,
    "hidream": _hidream,
    "sana": _sana,
}
