"""ATC and ToMe DeiTs as timm models: ``import atc_patch.timm_models`` registers

* ``atc_tiny_patch16_224``, ``atc_small_patch16_224``, ``atc_base_patch16_224``
* ``tome_tiny_patch16_224``, ``tome_small_patch16_224``, ``tome_base_patch16_224``

so that ``timm.create_model`` (and every timm-based script that calls it) builds a patched
DeiT by name::

    import atc_patch.timm_models  # noqa: F401  (registers the names)
    model = timm.create_model("atc_small_patch16_224", linkage="complete", keep_rate=0.7,
                              reduction_loc=(3, 6, 9), proportional_attn=True, pretrained=True)

Model options (besides timm's ``VisionTransformer`` ones, e.g. ``num_classes``, ``img_size``,
``drop_path_rate``): ``linkage`` (ATC; default ``"average"``), ``keep_rate`` (default 0.7),
``reduction_loc`` (default ``(3, 6, 9)``), ``proportional_attn`` / ``prop_attn`` (default
``True``), or ``r`` / ``r_schedule`` instead of ``keep_rate``; ``size_mode`` (``atc_*``
without proportional attention defaults to ``"reset"``, the reference DeiT's forward, see
docs/pretrained.md); ``trace_source``;
``distilled=True`` for the DeiT with a distillation token (``VisionTransformerDistilled``, as
``deit_*_distilled_patch16_224``; its ``.fb_in1k`` weights are timm's distilled DeiT's); and
for the weights ``dataset`` (``"im1k"`` default, ``"nab"``, ``"coco"``, ``"nus"``) and ``ema``
(``None`` follows the file's ``ema_best``).

The training scripts (``examples/train_deit.py``, docs/training.md) build their ``atc_*`` /
``tome_*`` models through these names.

``pretrained=True`` goes through timm's own hub loading: each released file is a pretrained
tag, ``atc_small_patch16_224.<dataset>_<linkage>_<rate>`` (e.g. ``.im1k_complete_07``) with
``hf_hub_id`` / ``hf_hub_filename`` in its ``pretrained_cfg``. Without a tag the tag is chosen
from ``dataset``, ``linkage`` and ``keep_rate``. ``.fb_in1k`` (the default of the ``tome_``
names, which have no fine-tuned release) is timm's DeiT weights, reduced off the shelf.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg
from timm.models import register_model as _register
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from . import pretrained as _pt
from ._validate import as_bool, as_float
from .patch import apply_patch

_REDUCTION_OPTIONS = (
    "linkage",
    "keep_rate",
    "reduction_loc",
    "r",
    "r_schedule",
    "size_mode",
    "trace_source",
)


def _release_tag(dataset: str, linkage: str, keep_rate: float) -> str:
    return f"{dataset}_{linkage}_{_pt.rate_code(keep_rate)}"


def _default_cfgs() -> dict[str, Any]:
    cfgs: dict[str, Any] = {}
    for size in _pt.SIZES:
        deit = get_pretrained_cfg(f"deit_{size}_patch16_224.fb_in1k")
        fb = deit.to_dict() if deit is not None else {}
        fb.pop("architecture", None)
        fb.pop("tag", None)
        fb.setdefault("hf_hub_id", f"timm/deit_{size}_patch16_224.fb_in1k")
        default = f"atc_{size}_patch16_224.{_release_tag('im1k', 'average', 0.7)}"
        cfgs[default] = None  # placeholder: the first tag of an architecture is its default
        for release in _pt.released_checkpoints():
            if release.task != "classification" or release.size != size:
                continue
            tag = _release_tag(release.dataset, release.linkage, release.keep_rate)
            cfg = _pt.eval_pretrained_cfg(release.dataset, _pt.DATASETS[release.dataset])
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
    weights, _ = _pt.select_state_dict(state_dict, ema)
    return checkpoint_filter_fn(weights, model, adapt_layer_scale=True)


def _tag_settings(tag: str | None) -> dict[str, Any]:
    """``"nab_single_05"`` -> ``{"dataset": "nab", "linkage": "single", "keep_rate": 0.5}``."""
    if not tag or tag.count("_") != 2:
        return {}
    dataset, linkage, code = tag.split("_")
    if dataset not in _pt.DATASETS or not code.isdigit():
        return {}
    return {"dataset": dataset, "linkage": linkage, "keep_rate": float(f"{code[0]}.{code[1:]}")}


def _create(method: str, size: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    tag = pretrained_cfg if isinstance(pretrained_cfg, str) else None
    from_tag = _tag_settings(tag) if method == "atc" else {}
    dataset = kwargs.pop("dataset", from_tag.get("dataset", "im1k"))
    ema = kwargs.pop("ema", None)
    distilled = kwargs.pop("distilled", False)
    if ema is not None and not pretrained:
        raise ValueError("ema chooses between the released weights: use it with pretrained=True")
    if dataset not in _pt.DATASETS:
        raise ValueError(f"dataset must be one of {list(_pt.DATASETS)}, got {dataset!r}")

    patch: dict[str, Any] = {k: kwargs.pop(k) for k in _REDUCTION_OPTIONS if k in kwargs}
    if "proportional_attn" in kwargs:
        if "prop_attn" in kwargs:
            raise ValueError("give prop_attn or proportional_attn (the same option), not both")
        kwargs["prop_attn"] = kwargs.pop("proportional_attn")
    patch["prop_attn"] = kwargs.pop("prop_attn", True)
    if method == "atc":
        patch.setdefault("linkage", from_tag.get("linkage", "average"))
        if not as_bool("prop_attn", patch["prop_attn"]):  # the reference DeiT's forward
            patch.setdefault("size_mode", "reset")
    if "r" not in patch and "r_schedule" not in patch:
        patch.setdefault("keep_rate", from_tag.get("keep_rate", 0.7))
        patch.setdefault("reduction_loc", _pt.REDUCTION_LOC)

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

    model_args = dict(patch_size=16, embed_dim=_pt.SIZES[size][0], depth=12)
    model_args["num_heads"] = _pt.SIZES[size][1]
    # Released files pickle their argparse.Namespace: let timm's weights-only load accept it.
    with _pt.allow_safe_globals():
        model = build_model_with_cfg(
            cls,
            f"{method}_{size}_patch16_224",
            pretrained,
            pretrained_cfg=pretrained_cfg,
            pretrained_filter_fn=partial(_filter, ema=ema),
            **dict(model_args, **kwargs),
        )
    apply_patch(model, method=method, **patch)
    return model


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
    if keep not in _pt.KEEP_RATES or patch["linkage"] not in _pt.RELEASE_LINKAGES:
        raise ValueError(
            f"no released atc_{size} file for linkage={patch['linkage']!r}, keep_rate={keep}: "
            f"released linkages {list(_pt.RELEASE_LINKAGES)}, keep rates {list(_pt.KEEP_RATES)}. "
            f"To evaluate a released file at other settings name its tag, e.g. "
            f"timm.create_model('atc_{size}_patch16_224.{_release_tag(dataset, 'average', 0.7)}'"
            f", pretrained=True, keep_rate={keep})"
        )
    return _release_tag(dataset, patch["linkage"], keep)


def _register_all() -> None:
    for method in ("atc", "tome"):
        for size in _pt.SIZES:
            name = f"{method}_{size}_patch16_224"

            def fn(
                pretrained: bool = False, _m: str = method, _s: str = size, **kwargs: Any
            ) -> VisionTransformer:
                return _create(_m, _s, pretrained, **kwargs)

            fn.__name__ = fn.__qualname__ = name
            fn.__module__ = __name__
            fn.__doc__ = (
                f"DeiT-{size.capitalize()} with {method.upper()} token reduction "
                "(see atc_patch.timm_models)."
            )
            globals()[name] = _register(fn)


_register_all()

MODEL_NAMES = tuple(f"{m}_{s}_patch16_224" for m in ("atc", "tome") for s in _pt.SIZES)

__all__ = ["MODEL_NAMES", "default_cfgs"]
