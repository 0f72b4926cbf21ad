"""The README's code runs as written, and every design reference in the repo resolves.

Each ```python block of README.md runs on its own in a fresh interpreter from the repository
root (nothing defined by an earlier block, nothing but what it imports). A block that needs
something it does not define fails here before it fails a reader. Blocks that load a model by
name (`from_pretrained`) run in tests/test_integrations_docs.py instead, with the downloads
redirected to tiny random-init models.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "DESIGN.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python fenced block."""
    blocks, start, lines = [], None, []
    for i, line in enumerate(text.splitlines(), 1):
        if start is None and line.strip() == "```python":
            start, lines = i + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines) + "\n"))
            start = None
        elif start is not None:
            lines.append(line)
    assert start is None, f"README.md: the ```python block at line {start} is never closed"
    return blocks


def needs_hub(code: str) -> bool:
    """The block downloads a model: it runs in test_integrations_docs.py."""
    return "from_pretrained(" in code


ALL_BLOCKS = python_blocks(README.read_text())
BLOCKS = [(line, code) for line, code in ALL_BLOCKS if not needs_hub(code)]


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 4 and len(ALL_BLOCKS) - len(BLOCKS) >= 6


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs(line, code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's shell
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (f"README.md block at line {line} failed:\n"
                                  f"{proc.stderr[-3000:]}")


def design_sections() -> set[str]:
    """Section numbers of docs/DESIGN.md: "## 3." gives "3", "### 3.3" gives "3.3"."""
    heads = re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.?\s", DESIGN.read_text(), re.M)
    return set(heads)


def tracked_text_files() -> list[Path]:
    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    keep = (".py", ".md", ".sh", ".cpp", ".h", ".cu", ".toml", ".txt", "")
    return [ROOT / f for f in proc.stdout.splitlines()
            if Path(f).suffix in keep and (ROOT / f).is_file()]


def test_design_references_resolve():
    """Every "DESIGN.md §x.y" in the repo names a section that docs/DESIGN.md has."""
    assert DESIGN.is_file(), "docs/DESIGN.md is missing"
    sections = design_sections()
    assert {"1", "2", "3", "3.1", "3.2", "3.3", "4", "6"} <= sections, sorted(sections)
    missing = []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for m in re.finditer(r"DESIGN\.md §(\d+(?:\.\d+)*)", text):
            if m.group(1) not in sections:
                line = text.count("\n", 0, m.start()) + 1
                missing.append(f"{path.relative_to(ROOT)}:{line}: §{m.group(1)}")
    assert not missing, "references to sections docs/DESIGN.md does not have:\n" + "\n".join(
        missing)
