"""The table of the ATC paper's released checkpoints: repositories, file names, rate codes.

Every released file is ``joakimbh/<method>_<size>-<dataset>[-<linkage>]`` /
``<method>_<size>-<dataset>-<rate code>[-<linkage>].pth``::

    release_filename("atc", "small", "im1k", 0.7, "complete")  # 'atc_small-im1k-07-complete.pth'
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

HUB_OWNER = "joakimbh"

SIZES: dict[str, tuple[int, int]] = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
"""DeiT sizes: name -> (embed_dim, num_heads); all have depth 12 and 16 x 16 patches."""
DEPTH = 12
DATASETS: dict[str, int] = {"im1k": 1000, "nab": 555, "coco": 80, "nus": 81}
"""Classification datasets of the releases -> number of classes."""
DATASET_NAMES = {"im1k": "ImageNet-1K", "nab": "NABirds", "coco": "COCO 2014", "nus": "NUS-WIDE"}
REFERENCE_DATASET_NAMES = {"im1k": "imagenet", "nab": "nabirds", "coco": "coco", "nus": "nuswide"}
"""Our dataset codes -> the reference scripts' ``--dataset`` spelling."""
RELEASE_LINKAGES = ("average", "complete", "single")
KEEP_RATES = (0.25, 0.5, 0.7, 0.9)
REDUCTION_LOC = (3, 6, 9)
DETECTION_SIZES = ("tiny", "small")

_FILE_RE = re.compile(
    r"^(?P<method>atc|tome)_(?P<size>tiny|small|base)-(?P<dataset>im1k|nab|coco17|coco|nus)"
    r"-(?P<code>\d+)(?:-(?P<linkage>average|complete|single))?\.pth$"
)
_REPO_RE = re.compile(
    r"^[^/]+/(?P<method>atc|tome)_(?P<size>tiny|small|base)-(?P<dataset>im1k|nab|coco17|coco|nus)"
    r"(?:-(?P<linkage>average|complete|single))?$"
)


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


def rate_code(keep_rate: float) -> str:
    """The keep rate as written in the file names: ``0.25 -> "025"``, ``0.7 -> "07"``."""
    return f"{float(keep_rate):g}".replace(".", "")


def code_rate(code: str) -> float:
    """The inverse of :func:`rate_code`: ``"025" -> 0.25``."""
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
    (``atc_tiny-coco17-07-average.pth``, ``tome_tiny-coco17-07.pth``).
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
        "keep_rate": code_rate(m["code"]),
        "linkage": m["linkage"],
    }


def parse_repo(repo_id: str) -> dict[str, Any] | None:
    """Settings a release repository name encodes (``method``, ``size``, ``dataset``,
    ``linkage``), or ``None`` for another repository."""
    m = _REPO_RE.match(repo_id)
    return None if m is None else m.groupdict()


def check_detection_release(method: str, size: str, keep_rate: float, linkage: str | None) -> None:
    """Raise ``ValueError`` naming the valid choices unless the arguments name a released
    ViT-Adapter detector."""
    if method not in ("atc", "tome"):
        raise ValueError(f"method must be 'atc' or 'tome', got {method!r}")
    linkages = RELEASE_LINKAGES if method == "atc" else (None,)
    if size not in DETECTION_SIZES:
        raise ValueError(f"size must be one of {list(DETECTION_SIZES)}, got {size!r}")
    if linkage not in linkages:
        raise ValueError(f"linkage must be one of {list(linkages)} for {method!r}, got {linkage!r}")
    if keep_rate not in KEEP_RATES:
        raise ValueError(f"keep_rate must be one of {list(KEEP_RATES)}, got {keep_rate!r}")
