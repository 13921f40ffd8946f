"""ATC and ToMe DeiTs as timm models: ``import atc_patch.pretrained.timm_models`` registers

* ``atc_tiny_patch16_224``, ``atc_small_patch16_224``, ``atc_base_patch16_224``
* ``tome_tiny_patch16_224``, ``tome_small_patch16_224``, ``tome_base_patch16_224``

so that ``timm.create_model`` (and every timm-based script that calls it) builds a patched
DeiT by name; each released file is a pretrained tag (``.im1k_complete_07``), ``.fb_in1k`` is
timm's DeiT reduced off the shelf. docs/pretrained.md lists the options::

    import atc_patch.pretrained.timm_models  # noqa: F401  (registers the names)
    model = timm.create_model("atc_small_patch16_224", linkage="complete", keep_rate=0.7,
                              reduction_loc=(3, 6, 9), proportional_attn=True, pretrained=True)
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    load_pretrained,
)
from timm.models import register_model as _register
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .._validate import as_bool, as_float
from ..patch import apply_patch
from .deit import eval_pretrained_cfg
from .releases import (
    DATASETS,
    KEEP_RATES,
    REDUCTION_LOC,
    RELEASE_LINKAGES,
    SIZES,
    code_rate,
    rate_code,
    released_checkpoints,
)
from .safe_load import load_checkpoint, select_state_dict
from .settings import ALIASES, REDUCTION_OPTIONS, resolve_aliases

MODEL_NAMES = tuple(f"{m}_{s}_patch16_224" for m in ("atc", "tome") for s in SIZES)
WEIGHT_OPTIONS = ("dataset", "ema", "distilled")
"""Options of the registry entries besides timm's ``VisionTransformer`` ones and the
reduction's (:data:`atc_patch.pretrained.settings.REDUCTION_OPTIONS`)."""


def _release_tag(dataset: str, linkage: str, keep_rate: float) -> str:
    return f"{dataset}_{linkage}_{rate_code(keep_rate)}"


def _default_cfgs() -> dict[str, Any]:
    cfgs: dict[str, Any] = {}
    for size in SIZES:
        deit = get_pretrained_cfg(f"deit_{size}_patch16_224.fb_in1k")
        fb = deit.to_dict() if deit is not None else {}
        fb.pop("architecture", None)
        fb.pop("tag", None)
        fb.setdefault("hf_hub_id", f"timm/deit_{size}_patch16_224.fb_in1k")
        default = f"atc_{size}_patch16_224.{_release_tag('im1k', 'average', 0.7)}"
        cfgs[default] = None  # placeholder: the first tag of an architecture is its default
        for release in released_checkpoints():
            if release.task != "classification" or release.size != size:
                continue
            tag = _release_tag(release.dataset, release.linkage, release.keep_rate)
            cfg = eval_pretrained_cfg(release.dataset, DATASETS[release.dataset])
            cfg.update(hf_hub_id=release.repo_id, hf_hub_filename=release.filename)
            cfgs[f"atc_{size}_patch16_224.{tag}"] = cfg
        cfgs[f"atc_{size}_patch16_224.fb_in1k"] = dict(fb)
        cfgs[f"tome_{size}_patch16_224.fb_in1k"] = dict(fb)
    return cfgs


# timm reads the module-level ``default_cfgs`` when a model is registered: the first tag of each
# architecture is its default (``im1k_average_07`` for atc_*, ``fb_in1k`` for tome_*).
default_cfgs = generate_default_cfgs(_default_cfgs())


def _filter(state_dict: dict, model: VisionTransformer, ema: bool | None) -> dict:
    """Released file (``model`` / ``model_ema`` / ``ema_best``) or timm weights -> state dict."""
    weights, _ = select_state_dict(state_dict, ema)
    return checkpoint_filter_fn(weights, model, adapt_layer_scale=True)


def _tag_settings(tag: str | None) -> dict[str, Any]:
    """``"nab_single_05"`` -> ``{"dataset": "nab", "linkage": "single", "keep_rate": 0.5}``."""
    if not tag or tag.count("_") != 2:
        return {}
    dataset, linkage, code = tag.split("_")
    if dataset not in DATASETS or not code.isdigit():
        return {}
    return {"dataset": dataset, "linkage": linkage, "keep_rate": code_rate(code)}


def _reduction(method: str, size: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the reduction options out of ``kwargs`` (aliases resolved).

    Raises:
        ValueError: ``method`` given (the name fixes it), naming the valid keywords.
    """
    if "method" in kwargs:
        other = kwargs["method"]
        named = f"{other}_{size}_patch16_224"
        instead = (
            f"use {named!r}"
            if named in MODEL_NAMES
            else f"build timm's 'deit_{size}_patch16_224' and call "
            f"atc_patch.apply_patch(model, method={other!r}, ...)"
        )
        raise ValueError(
            f"{method}_{size}_patch16_224 takes no method= (its name fixes method={method!r}); "
            f"for method={other!r} {instead}. Valid keywords besides timm's VisionTransformer "
            f"ones: {sorted([*REDUCTION_OPTIONS, *ALIASES, *WEIGHT_OPTIONS])}"
        )
    names = (*REDUCTION_OPTIONS, *ALIASES)
    return resolve_aliases({k: kwargs.pop(k) for k in names if k in kwargs})


def _create(
    method: str, size: str, pretrained: bool = False, /, **kwargs: Any
) -> VisionTransformer:
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    cache_dir = kwargs.pop("cache_dir", None)
    tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None
    from_tag = _tag_settings(tag) if method == "atc" else {}
    dataset = kwargs.pop("dataset", from_tag.get("dataset", "im1k"))
    ema = kwargs.pop("ema", None)
    distilled = kwargs.pop("distilled", False)
    if ema is not None and not pretrained:
        raise ValueError("ema chooses between the released weights: use it with pretrained=True")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")

    patch = _reduction(method, size, kwargs)
    patch.setdefault("prop_attn", True)
    if method == "atc":
        patch.setdefault("linkage", from_tag.get("linkage", "average"))
        if not as_bool("prop_attn", patch["prop_attn"]):  # the reference DeiT's forward
            patch.setdefault("size_mode", "reset")
    if "r" not in patch and "r_schedule" not in patch:
        patch.setdefault("keep_rate", from_tag.get("keep_rate", 0.7))
        patch.setdefault("reduction_loc", REDUCTION_LOC)

    if pretrained_cfg is None and not distilled:
        try:
            pretrained_cfg = _pick_release(method, size, dataset, patch)
        except ValueError:
            if pretrained:
                raise
    if pretrained and dataset != "im1k" and pretrained_cfg in (None, "fb_in1k"):
        raise ValueError(f"the {method}_{size}_patch16_224.fb_in1k weights are ImageNet-1k only")
    cls = VisionTransformer
    if distilled:
        cls, pretrained_cfg = VisionTransformerDistilled, _distilled_cfg(size, pretrained_cfg)

    name = f"{method}_{size}_patch16_224"
    model_args = dict(patch_size=16, embed_dim=SIZES[size][0], depth=12, num_heads=SIZES[size][1])
    model = build_model_with_cfg(
        cls,
        name,
        False,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=overlay,
        **dict(model_args, **kwargs),
    )
    if pretrained:  # timm adapts the weights that the one weights-only loader read
        cfg = model.pretrained_cfg
        weights = load_checkpoint(_weights_source(cfg), any_url=True, cache_dir=cache_dir)
        load_pretrained(
            model,
            pretrained_cfg={**cfg, "source": "", "state_dict": weights},
            num_classes=model.num_classes,
            in_chans=kwargs.get("in_chans", 3),
            filter_fn=partial(_filter, ema=ema),
        )
    apply_patch(model, method=method, **patch)
    return model


def _weights_source(cfg: dict[str, Any]) -> str:
    """Where the weights of a resolved ``pretrained_cfg`` are: its ``file``, its hub file
    (timm's ``model.safetensors`` unless it names one) or its ``url``."""
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub_id"):
        return f"{cfg['hf_hub_id']}/{cfg.get('hf_hub_filename') or 'model.safetensors'}"
    if cfg.get("url"):
        return cfg["url"]
    raise ValueError(f"no weights are known for {cfg.get('architecture')}.{cfg.get('tag')}")


def _distilled_cfg(size: str, tag: Any) -> dict[str, Any]:
    """timm's distilled DeiT weights (the only ones with a distillation token) as our cfg."""
    if tag not in (None, "fb_in1k"):
        raise ValueError(
            f"the released files have no distillation token: with distilled=True use the tag "
            f"fb_in1k (timm's distilled DeiT weights), not {tag!r}"
        )
    cfg = get_pretrained_cfg(f"deit_{size}_distilled_patch16_224.fb_in1k")
    out = cfg.to_dict() if cfg is not None else {}
    out.pop("architecture", None)
    out.setdefault("hf_hub_id", f"timm/deit_{size}_distilled_patch16_224.fb_in1k")
    out["tag"] = "fb_in1k"
    return out


def _pick_release(method: str, size: str, dataset: str, patch: dict[str, Any]) -> str:
    """The pretrained tag of the released file matching the requested settings."""
    if method != "atc":
        if dataset != "im1k":
            raise ValueError(
                f"no fine-tuned {method} DeiT was released; pretrained=True loads timm's "
                "ImageNet-1k DeiT (tag fb_in1k), which needs dataset='im1k'"
            )
        return "fb_in1k"
    keep = patch.get("keep_rate")
    if keep is None:
        raise ValueError(
            "pretrained=True picks the released file by keep_rate; with r=... name a tag, "
            f"e.g. atc_{size}_patch16_224.{_release_tag(dataset, patch['linkage'], 0.7)}"
        )
    keep = as_float("keep_rate", keep)
    if keep not in KEEP_RATES or patch["linkage"] not in RELEASE_LINKAGES:
        raise ValueError(
            f"no released atc_{size} file for linkage={patch['linkage']!r}, keep_rate={keep}: "
            f"released linkages {list(RELEASE_LINKAGES)}, keep rates {list(KEEP_RATES)}. "
            f"To evaluate a released file at other settings name its tag, e.g. "
            f"timm.create_model('atc_{size}_patch16_224.{_release_tag(dataset, 'average', 0.7)}'"
            f", pretrained=True, keep_rate={keep})"
        )
    return _release_tag(dataset, patch["linkage"], keep)


def _register_all() -> None:
    for method in ("atc", "tome"):
        for size in SIZES:
            name = f"{method}_{size}_patch16_224"

            def fn(
                pretrained: bool = False, _m: str = method, _s: str = size, **kwargs: Any
            ) -> VisionTransformer:
                return _create(_m, _s, pretrained, **kwargs)

            fn.__name__ = fn.__qualname__ = name
            fn.__module__ = __name__
            fn.__doc__ = (
                f"DeiT-{size.capitalize()} with {method.upper()} token reduction "
                "(see atc_patch.pretrained.timm_models)."
            )
            globals()[name] = _register(fn)


_register_all()

__all__ = ["MODEL_NAMES", "WEIGHT_OPTIONS", "default_cfgs"]
