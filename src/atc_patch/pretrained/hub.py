"""Finding a checkpoint on disk: a local path, a Hugging Face hub file (downloaded through
``huggingface_hub``, with its cache, ``HF_HUB_OFFLINE`` and token), or any web URL when the
caller allows it (downloaded once into torch's hub cache, as ``torch.hub`` does).

Only finds files; reading them is :func:`atc_patch.pretrained.load_checkpoint`::

    found = resolve("joakimbh/atc_small-im1k-complete", keep_rate=0.7)
    found.path  # the cached file
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple
from urllib.parse import urlparse

from .._validate import as_float
from .releases import KEEP_RATES, parse_repo, release_filename

HUB_URL = "https://huggingface.co"

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILE_URL_RE = re.compile(
    r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[\w.-]+/[\w.-]+)/"
    r"(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+?)(?:\?.*)?$"
)


class ResolvedFile(NamedTuple):
    """A checkpoint file on disk and where it came from (``repo_id`` is ``None`` for a path
    or a web URL)."""

    path: str
    filename: str
    repo_id: str | None = None
    revision: str | None = None


def resolve(
    source: str | os.PathLike,
    *,
    keep_rate: float | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    any_url: bool = False,
) -> ResolvedFile:
    """Find the checkpoint ``source`` names on disk, downloading it if needed.

    Args:
        source: a local file; a hub file URL (``https://huggingface.co/<repo>/resolve/<rev>/
            <file>``); a hub id with the file (``"joakimbh/atc_small-im1k-complete/
            atc_small-im1k-07-complete.pth"``, ``"hf-hub:"`` prefix allowed); a release
            repository alone, with ``keep_rate`` choosing the file; with ``any_url``, any
            ``http(s)://`` URL.
        keep_rate: picks the file of a release repository (0.25, 0.5, 0.7 or 0.9).
        revision: ``huggingface_hub`` download option: the hub revision.
        cache_dir: ``huggingface_hub`` download option: the cache folder.
        token: ``huggingface_hub`` download option: the access token.
        any_url: accept web URLs that are not hub files (``--teacher-path https://...`` of the
            training scripts); the file goes to ``<torch.hub.get_dir()>/checkpoints/`` and is
            reused from there.

    Raises:
        FileNotFoundError: a source that is no existing file and no hub id, a hub file that is
            not cached while the hub cannot be reached (``HF_HUB_OFFLINE=1`` or no connection),
            or a repository / file the hub does not have.
        ValueError: a URL that is not a hub file URL (without ``any_url``); a repository that
            is not a release, or without a released ``keep_rate``.
    """
    text = os.fspath(source)
    if os.path.isfile(text):
        return ResolvedFile(text, os.path.basename(text))
    url = _HUB_FILE_URL_RE.match(text)
    if url is not None:
        rev = revision or url["rev"]
        return download(url["repo"], url["file"], rev, cache_dir, token)
    if text.startswith(("http://", "https://")):
        if any_url:
            return download_url(text)
        raise ValueError(
            f"{text!r} is not a Hugging Face hub file URL "
            "(https://huggingface.co/<owner>/<repo>/resolve/<revision>/<file>); download it and "
            "pass the local path"
        )
    hub = text.removeprefix("hf-hub:").removeprefix("hf://")
    parts = hub.split("/")
    if len(parts) >= 3 and _REPO_ID_RE.match("/".join(parts[:2])):
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        return download(repo_id, filename, revision, cache_dir, token)
    if _REPO_ID_RE.match(hub) and not text.endswith((".pth", ".pt", ".bin", ".safetensors")):
        return download(hub, _release_file(hub, keep_rate), revision, cache_dir, token)
    raise FileNotFoundError(
        f"{text!r} is neither an existing file nor a Hugging Face hub id "
        "('<owner>/<repo>' with keep_rate=..., '<owner>/<repo>/<file>' or a hub file URL)"
    )


def _release_file(repo_id: str, keep_rate: float | None) -> str:
    info = parse_repo(repo_id)
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


def download(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> ResolvedFile:
    """``huggingface_hub.hf_hub_download`` with errors that say what to do.

    Raises:
        ImportError: huggingface_hub is not installed.
        FileNotFoundError: not cached while offline, or no such repository / file.
    """
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


def download_url(url: str) -> ResolvedFile:
    """The file of a web ``url`` in ``<torch.hub.get_dir()>/checkpoints/`` (downloaded with
    ``torch.hub.download_url_to_file`` unless already there, where ``torch.hub`` puts it).

    Raises:
        FileNotFoundError: the URL names no file, or the download failed.
    """
    import torch.hub

    filename = os.path.basename(urlparse(url).path)
    if not filename:
        raise FileNotFoundError(f"{url!r} names no file")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, progress=True)
        except OSError as e:  # URLError, HTTPError and socket errors are OSErrors
            raise FileNotFoundError(
                f"could not download {url}: {e}. Download it yourself and pass the local path"
            ) from e
    return ResolvedFile(path, filename)
