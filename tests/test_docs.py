"""The documentation: every Python block of the guides runs, and the site builds strictly.

The site test builds the real site with ``mkdocs build --strict`` (a warning, a broken internal
link or a missing API reference fails it) and checks the API reference and the gallery; fixture
sites show that a broken link and a raising code block do fail.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from docs_blocks import blocks, run_page

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
PUBLIC = (
    "apply_patch",
    "remove_patch",
    "patch_settings",
    "cluster_tokens",
    "MergePlan",
    "Schedule",
    "make_schedule",
    "last_source",
    "release_workspace",
    "make_visualization",
    "set_workspace_limits",
    "set_kernel_threads",
    "load_pretrained",
    "save_pretrained",
)


@pytest.mark.parametrize(
    "page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    ran, skipped = run_page(page)
    for line, reason in skipped:
        warnings.warn(f"{page.name}:{line} not run: {reason}", stacklevel=1)
    assert ran + len(skipped) == len(blocks(page))


def test_raising_block_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- skip: needs a GPU -->\n```python\n"
        "import torch; torch.zeros(1, device='cuda')\n```\n\n```python\nassert x == 2\n```\n"
    )
    assert [b.skip for b in blocks(page)] == [None, "needs a GPU", None]
    with pytest.raises(RuntimeError, match=r"page\.md:12 raised AssertionError"):
        run_page(page)


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = _build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr[-3000:]
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in PUBLIC:
        assert f'id="atc_patch.{name}"' in api or f'id="atc_patch.vis.{name}"' in api, name
    assert "_validate" not in api and "swap_class" not in api  # nothing private
    gallery = sorted(p.name for p in (site / "gallery").glob("*.png"))
    assert gallery == sorted(p.name for p in (ROOT / "docs" / "gallery").glob("*.png"))
    assert {"clusters.png", "accuracy_vs_tokens.png"} <= set(gallery)


def test_broken_link_fails_strict_build(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the guide](guide.md).\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text("site_name: fixture\nnav:\n  - Home: index.md\n")
    result = _build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "guide.md" in result.stderr
    (docs / "guide.md").write_text("# Guide\n")
    config.write_text("site_name: fixture\nnav:\n  - Home: index.md\n  - Guide: guide.md\n")
    assert _build(config, tmp_path / "site").returncode == 0
