"""The package's shape: the top holds the public API and a few library modules; the extras are
subpackages whose imports never run back up (read from the source, nothing is imported)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "atc_patch"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` of every ``import`` in ``path``."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    if package[-1] == "__init__":
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_package_top_holds_the_api_and_subpackages() -> None:
    modules = {p.name for p in PKG.glob("*.py")}
    assert modules == {"__init__.py", "__main__.py", "_validate.py", "schedule.py", "vis.py"}
    assert not (PKG / "data").exists()


def test_pretrained_imports_no_extra_and_mmdet_uses_its_public_pieces() -> None:
    for path in (PKG / "pretrained").glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(
                ("atc_patch.mmdet", "atc_patch.train", "atc_patch.demo", "atc_patch.testing")
            ), (path.name, module)
    for module, names in _imports(PKG / "mmdet" / "checkpoint.py"):
        if module.startswith("atc_patch.pretrained"):
            assert module == "atc_patch.pretrained", module
            assert not [n for n in names if n.startswith("_")], names


def test_testing_builders_import_only_themselves() -> None:
    for path in (PKG / "testing").glob("*.py"):
        own = [m for m, _ in _imports(path) if m.startswith("atc_patch")]
        assert all(m.startswith("atc_patch.testing") for m in own), (path.name, own)


def test_fid_needs_none_of_the_train_extra() -> None:
    """atc_patch.train.fid is numpy arithmetic: it imports with timm, PIL, torchvision and
    pycocotools unavailable (atc_patch.train loads its other modules on first use)."""
    code = (
        "import sys\n"
        "for m in ('timm', 'PIL', 'torchvision', 'pycocotools'): sys.modules[m] = None\n"
        "from atc_patch.train.fid import fid_from_features\n"
        "import atc_patch.train\n"
        "assert 'atc_patch.train.datasets' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
