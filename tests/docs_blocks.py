"""Find and run the Python code blocks of the Markdown guides (used by ``test_docs.py``).

A block is a fenced ```` ```python ```` block. The blocks of one page run in order in one
namespace, like a notebook, so a later block may use what an earlier one defined. A block whose
fence is directly preceded by an HTML comment ``<!-- skip: REASON -->`` (e.g. it needs a GPU or
downloaded weights) is not run, and the test reports it as skipped with that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(
    r"(?:<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*\n)?^```python[^\n]*\n(?P<code>.*?)^```\s*$",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    """One Python block: its page, 1-based line of the fence, code, and skip reason (or None)."""

    path: Path
    line: int
    code: str
    skip: str | None


def blocks(path: Path) -> list[Block]:
    """The Python blocks of the Markdown file ``path``, in page order."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code"))  # the fence's own line, 1-based
        out.append(Block(path, line, m.group("code"), m.group("reason")))
    return out


def run_page(path: Path) -> tuple[int, list[tuple[int, str]]]:
    """Run every non-skipped block of ``path`` in one namespace.

    Returns ``(blocks run, [(line, reason) of skipped blocks])``; raises ``RuntimeError`` naming
    the page and line of the first block that raises, chained to its exception.
    """
    namespace: dict = {"__name__": f"docs:{path.name}"}
    ran, skipped = 0, []
    for block in blocks(path):
        if block.skip is not None:
            skipped.append((block.line, block.skip))
            continue
        try:
            exec(compile(block.code, f"{path}:{block.line}", "exec"), namespace)
        except Exception as err:
            raise RuntimeError(f"the code block at {path}:{block.line} raised {err!r}") from err
        ran += 1
    return ran, skipped
