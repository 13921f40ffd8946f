"""Model names of the ATC scripts -> timm models.

``atc_{tiny,small,base}_patch16_224`` and ``tome_{...}_patch16_224`` are the timm registry
entries of :mod:`atc_patch.pretrained.timm_models` (imported here): the scripts build them with
``timm.create_model(name, linkage=..., keep_rate=..., reduction_loc=...,
proportional_attn=...)``, exactly as timm's own scripts would, and a pretrained tag may be named
(``atc_small_patch16_224.im1k_complete_07`` starts from that released file; without a tag
training starts from timm's DeiT weights, ``.fb_in1k``, as the reference recipe does).
``deit_{...}_patch16_224`` are timm's unreduced DeiTs (the reference's ``*_local`` spellings
are accepted too). Any other timm model name is created as it is, and ``digits``
(``atc_digits``, ``tome_digits``) is the small ViT shipped with atc_patch
(:mod:`atc_patch.demo.digits`, weights included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from atc_patch.pretrained import kept_tokens_to_r
from atc_patch.pretrained.timm_models import MODEL_NAMES

METHODS = ("atc", "tome")
DEIT_NAMES = tuple(f"deit_{s}_patch16_224" for s in ("tiny", "small", "base"))
REFERENCE_NAMES = (*MODEL_NAMES, *DEIT_NAMES)
# MAE fine-tuning names (models_vit_mae in the reference) -> timm architectures.
MAE_NAMES = {
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}


@dataclass(frozen=True)
class ModelSpec:
    """What a script model name means.

    ``timm_name`` is what ``timm.create_model`` is called with (a registry name, possibly with
    a pretrained tag, or ``"digits"``); ``method`` the reduction (``"atc"``, ``"tome"`` or
    ``None``); ``registered``: the name is an :mod:`atc_patch.pretrained.timm_models` entry, which
    applies the reduction itself from the reduction keyword arguments.
    """

    name: str
    timm_name: str
    method: str | None
    registered: bool = False


def resolve_model(name: str, distilled: bool = False) -> ModelSpec:
    """Map a script model name to a :class:`ModelSpec`.

    ``distilled`` picks the DeiT variant with a distillation token (DeiT distillation): the
    ``deit_*_distilled_patch16_224`` timm name, or ``distilled=True`` for the registry names.
    Raises ``ValueError`` listing the valid names for a name that is neither one of
    :data:`REFERENCE_NAMES` (optionally with a ``.tag``), ``digits``, nor a timm model.
    """
    base = name.removesuffix("_local")
    prefix, _, rest = base.partition("_")
    if base == "digits" or (prefix in METHODS and rest == "digits"):
        return ModelSpec(name, "digits", prefix if rest else None)
    if base.partition(".")[0] in MODEL_NAMES:
        return ModelSpec(name, base, prefix, registered=True)
    if base in DEIT_NAMES:
        timm_name = base.replace("_patch", "_distilled_patch") if distilled else base
        return ModelSpec(name, timm_name, None)
    if base in MAE_NAMES:
        return ModelSpec(name, MAE_NAMES[base], None)
    import timm

    if base in timm.list_models():
        return ModelSpec(name, base, None)
    raise ValueError(
        f"unknown model {name!r}; valid: {list(REFERENCE_NAMES)}, 'digits', the MAE names "
        f"{list(MAE_NAMES)}, or any timm model name (timm.list_models())"
    )


def create_model(
    spec: ModelSpec,
    *,
    pretrained: bool,
    num_classes: int,
    img_size: int,
    reduction: dict[str, Any] | None = None,
    distilled: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the model of ``spec``: patched when ``spec.registered`` (with ``reduction``, the
    registry's keyword arguments), otherwise not yet patched.

    ``pretrained`` loads timm's weights (downloaded by timm; the ``.fb_in1k`` DeiT for a
    registry name without a tag) or, for ``digits``, the shipped ones; a head of another size
    is re-initialised and ``pos_embed`` resampled to ``img_size``. ``kwargs`` go to
    ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ``global_pool`` ...). Raises
    ``RuntimeError`` saying what to do when weights cannot be downloaded.
    """
    if spec.timm_name == "digits":
        return _digits(pretrained, num_classes, img_size, **kwargs)
    import timm

    name = spec.timm_name
    if spec.registered:
        kwargs.update(reduction or {})
        if distilled:
            kwargs["distilled"] = True
        if "." not in name:
            name += ".fb_in1k"  # fine-tune from DeiT, as the reference (not from a release)
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, img_size=img_size, **kwargs
        )
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for {name} ({type(e).__name__}: {e}); "
            "offline? pass --finetune <local checkpoint> with --no-pretrained"
        ) from e
    return model


def _digits(pretrained: bool, num_classes: int, img_size: int, **kwargs: Any) -> nn.Module:
    from atc_patch.demo.digits import build_model, load_model

    from .checkpoint import load_finetune_weights

    shipped, info = load_model()
    config = {**info.config, "img_size": img_size, "num_classes": num_classes}
    config.update({k: v for k, v in kwargs.items() if v is not None})
    model = build_model(config)
    if pretrained:
        load_finetune_weights(model, shipped.state_dict(), verbose=False)
    return model


def reference_r(method: str, r: int, r_schedule: str, num_blocks: int) -> int | list[int]:
    """``r`` as the ATC repository's ``--r-count`` / ``--r`` flags mean it (its MAE recipe and
    off-the-shelf patches, ``SSLBackbone_setup/token_reduc``), for ``apply_patch``.

    ToMe removes ``r_l`` tokens in block ``l`` (``r`` in every block, or ToMe's ``parse_r``
    ramp for ``r_schedule="decrease"``): ``r`` is returned as it is. The repository's ATC step
    clusters the tokens after the class token into ``T - r_l`` clusters, ``T`` counting the
    class token, so it removes ``r_l - 1`` tokens: returned as the per-block list
    ``max(r_l - 1, 0)`` (e.g. ``--r-count 16`` removes 15 tokens per block).
    """
    if method != "atc":
        return r
    from atc_patch.schedule import make_schedule

    ramp = make_schedule(r=r, r_schedule=r_schedule).per_block(num_blocks, 0)
    return [max(v - 1, 0) for v in ramp]


def reduction_options(
    method: str | None,
    keep_rate: Sequence[float] = (),
    reduction_loc: Sequence[int] = (),
    linkage: str | None = None,
    prop_attn: bool = True,
    num_patches: int | None = None,
) -> dict[str, Any] | None:
    """``apply_patch`` options for the reference flags; ``None`` when nothing is reduced.

    ``keep_rate`` (``--keep_rate`` / ``--reduction_ratio``) is one value ``k`` (after the
    ``j``-th location ``int(num_patches * k ** (j + 1))`` patch tokens remain) or one token
    count per location (the tokens that remain after it; needs ``num_patches``). ATC without
    proportional attention gets ``size_mode="reset"``, the reference DeiT's forward.
    Raises ``ValueError`` for a mismatch.
    """
    keep_rate, reduction_loc = list(keep_rate or ()), list(reduction_loc or ())
    if method is None:
        if keep_rate or reduction_loc:
            raise ValueError(
                f"--keep_rate/--reduction_loc need a reducing model: {list(MODEL_NAMES)}"
            )
        return None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    if not keep_rate or not reduction_loc:
        raise ValueError(f"{method} models need --reduction_loc and --keep_rate (e.g. 3 6 9 / 0.9)")
    opts: dict[str, Any] = {"prop_attn": prop_attn}
    if method == "atc":
        opts["linkage"] = linkage or "average"
        if not prop_attn:  # the reference DeiT forgets token sizes after every block
            opts["size_mode"] = "reset"
    elif linkage is not None:
        raise ValueError("--linkage applies to atc_* models only")
    if len(keep_rate) == 1:
        return {**opts, "keep_rate": float(keep_rate[0]), "reduction_loc": tuple(reduction_loc)}
    if num_patches is None:
        raise ValueError("per-location token counts need num_patches")
    return {**opts, "r": kept_tokens_to_r(reduction_loc, keep_rate, num_patches)}
