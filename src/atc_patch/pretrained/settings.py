"""How a checkpoint reduces tokens, read from what it carries: the ``atc_patch`` settings that
:func:`atc_patch.save_pretrained` writes, the reference ``args`` (``model``,
``reduction_ratio``, ``reduction_loc``, ``linkage``, ``proportional_attn``), or a release file
name. The result is :func:`atc_patch.apply_patch` options plus ``method``::

    checkpoint_settings({}, "atc_small-im1k-07-complete.pth")
    # {'method': 'atc', 'keep_rate': 0.7, 'reduction_loc': (3, 6, 9), 'prop_attn': True,
    #  'linkage': 'complete'}

:func:`resolve_aliases` is the one place the option spellings of the reference scripts
(``proportional_attn``) become ``apply_patch``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .releases import DEPTH, REDUCTION_LOC, parse_filename

REDUCTION_OPTIONS = (
    "linkage",
    "keep_rate",
    "reduction_loc",
    "prop_attn",
    "r",
    "r_schedule",
    "size_mode",
    "trace_source",
)
"""The ViT ``apply_patch`` options a checkpoint's model takes (besides ``method``)."""

ALIASES: dict[str, str] = {"proportional_attn": "prop_attn"}
"""Reference spellings of :data:`REDUCTION_OPTIONS` -> the ``apply_patch`` name."""

PATCH_OPTIONS = ("method", *REDUCTION_OPTIONS, *ALIASES)
"""The overrides :func:`atc_patch.load_pretrained` accepts."""


def resolve_aliases(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with every name of :data:`ALIASES` renamed to its ``apply_patch`` name.

    Raises:
        ValueError: an option given under both names.
    """
    out = dict(options)
    for alias, name in ALIASES.items():
        if alias in out:
            if name in out:
                raise ValueError(f"give {name} or {alias} (the same option), not both")
            out[name] = out.pop(alias)
    return out


def _arg(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def checkpoint_settings(checkpoint: Any, filename: str | None = None) -> dict[str, Any]:
    """The token reduction a checkpoint was trained with, as :func:`atc_patch.apply_patch`
    options plus ``method`` (``None``: no reduction).

    Read from the saved ``args`` (``atc_patch`` settings written by
    :func:`atc_patch.save_pretrained` first, then the reference fields ``model``,
    ``reduction_ratio``, ``reduction_loc``, ``linkage``, ``proportional_attn``), else from a
    release file name. A reference ``reduction_ratio`` with one value is a keep rate; several
    values are the token counts kept after each location (returned as ``keep_tokens``).

    Raises:
        ValueError: neither ``args`` nor a release file name says how the model reduces.
    """
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    if args is not None:
        ours = _arg(args, "atc_patch")
        if isinstance(ours, Mapping):
            return dict(ours)
        model_name = str(_arg(args, "model", ""))
        method = model_name.split("_", 1)[0].lower()
        if method in ("atc", "tome"):
            return _reference_settings(args, method)
        if model_name.startswith("deit"):
            return {"method": None}
    info = parse_filename(filename or "")
    if info is not None and info["dataset"] != "coco17":
        out = {"method": info["method"], "keep_rate": info["keep_rate"]}
        out["reduction_loc"] = REDUCTION_LOC
        out["prop_attn"] = True
        if info["method"] == "atc":
            out["linkage"] = info["linkage"]
        return out
    raise ValueError(
        f"cannot tell how {filename or 'this checkpoint'} reduces tokens: it has no reference "
        "'args' and is not named like a release (atc_<size>-<dataset>-<rate>-<linkage>.pth); "
        "pass method=..., keep_rate=..., reduction_loc=... (or method=None for no reduction)"
    )


def _reference_settings(args: Any, method: str) -> dict[str, Any]:
    ratio = list(_arg(args, "reduction_ratio", None) or [])
    loc = tuple(int(v) for v in (_arg(args, "reduction_loc", None) or []))
    out: dict[str, Any] = {"method": method}
    if method == "atc":
        out["linkage"] = _arg(args, "linkage", "average")
        out["prop_attn"] = bool(_arg(args, "proportional_attn", False))
    else:
        out["prop_attn"] = True  # the reference ToMe DeiT always uses it
    if not ratio or not loc:
        out["r"] = 0
    elif len(ratio) == 1:
        out.update(keep_rate=float(ratio[0]), reduction_loc=loc)
    else:
        out.update(keep_tokens=tuple(int(v) for v in ratio), reduction_loc=loc)
    return out


def dataset_of(checkpoint: Any, filename: str) -> str | None:
    """The release dataset code (``"im1k"``, ...) of a checkpoint, from its file name or its
    ``args.dataset``; ``None`` when neither says."""
    info = parse_filename(filename)
    if info is not None:
        return info["dataset"]
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    name = str(_arg(args, "dataset", "") or "").lower() if args is not None else ""
    return {"imagenet": "im1k", "nabirds": "nab", "coco": "coco", "nuswide": "nus"}.get(name)


def kept_tokens_to_r(
    reduction_loc: Sequence[int],
    kept: Sequence[float],
    num_patches: int,
    num_blocks: int | None = None,
) -> list[int]:
    """Per-block ``r`` for the reference's ``--reduction_ratio`` given as token counts.

    ``kept[j]`` patch tokens remain after block ``reduction_loc[j]`` (``num_patches`` enter the
    first block). Returns ``num_blocks`` values (default ``max(reduction_loc) + 1``): e.g.
    ``kept_tokens_to_r([1, 3], [150, 100], 196) == [0, 46, 0, 50]``. Used for the released
    files' ``args`` and for the training scripts' ``--keep_rate`` alike.

    Raises:
        ValueError: counts and locations of different lengths, or counts that are not
            decreasing integers in ``(0, num_patches]``.
    """
    kept, reduction_loc = list(kept), [int(v) for v in reduction_loc]
    if len(kept) != len(reduction_loc):
        raise ValueError(
            f"{len(kept)} kept-token counts for {len(reduction_loc)} reduction locations: give "
            "one keep rate or one kept-token count per location"
        )
    r = [0] * (num_blocks if num_blocks is not None else max(reduction_loc, default=-1) + 1)
    left = num_patches
    for loc, count in zip(reduction_loc, kept):
        if count != int(count) or not 0 < count <= left:
            raise ValueError(f"kept-token counts must be decreasing integers, got {kept}")
        r[loc], left = left - int(count), int(count)
    return r


def merge_settings(
    file: Mapping[str, Any],
    overrides: Mapping[str, Any],
    num_patches: int,
    reference: bool = False,
) -> dict[str, Any]:
    """File settings updated by user ``overrides`` (aliases resolved; overrides win; options
    that exclude each other drop: ``r`` replaces ``keep_rate``/``reduction_loc`` and back).

    ``reference``: the file was trained by the reference code (its ``args`` or a release name
    say how it reduces), so ATC without proportional attention gets the reference's forward,
    ``size_mode="reset"``, unless ``size_mode`` is given.
    """
    overrides = resolve_aliases(overrides)
    out = dict(file)
    if "keep_tokens" in out:  # reference token counts -> tokens removed per block
        loc, kept = out.pop("reduction_loc"), out.pop("keep_tokens")
        out["r"] = kept_tokens_to_r(loc, kept, num_patches, num_blocks=DEPTH)
    if {"r", "r_schedule"} & set(overrides):
        out.pop("keep_rate", None)
        out.pop("reduction_loc", None)
    if {"keep_rate", "reduction_loc"} & set(overrides):
        out.pop("r", None)
        out.pop("r_schedule", None)
        if "reduction_loc" not in overrides and "reduction_loc" not in out:
            out["reduction_loc"] = REDUCTION_LOC
    if "method" in overrides and overrides["method"] != "atc" and "linkage" not in overrides:
        out.pop("linkage", None)
    out.update(overrides)
    if reference and out.get("method") == "atc" and out.get("prop_attn", True) is False:
        out.setdefault("size_mode", "reset")  # the reference DeiT forgets sizes after a block
    return out


def is_reference(checkpoint: Any, settings: Mapping[str, Any]) -> bool:
    """True when ``settings`` were read from the reference's ``args`` or a release name (not
    from the settings :func:`atc_patch.save_pretrained` writes)."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    return bool(settings) and not isinstance(_arg(args, "atc_patch"), Mapping)


def saved_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``atc_patch.patch_settings(model)`` as the plain options :func:`checkpoint_settings`
    returns (what :func:`atc_patch.save_pretrained` writes as ``args.atc_patch``)."""
    if settings is None:
        return {"method": None}
    out: dict[str, Any] = {"method": settings["method"]}
    if settings.get("keep_rate") is not None:
        out["keep_rate"] = float(settings["keep_rate"])
        out["reduction_loc"] = list(settings.get("reduction_loc") or ())
    else:
        out["r"] = settings.get("r") or 0
        if settings.get("r_schedule", "constant") != "constant":
            out["r_schedule"] = settings["r_schedule"]
    if settings.get("linkage") is not None:
        out["linkage"] = settings["linkage"]
    out["prop_attn"] = bool(settings.get("prop_attn", True))
    if settings.get("size_mode", "keep") != "keep":
        out["size_mode"] = settings["size_mode"]
    return out
