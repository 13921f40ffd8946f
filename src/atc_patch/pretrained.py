"""The ATC paper's released checkpoints (and our own exports), loaded in one call.

The authors publish their fine-tuned DeiT models on the Hugging Face hub::

    joakimbh/atc_{tiny,small,base}-{im1k,nab,coco,nus}-{average,complete,single}
        atc_<size>-<dataset>-{025,05,07,09}-<linkage>.pth

Each file is what the reference ``train_deit.py`` saves as ``best_checkpoint.pth``: a dict with
``model`` and ``model_ema`` (timm ``VisionTransformer`` state dicts), ``ema_best`` (which of the
two scored best) and ``args`` (the ``argparse.Namespace`` of the run: ``model``,
``reduction_ratio``, ``reduction_loc``, ``linkage``, ``proportional_attn``, ...), possibly with
the optimizer, scheduler and scaler states beside them.

:func:`load_pretrained` resolves a source (hub id, hub file URL or local file), reads it with
``torch.load(weights_only=True)`` allowing only :data:`SAFE_GLOBALS`, builds the timm DeiT that
matches the weights (size from the embedding width, classes from the head), loads the EMA or
the standard weights, and applies the token reduction the file was trained with::

    model = atc_patch.load_pretrained("joakimbh/atc_small-im1k-complete", keep_rate=0.7)

:func:`save_pretrained` writes a model in the same layout, so our checkpoints load the same way.
The ViT-Adapter releases are loaded through mmdet instead, see :mod:`atc_patch.mmdet.checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ._validate import CROSS_FAMILY_HINTS, as_bool, as_float, check_options

HUB_OWNER = "joakimbh"
HUB_URL = "https://huggingface.co"

# DeiT sizes: name -> (embed_dim, num_heads); all have depth 12 and 16 x 16 patches.
SIZES: dict[str, tuple[int, int]] = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
DEPTH = 12
# Classification datasets of the releases -> number of classes.
DATASETS: dict[str, int] = {"im1k": 1000, "nab": 555, "coco": 80, "nus": 81}
DATASET_NAMES = {"im1k": "ImageNet-1K", "nab": "NABirds", "coco": "COCO 2014", "nus": "NUS-WIDE"}
RELEASE_LINKAGES = ("average", "complete", "single")
KEEP_RATES = (0.25, 0.5, 0.7, 0.9)
REDUCTION_LOC = (3, 6, 9)
DETECTION_SIZES = ("tiny", "small")

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""The only non-tensor classes a checkpoint may hold (the reference saves its ``args``)."""

PATCH_OPTIONS = (
    "method",
    "linkage",
    "keep_rate",
    "reduction_loc",
    "prop_attn",
    "proportional_attn",
    "size_mode",
    "r",
    "r_schedule",
    "trace_source",
)

_FILE_RE = re.compile(
    r"^(?P<method>atc|tome)_(?P<size>tiny|small|base)-(?P<dataset>im1k|nab|coco17|coco|nus)"
    r"-(?P<code>\d+)(?:-(?P<linkage>average|complete|single))?\.pth$"
)
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_URL_RE = re.compile(
    r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[\w.-]+/[\w.-]+)/"
    r"(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+?)(?:\?.*)?$"
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a pickled object outside :data:`SAFE_GLOBALS` (it was not loaded)."""


class Release(NamedTuple):
    """One released checkpoint file.

    Attributes:
        repo_id: hub repository, e.g. ``"joakimbh/atc_small-im1k-complete"``.
        filename: file in the repository, e.g. ``"atc_small-im1k-07-complete.pth"``.
        task: ``"classification"`` (DeiT) or ``"detection"`` (ViT-Adapter Mask R-CNN).
        method: ``"atc"`` or ``"tome"``.
        size: ``"tiny"``, ``"small"`` or ``"base"``.
        dataset: ``"im1k"``, ``"nab"``, ``"coco"``, ``"nus"`` or ``"coco17"``.
        linkage: ATC linkage (``None`` for ToMe).
        keep_rate: 0.25, 0.5, 0.7 or 0.9.
    """

    repo_id: str
    filename: str
    task: str
    method: str
    size: str
    dataset: str
    linkage: str | None
    keep_rate: float


class ResolvedFile(NamedTuple):
    """A checkpoint file on disk and where it came from (``repo_id`` is ``None`` for a path)."""

    path: str
    filename: str
    repo_id: str | None = None
    revision: str | None = None


# --- names of the releases -----------------------------------------------------------------------


def rate_code(keep_rate: float) -> str:
    """The keep rate as written in the file names: ``0.25 -> "025"``, ``0.7 -> "07"``."""
    return f"{float(keep_rate):g}".replace(".", "")


def _code_rate(code: str) -> float:
    return float(f"{code[0]}.{code[1:]}")


def release_repo(method: str, size: str, dataset: str, linkage: str | None = None) -> str:
    """Hub repository of a release, e.g. ``release_repo("atc", "small", "im1k", "complete")``."""
    suffix = f"-{linkage}" if method == "atc" else ""
    return f"{HUB_OWNER}/{method}_{size}-{dataset}{suffix}"


def release_filename(
    method: str, size: str, dataset: str, keep_rate: float, linkage: str | None = None
) -> str:
    """File name of a release, e.g. ``"atc_small-im1k-07-complete.pth"``."""
    suffix = f"-{linkage}" if method == "atc" else ""
    return f"{method}_{size}-{dataset}-{rate_code(keep_rate)}{suffix}.pth"


def released_checkpoints() -> list[Release]:
    """Every released file: 144 DeiT classification files (36 repositories) and 32 ViT-Adapter
    files (8 repositories), four keep rates each.

    The ViT-Adapter file names follow the classification pattern
    (``atc_tiny-coco17-07-average.pth``, ``tome_tiny-coco17-07.pth``); :func:`resolve` falls back
    to listing the repository when a name is not found online.
    """
    out = []
    for size in SIZES:
        for dataset in DATASETS:
            for linkage in RELEASE_LINKAGES:
                repo = release_repo("atc", size, dataset, linkage)
                for k in KEEP_RATES:
                    name = release_filename("atc", size, dataset, k, linkage)
                    out.append(
                        Release(repo, name, "classification", "atc", size, dataset, linkage, k)
                    )
    for method, linkages in (("atc", RELEASE_LINKAGES), ("tome", (None,))):
        for size in DETECTION_SIZES:
            for linkage in linkages:
                repo = release_repo(method, size, "coco17", linkage)
                for k in KEEP_RATES:
                    name = release_filename(method, size, "coco17", k, linkage)
                    out.append(Release(repo, name, "detection", method, size, "coco17", linkage, k))
    return out


def parse_filename(filename: str) -> dict[str, Any] | None:
    """Settings a release file name encodes, or ``None`` for another name.

    ``"atc_small-im1k-07-complete.pth"`` ->
    ``{"method": "atc", "size": "small", "dataset": "im1k", "keep_rate": 0.7,
    "linkage": "complete"}``.
    """
    m = _FILE_RE.match(os.path.basename(filename))
    if m is None or (m["method"] == "atc") != (m["linkage"] is not None):
        return None
    return {
        "method": m["method"],
        "size": m["size"],
        "dataset": m["dataset"],
        "keep_rate": _code_rate(m["code"]),
        "linkage": m["linkage"],
    }


def _repo_settings(repo_id: str) -> dict[str, Any] | None:
    m = re.match(
        r"^[^/]+/(atc|tome)_(tiny|small|base)-(im1k|nab|coco17|coco|nus)"
        r"(?:-(average|complete|single))?$",
        repo_id,
    )
    if m is None:
        return None
    return {"method": m[1], "size": m[2], "dataset": m[3], "linkage": m[4]}


# --- finding the file ----------------------------------------------------------------------------


def resolve(
    source: str | os.PathLike,
    *,
    keep_rate: float | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> ResolvedFile:
    """Find the checkpoint ``source`` names on disk, downloading it through ``huggingface_hub``.

    Args:
        source: a local file; a hub file URL (``https://huggingface.co/<repo>/resolve/<rev>/
            <file>``); a hub id with the file (``"joakimbh/atc_small-im1k-complete/
            atc_small-im1k-07-complete.pth"``, ``"hf-hub:"`` prefix allowed); or a release
            repository alone, with ``keep_rate`` choosing the file.
        keep_rate: picks the file of a release repository (0.25, 0.5, 0.7 or 0.9).
        revision, cache_dir, token: passed to ``huggingface_hub.hf_hub_download`` (its cache,
            ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and login apply as usual).

    Raises:
        FileNotFoundError: a source that is no existing file and no hub id, a hub file that is
            not cached while the hub cannot be reached (``HF_HUB_OFFLINE=1`` or no connection),
            or a repository / file the hub does not have.
        ValueError: a URL that is not a hub file URL; a repository that is not a release, or
            without a released ``keep_rate``.
    """
    text = os.fspath(source)
    if os.path.isfile(text):
        return ResolvedFile(text, os.path.basename(text))
    url = _URL_RE.match(text)
    if url is not None:
        rev = revision or url["rev"]
        return _download(url["repo"], url["file"], rev, cache_dir, token)
    if text.startswith(("http://", "https://")):
        raise ValueError(
            f"{text!r} is not a Hugging Face hub file URL "
            "(https://huggingface.co/<owner>/<repo>/resolve/<revision>/<file>); download it and "
            "pass the local path"
        )
    hub = text.removeprefix("hf-hub:").removeprefix("hf://")
    parts = hub.split("/")
    if len(parts) >= 3 and _REPO_RE.match("/".join(parts[:2])):
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        return _download(repo_id, filename, revision, cache_dir, token)
    if _REPO_RE.match(hub) and not text.endswith((".pth", ".pt", ".bin")):
        return _download(hub, _release_file(hub, keep_rate), revision, cache_dir, token)
    raise FileNotFoundError(
        f"{text!r} is neither an existing file nor a Hugging Face hub id "
        "('<owner>/<repo>' with keep_rate=..., '<owner>/<repo>/<file>' or a hub file URL)"
    )


def _release_file(repo_id: str, keep_rate: float | None) -> str:
    info = _repo_settings(repo_id)
    if info is None:
        raise ValueError(
            f"{repo_id!r} is not one of the released repositories (see "
            "atc_patch.pretrained.released_checkpoints()); name the file: '<owner>/<repo>/<file>'"
        )
    if keep_rate is None:
        raise ValueError(
            f"{repo_id} holds one file per keep rate: pass keep_rate= one of {list(KEEP_RATES)}, "
            "or name the file ('<owner>/<repo>/<file>')"
        )
    keep_rate = as_float("keep_rate", keep_rate)
    if keep_rate not in KEEP_RATES:
        raise ValueError(
            f"{repo_id} has no file for keep_rate={keep_rate}; released keep rates: "
            f"{list(KEEP_RATES)}. To evaluate a file at another rate, name the file and pass "
            "keep_rate as an override"
        )
    return release_filename(
        info["method"], info["size"], info["dataset"], keep_rate, info["linkage"]
    )


def _hub_errors() -> tuple[type, type, type]:
    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import (  # type: ignore[no-redef]
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    return LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError


def _download(
    repo_id: str,
    filename: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
) -> ResolvedFile:
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as e:
        raise ImportError(
            "loading from the Hugging Face hub needs huggingface_hub: pip install "
            "'atc-patch[timm]' (or pass a local file)"
        ) from e
    local_missing, entry_missing, repo_missing = _hub_errors()
    try:
        path = hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token
        )
    except local_missing as e:
        offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        cache = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{repo_id}/{filename} (revision {revision or 'main'}) is not in the Hugging Face "
            f"cache ({cache}) and {why}. Download it once with network access (it is then "
            f"cached), or fetch {HUB_URL}/{repo_id}/resolve/{revision or 'main'}/{filename} "
            f"yourself and pass the local path: load_pretrained('/path/to/{filename}')"
        ) from e
    except repo_missing as e:
        raise FileNotFoundError(f"no Hugging Face hub repository {repo_id!r}: {e}") from e
    except entry_missing as e:
        raise FileNotFoundError(
            f"{repo_id} has no file {filename!r}; its checkpoint files: "
            f"{_list_checkpoints(repo_id, revision, token)}"
        ) from e
    return ResolvedFile(path, filename, repo_id, revision)


def _list_checkpoints(repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(repo_id, revision=revision, token=token)
    except Exception:  # noqa: BLE001 - only used to improve an error message
        return ["(could not list the repository)"]
    return sorted(f for f in files if f.endswith((".pth", ".pt", ".bin", ".safetensors")))


# --- reading the file ----------------------------------------------------------------------------


def allow_safe_globals() -> contextlib.AbstractContextManager:
    """Context in which ``torch.load(weights_only=True)`` also accepts :data:`SAFE_GLOBALS`.

    Raises:
        RuntimeError: torch older than 2.4 (no allow-list for weights-only loading).
    """
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        return torch.serialization.safe_globals(list(SAFE_GLOBALS))
    if hasattr(torch.serialization, "add_safe_globals"):  # torch 2.4: process-wide
        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
        return contextlib.nullcontext()
    raise RuntimeError(
        f"loading checkpoints that hold {[t.__qualname__ for t in SAFE_GLOBALS]} weights-only "
        f"needs torch >= 2.4 (this is {torch.__version__})"
    )


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with :data:`SAFE_GLOBALS` allowed.

    Raises:
        UnsafeCheckpointError: the file pickles another class or function (nothing of it is
            executed). The message names it; if you trust the file, allow-list that class with
            ``torch.serialization.add_safe_globals([...])`` and call again.
    """
    with allow_safe_globals():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = found[1] if found else "an object torch's weights-only loader refuses"
            allowed = [f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS]
            raise UnsafeCheckpointError(
                f"refused to load {os.fspath(path)}: it pickles {what}, which is not allowed. "
                f"atc_patch reads checkpoints with torch.load(weights_only=True) allowing only "
                f"tensors, plain containers and {allowed}. If you trust this file, allow the "
                f"class with torch.serialization.add_safe_globals([{what.rsplit('.', 1)[-1]}]) "
                "and load it again"
            ) from None


def select_state_dict(checkpoint: Any, ema: bool | None = None) -> tuple[dict, bool]:
    """The model weights of a checkpoint and whether they are the EMA weights.

    Args:
        checkpoint: the reference layout (``model``, ``model_ema``, ``ema_best``), a dict with
            ``state_dict`` or ``module``, or a bare state dict.
        ema: ``None`` follows ``ema_best``; ``True``/``False`` forces the EMA/standard weights.

    Raises:
        ValueError: EMA weights asked for but absent, or no state dict found.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    if ema is not None:
        ema = as_bool("ema", ema)
    if "model" in checkpoint:
        use_ema = bool(checkpoint.get("ema_best", False)) if ema is None else ema
        if use_ema:
            weights = checkpoint.get("model_ema")
            if not isinstance(weights, Mapping) or not weights:
                raise ValueError("ema=True but the checkpoint holds no EMA weights ('model_ema')")
            return dict(weights), True
        return dict(checkpoint["model"]), False
    if ema:
        raise ValueError("ema=True but the checkpoint holds no EMA weights ('model_ema')")
    wrapped = (checkpoint.get(k) for k in ("state_dict", "module"))
    weights = next((w for w in wrapped if isinstance(w, Mapping)), checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(
            "no state dict found: expected 'model' / 'model_ema' (the ATC reference layout), "
            f"'state_dict', 'module', or tensors; keys: {sorted(checkpoint)[:10]}"
        )
    return dict(weights), False


class Architecture(NamedTuple):
    """The DeiT a state dict belongs to (read from the tensors, not from names)."""

    size: str
    embed_dim: int
    num_heads: int
    num_classes: int
    img_size: int
    distilled: bool = False

    @property
    def timm_name(self) -> str:
        return f"deit_{self.size}_{'distilled_' if self.distilled else ''}patch16_224"

    @property
    def num_patches(self) -> int:
        return (self.img_size // 16) ** 2


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """Size from the patch embedding width, classes from the head, image size from the
    position embeddings, the distilled DeiT when there is a ``dist_token``.

    Raises:
        ValueError: ViT-Adapter weights (load those through mmdet), or a ViT that is not a
            DeiT-Tiny/Small/Base with 16 x 16 patches and 12 blocks.
    """
    keys = list(state_dict)
    if any(k.startswith(("backbone.", "spm.", "interactions.")) for k in keys):
        raise ValueError(
            "these are ViT-Adapter (mmdet) weights: load them with mmdet, e.g. "
            "load_from='atc://<file>' after importing atc_patch.mmdet (docs/pretrained.md)"
        )
    try:
        proj = state_dict["patch_embed.proj.weight"]
        head = state_dict["head.weight"]
        pos = state_dict["pos_embed"]
    except KeyError as e:
        raise ValueError(
            f"not a timm VisionTransformer state dict (no {e.args[0]!r}); keys: {keys[:8]}"
        ) from None
    dim = int(proj.shape[0])
    by_dim = {d: name for name, (d, _) in SIZES.items()}
    depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    if dim not in by_dim or tuple(proj.shape[2:]) != (16, 16) or depth != DEPTH:
        supported = ", ".join(f"{n} (width {d})" for n, (d, _) in SIZES.items())
        raise ValueError(
            f"weights of a ViT with width {dim}, patch {tuple(proj.shape[2:])} and {depth} "
            f"blocks; supported: DeiT {supported} with 16 x 16 patches and 12 blocks"
        )
    distilled = "dist_token" in state_dict  # DeiT distillation (train_deit.py --teacher-*)
    grid = int(round((pos.shape[1] - 1 - distilled) ** 0.5))
    size = by_dim[dim]
    return Architecture(size, dim, SIZES[size][1], int(head.shape[0]), grid * 16, distilled)


def _arg(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def checkpoint_settings(checkpoint: Any, filename: str | None = None) -> dict[str, Any]:
    """The token reduction a checkpoint was trained with, as :func:`atc_patch.apply_patch`
    options plus ``method`` (``None``: no reduction).

    Read from the saved ``args`` (``atc_patch`` settings written by :func:`save_pretrained`
    first, then the reference fields ``model``, ``reduction_ratio``, ``reduction_loc``,
    ``linkage``, ``proportional_attn``), else from a release file name. A reference
    ``reduction_ratio`` with one value is a keep rate; several values are the token counts
    kept after each location (returned as ``keep_tokens``).

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


def _merge_settings(
    file: dict[str, Any], overrides: dict[str, Any], num_patches: int, reference: bool = False
) -> dict[str, Any]:
    """File settings updated by user ``overrides`` (which win; exclusive options drop).

    ``reference``: the file was trained by the reference code (its ``args`` or a release name
    say how it reduces), so ATC without proportional attention gets the reference's forward,
    ``size_mode="reset"``, unless ``size_mode`` is given.
    """
    overrides = dict(overrides)
    if "proportional_attn" in overrides:
        if "prop_attn" in overrides:
            raise ValueError("give prop_attn or proportional_attn (the same option), not both")
        overrides["prop_attn"] = overrides.pop("proportional_attn")
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
    prop_attn = as_bool("prop_attn", out.get("prop_attn", True))
    if reference and out.get("method") == "atc" and not prop_attn:
        out.setdefault("size_mode", "reset")  # the reference DeiT forgets sizes after a block
    return out


# --- the model -----------------------------------------------------------------------------------


def eval_pretrained_cfg(dataset: str | None, num_classes: int, img_size: int = 224) -> dict:
    """timm ``pretrained_cfg`` data settings of the reference evaluation for ``dataset``.

    ImageNet and NABirds: bicubic resize of the short side to ``img_size / 0.875`` and a
    centre crop; COCO and NUS-WIDE: bicubic resize of the whole image to ``img_size`` square
    (no crop). Both normalise with the ImageNet mean/std. ``timm.data.resolve_data_config``
    and ``create_transform`` turn it into the reference transform.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    squash = dataset in ("coco", "nus")
    return {
        "num_classes": num_classes,
        "input_size": (3, img_size, img_size),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0 if squash else 0.875,
        "crop_mode": "squash" if squash else "center",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
    }


def load_pretrained(
    source: str | os.PathLike,
    *,
    ema: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    **overrides: Any,
) -> nn.Module:
    """A released (or :func:`save_pretrained`) DeiT checkpoint as a patched timm model.

    Args:
        source: local file, hub file URL, ``"<owner>/<repo>/<file>"``, or a release repository
            with ``keep_rate`` choosing its file (see :func:`resolve`).
        ema: ``None`` loads the EMA weights when the file's ``ema_best`` is set, else the
            standard ones; ``True``/``False`` forces one.
        revision: ``huggingface_hub`` download option: the hub revision (branch, tag, commit).
        cache_dir: ``huggingface_hub`` download option: the cache folder.
        token: ``huggingface_hub`` download option: the access token.
        **overrides: change the reduction the file was trained with: ``method`` (``"atc"``,
            ``"tome"``, ``"kmedoids"``, ``"dpcknn"`` or ``None`` for the unpatched DeiT),
            ``linkage``, ``keep_rate``, ``reduction_loc``, ``prop_attn`` (alias
            ``proportional_attn``), ``r``, ``r_schedule``, ``trace_source``. With a release
            repository as ``source``, ``keep_rate`` also picks the file.

    Returns:
        The timm ``VisionTransformer`` (DeiT of the file's size, head of the file's classes)
        in eval mode, patched in place. ``model.pretrained_cfg`` holds the source and the
        reference evaluation transform (see :func:`eval_pretrained_cfg`).

    Raises:
        ValueError: unknown override names or values, settings the file does not encode.
        FileNotFoundError: see :func:`resolve`.
        UnsafeCheckpointError: see :func:`load_checkpoint`.
    """
    from .patch import apply_patch

    check_options("load_pretrained", overrides, PATCH_OPTIONS, CROSS_FAMILY_HINTS["vit"])
    found = resolve(
        source,
        keep_rate=overrides.get("keep_rate"),
        revision=revision,
        cache_dir=cache_dir,
        token=token,
    )
    checkpoint = load_checkpoint(found.path)
    weights, used_ema = select_state_dict(checkpoint, ema)
    arch = infer_architecture(weights)
    try:
        file_settings = checkpoint_settings(checkpoint, found.filename)
    except ValueError:
        if "method" not in overrides:
            raise
        file_settings = {}
    settings = _merge_settings(
        file_settings,
        overrides,
        arch.num_patches,
        reference=_is_reference(checkpoint, file_settings),
    )

    model = _build_deit(arch, weights)
    method = settings.pop("method", None)
    if method is not None:
        apply_patch(model, method=method, **settings)
    dataset = _dataset_of(checkpoint, found.filename)
    cfg = dict(eval_pretrained_cfg(dataset, arch.num_classes, arch.img_size))
    cfg.update(architecture=arch.timm_name, file=found.path, ema=used_ema)
    if found.repo_id is not None:
        cfg.update(hf_hub_id=found.repo_id, hf_hub_filename=found.filename)
    model.pretrained_cfg = cfg
    return model


def _is_reference(checkpoint: Any, settings: dict[str, Any]) -> bool:
    """True when ``settings`` were read from the reference's ``args`` or a release name (not
    from the settings :func:`save_pretrained` writes)."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    return bool(settings) and not isinstance(_arg(args, "atc_patch"), Mapping)


def _build_deit(arch: Architecture, weights: dict[str, torch.Tensor]) -> nn.Module:
    """timm's DeiT for ``arch`` holding ``weights`` (float32, eval mode).

    Built on the meta device and given the loaded tensors, so no random init is spent.
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(
            arch.timm_name, pretrained=False, num_classes=arch.num_classes, img_size=arch.img_size
        )
    weights = {
        k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in weights.items()
    }
    model.load_state_dict(weights, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the state dict does not hold (cannot happen with strict=True)
        raise RuntimeError(f"no weights for {left}")
    return model.eval()


def _dataset_of(checkpoint: Any, filename: str) -> str | None:
    info = parse_filename(filename)
    if info is not None:
        return info["dataset"]
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    name = str(_arg(args, "dataset", "") or "").lower() if args is not None else ""
    return {"imagenet": "im1k", "nabirds": "nab", "coco": "coco", "nuswide": "nus"}.get(name)


# --- writing our own -----------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    """The plain module behind DDP/DataParallel, timm EMA wrappers and ``torch.compile``."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _state_dict(obj: Any, what: str) -> dict[str, torch.Tensor] | None:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return {k: v.detach().cpu() for k, v in obj.items()}
    obj = _unwrap(obj)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{what} must be a module, a timm ModelEma*, or a state dict, got {obj!r}")
    return {k: v.detach().cpu() for k, v in obj.state_dict().items()}


def _plain(value: Any) -> Any:
    """``value`` with only plain types, so ``weights_only`` loading accepts it (paths and other
    objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    model_ema: Any = None,
    ema_best: bool = False,
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    **extra: Any,
) -> Path:
    """Write ``model`` as the reference ``best_checkpoint.pth`` layout, loadable by
    :func:`load_pretrained` (and by the reference ``validate_deit.py``).

    The one checkpoint writer of atc_patch: the training recipes (``atc_patch.train``) write
    their ``checkpoint.pth`` / ``best_checkpoint.pth`` through it too, with the optimizer,
    scheduler, scaler and epoch as ``extra``.

    The file is a dict ``{"model", "model_ema", "ema_best", **extra, "args"}``: state dicts on
    the CPU, and ``args`` an ``argparse.Namespace`` of plain values (paths and other objects
    become strings, so the file loads weights-only) with the reference fields (``model``,
    ``input_size``, ``num_classes``, ``dataset``, ``reduction_ratio``, ``reduction_loc``,
    ``linkage``, ``proportional_attn``) filled from the model's patch settings, plus
    ``atc_patch`` (those settings exactly, preferred when loading). It is written to a
    temporary file first and renamed, so an interrupted save never leaves half a checkpoint.

    Args:
        model: a timm DeiT/ViT, patched or not (DDP / compiled wrappers are unwrapped); or a
            bare state dict (then ``args`` is written as given, without derived fields).
        path: the ``.pth`` file to write (parent folders are created).
        model_ema: the EMA model (a module, a timm ``ModelEmaV2``/``V3`` or a state dict).
        ema_best: the EMA weights scored best (:func:`load_pretrained` then loads them).
        args: the run's arguments (a ``Namespace`` or dict of plain values); the fields above
            are added where missing.
        dataset: ``"im1k"``, ``"nab"``, ``"coco"`` or ``"nus"`` (sets ``args.dataset`` in the
            reference spelling when ``args`` has none).
        **extra: more entries of plain values and tensors (``epoch``, ``optimizer`` state, ...).

    Returns:
        The path written.

    Raises:
        ValueError: ``dataset`` not one of the above, or ``ema_best=True`` without
            ``model_ema``.
    """
    ema_best = as_bool("ema_best", ema_best)
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    net = _unwrap(model)
    weights = _state_dict(net, "model")
    ema_weights = _state_dict(model_ema, "model_ema")
    if ema_best and ema_weights is None:
        raise ValueError("ema_best=True needs the EMA weights (model_ema=...)")

    fields = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    ns = argparse.Namespace(**{str(k): _plain(v) for k, v in fields.items()})
    if isinstance(net, nn.Module):
        _add_reference_fields(ns, net, dataset)
    checkpoint = {
        "model": weights,
        "model_ema": ema_weights,
        "ema_best": ema_best,
        **extra,
        "args": ns,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)
    return out


def _add_reference_fields(ns: argparse.Namespace, net: nn.Module, dataset: str | None) -> None:
    """Fill the reference ``args`` fields ``ns`` lacks from ``net`` and its patch settings."""
    from .patch import patch_settings

    ours = _saved_settings(patch_settings(net))
    size = next((n for n, (d, _) in SIZES.items() if d == getattr(net, "embed_dim", None)), None)
    defaults = {
        "model": f"{ours['method'] or 'deit'}_{size or 'custom'}_patch16_224",
        "input_size": int(net.patch_embed.img_size[0]) if hasattr(net, "patch_embed") else 224,
        "num_classes": int(getattr(net, "num_classes", 0)),
        "reduction_loc": list(ours.get("reduction_loc") or []),
        "reduction_ratio": [ours["keep_rate"]] if ours.get("keep_rate") is not None else [],
        "linkage": ours.get("linkage") or "average",
        "proportional_attn": bool(ours.get("prop_attn", True)),
        "atc_patch": ours,
    }
    if dataset is not None:
        names = {"im1k": "imagenet", "nab": "nabirds", "coco": "coco", "nus": "nuswide"}
        defaults["dataset"] = names[dataset]
    for key, value in defaults.items():
        if not hasattr(ns, key):
            setattr(ns, key, value)


def _saved_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """``patch_settings`` as :func:`load_pretrained` options (plain values only)."""
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


__all__ = [
    "DATASETS",
    "KEEP_RATES",
    "SAFE_GLOBALS",
    "SIZES",
    "Architecture",
    "Release",
    "ResolvedFile",
    "UnsafeCheckpointError",
    "allow_safe_globals",
    "checkpoint_settings",
    "eval_pretrained_cfg",
    "infer_architecture",
    "kept_tokens_to_r",
    "load_checkpoint",
    "load_pretrained",
    "parse_filename",
    "rate_code",
    "release_filename",
    "release_repo",
    "released_checkpoints",
    "resolve",
    "save_pretrained",
    "select_state_dict",
]
