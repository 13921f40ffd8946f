"""Run the official ATC code (github:JoakimHaurum/ATC) from a git mirror, never from this repo.

Every script in this folder takes the path of a git directory holding the official repository
(what the ``fetch`` tool returns, e.g. ``/work/.mirror/JoakimHaurum+ATC/repo``), copies the files
it needs out of it with ``git show`` into a temporary folder, applies only the shims that are
needed to run them here (each one a named text replacement, recorded in the golden file's
``meta``), and imports them from there::

    with OfficialTree(mirror, ["ATC_setup/models/atc.py"]) as tree:
        atc = tree.load("ATC_setup/models/atc.py")

The official code is never written into this repository.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import _reference_golden as golden  # noqa: E402, F401  (our side of every case, re-exported)


@dataclass(frozen=True)
class Shim:
    """One text replacement in one official file, and why it is needed."""

    path: str
    old: str
    new: str
    why: str

    def describe(self) -> str:
        return f"{self.path}: {self.why} ({self.old.strip()!r} -> {self.new.strip()!r})"


def git_show(git_dir: str | Path, rev_path: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", "show", rev_path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def git_head(git_dir: str | Path) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


class OfficialTree:
    """A temporary folder with official files extracted from ``git_dir`` (at ``HEAD``).

    ``shims`` are applied as they are written; a shim whose ``old`` text is not found raises,
    so a changed upstream file is noticed. The folder is put first on ``sys.path`` (package
    imports such as ``SSLBackbone_setup.token_reduc`` resolve there) while the tree is open.
    """

    def __init__(self, git_dir: str | Path, paths: list[str], shims: tuple[Shim, ...] = ()) -> None:
        self.git_dir = Path(git_dir)
        self.paths = paths
        self.shims = shims
        self.commit = git_head(git_dir)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.root = Path()

    def __enter__(self) -> OfficialTree:
        self._tmp = tempfile.TemporaryDirectory(prefix="atc-official-")
        self.root = Path(self._tmp.name)
        for rel in self.paths:
            text = git_show(self.git_dir, f"HEAD:{rel}")
            for shim in self.shims:
                if shim.path == rel:
                    if shim.old not in text:
                        raise RuntimeError(f"shim no longer applies: {shim.describe()}")
                    text = text.replace(shim.old, shim.new)
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        sys.path.insert(0, str(self.root))
        return self

    def __exit__(self, *exc: object) -> None:
        sys.path.remove(str(self.root))
        top = {Path(p).parts[0] for p in self.paths}
        for name in list(sys.modules):
            if name.split(".")[0] in top or name.startswith("official_"):
                del sys.modules[name]
        assert self._tmp is not None
        self._tmp.cleanup()

    def load(self, rel: str) -> ModuleType:
        """Import one extracted file as a stand-alone module ``official_<stem>``."""
        name = "official_" + rel.replace("/", "_").removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, self.root / rel)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    def package(self, dotted: str) -> ModuleType:
        """Import an extracted package module by its dotted name (e.g. ``SSLBackbone_setup.x``)."""
        return importlib.import_module(dotted)

    def meta(self, **extra: object) -> dict:
        return {
            "reference": "github:JoakimHaurum/ATC",
            "commit": self.commit,
            "files": self.paths,
            "shims": [s.describe() for s in self.shims],
            **extra,
        }


def mirror_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "mirror",
        help="git directory of github:JoakimHaurum/ATC (the path the fetch tool returns)",
    )
    p.add_argument("--dry-run", action="store_true", help="compare only, do not write goldens")
    return p.parse_args()
