"""Model names of the ATC scripts -> timm models patched with atc_patch.

``atc_{tiny,small,base}_patch16_224`` and ``tome_{...}_patch16_224`` are DeiT models with ATC /
ToMe; ``deit_{...}_patch16_224`` are the unreduced baselines (the reference's ``*_local``
spellings are accepted too). Any other timm model name is created as it is, and ``digits``
(``atc_digits``, ``tome_digits``) is the small ViT shipped with atc_patch
(:mod:`atc_patch.digits`, weights included).

:func:`resolve_model` is the one place that maps these names; a timm registry of the same
names can replace it without touching the scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

SIZES = ("tiny", "small", "base")
PREFIXES = {"atc": "atc", "tome": "tome", "deit": None}
METHODS = ("atc", "tome")
REFERENCE_NAMES = tuple(f"{p}_{s}_patch16_224" for p in PREFIXES for s in SIZES)
# MAE fine-tuning names (models_vit_mae in the reference) -> timm architectures.
MAE_NAMES = {
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}


@dataclass(frozen=True)
class ModelSpec:
    """What a script model name means: the timm architecture and the reduction method."""

    name: str
    timm_name: str
    method: str | None  # "atc", "tome" or None (no reduction)


def resolve_model(name: str, distilled: bool = False) -> ModelSpec:
    """Map a script model name to a :class:`ModelSpec`.

    ``distilled`` picks the DeiT variant with a distillation token (DeiT distillation).
    Raises ``ValueError`` listing the valid names for a name that is neither one of
    :data:`REFERENCE_NAMES`, ``digits``, nor a timm model.
    """
    base = name.removesuffix("_local")
    prefix, _, rest = base.partition("_")
    if base == "digits" or (prefix in PREFIXES and rest == "digits"):
        return ModelSpec(name, "digits", PREFIXES.get(prefix) if rest else None)
    if base in REFERENCE_NAMES:
        size = rest.split("_")[0]
        timm_name = f"deit_{size}_{'distilled_' if distilled else ''}patch16_224"
        return ModelSpec(name, timm_name, PREFIXES[prefix])
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
    spec: ModelSpec, *, pretrained: bool, num_classes: int, img_size: int, **kwargs: Any
) -> nn.Module:
    """Build the model of ``spec`` (not yet patched).

    ``pretrained`` loads timm's weights (downloaded by timm) or, for ``digits``, the shipped
    ones; a head of another size is re-initialised and ``pos_embed`` resampled to
    ``img_size``. ``kwargs`` go to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``,
    ``global_pool`` ...). Raises ``RuntimeError`` saying what to do when weights cannot be
    downloaded.
    """
    if spec.timm_name == "digits":
        return _digits(pretrained, num_classes, img_size, **kwargs)
    import timm

    try:
        model = timm.create_model(
            spec.timm_name,
            pretrained=pretrained,
            num_classes=num_classes,
            img_size=img_size,
            **kwargs,
        )
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for {spec.timm_name} ({type(e).__name__}: {e}); "
            "offline? pass --finetune <local checkpoint> with --no-pretrained"
        ) from e
    return model


def _digits(pretrained: bool, num_classes: int, img_size: int, **kwargs: Any) -> nn.Module:
    from atc_patch.digits import build_model, load_model

    from .checkpoint import load_finetune_weights

    shipped, info = load_model()
    config = {**info.config, "img_size": img_size, "num_classes": num_classes}
    config.update({k: v for k, v in kwargs.items() if v is not None})
    model = build_model(config)
    if pretrained:
        load_finetune_weights(model, shipped.state_dict(), verbose=False)
    return model


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
    count per location (the tokens that remain after it; needs ``num_patches``).
    Raises ``ValueError`` for a mismatch.
    """
    keep_rate, reduction_loc = list(keep_rate or ()), list(reduction_loc or ())
    if method is None:
        if keep_rate or reduction_loc:
            raise ValueError(
                "--keep_rate/--reduction_loc need a reducing model: "
                f"{[n for n in REFERENCE_NAMES if not n.startswith('deit')]}"
            )
        return None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    if not keep_rate or not reduction_loc:
        raise ValueError(f"{method} models need --reduction_loc and --keep_rate (e.g. 3 6 9 / 0.9)")
    opts: dict[str, Any] = {"prop_attn": prop_attn}
    if method == "atc":
        opts["linkage"] = linkage or "average"
    elif linkage is not None:
        raise ValueError("--linkage applies to atc_* models only")
    if len(keep_rate) == 1:
        return {**opts, "keep_rate": float(keep_rate[0]), "reduction_loc": tuple(reduction_loc)}
    if len(keep_rate) != len(reduction_loc):
        raise ValueError(
            f"--keep_rate has {len(keep_rate)} values for {len(reduction_loc)} reduction "
            "locations: give one rate or one kept-token count per location"
        )
    if num_patches is None:
        raise ValueError("per-location token counts need num_patches")
    r = [0] * (max(reduction_loc) + 1)
    kept = num_patches
    for loc, count in zip(reduction_loc, keep_rate):
        if count != int(count) or not 0 < count <= kept:
            raise ValueError(f"kept-token counts must be decreasing integers, got {keep_rate}")
        r[loc], kept = kept - int(count), int(count)
    return {**opts, "r": r}
