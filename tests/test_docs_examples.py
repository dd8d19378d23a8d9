"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh process in an empty folder.

A block that cannot run here (it needs a hub download, a GPU or data we do not ship) is marked in the
markdown by an HTML comment on the line before it, ``<!-- no-run: the reason -->``; the reason is
required and shown as the skip message, so the skipped blocks stay few and visible.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = re.compile(r"<!--\s*no-run:(.*?)-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its code and the no-run reason before it, if any."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    no_run: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the ``<!-- no-run: ... -->`` reason of the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path}:{i + 1}: code block never closed")
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_RUN.search(before)
        blocks.append(Block(path, i + 1, match.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            marker.group(1).strip() if marker else None))
        i = end + 1
    return blocks


BLOCKS = [b for path in DOCS for b in code_blocks(path)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def test_every_no_run_marker_gives_a_reason_and_sits_on_a_python_block():
    markers = sum(len(NO_RUN.findall(p.read_text(encoding="utf-8"))) for p in DOCS)
    marked = [b for b in BLOCKS if b.no_run is not None]
    assert len(marked) == markers, "a <!-- no-run: ... --> comment must be the line right before a ```python block"
    for block in marked:
        assert block.lang == "python", f"{block.name}: no-run marks a {block.lang or 'plain'} block"
        assert len(block.no_run) >= 10, f"{block.name}: no-run needs a reason ({block.no_run!r})"
    assert len(PYTHON) >= 10 and len(marked) <= 4, [b.name for b in marked]  # the skips stay the exception


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs_as_written(block, tmp_path):
    if block.no_run:
        pytest.skip(f"{block.name}: {block.no_run}")
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"{block.name} failed:\n{block.code}\n--- stderr ---\n{proc.stderr[-4000:]}"
