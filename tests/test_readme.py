"""README's Python snippets that use a bundled model run as pasted (from the repo root)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
RUNNABLE = [block for block in BLOCKS if "examples/models/needle-" in block]


def test_readme_has_runnable_python():
    assert RUNNABLE, "README.md should show at least one Python snippet that runs offline with a bundled model"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.splitlines()[0][:40])
def test_readme_python_runs_as_pasted(block):
    result = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2867825" in result.stdout  # the haystack's answer, from the reading and from the one-shot call
