"""The README's Python examples run as written, and run the fused kernels."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _first_line(block: str) -> str:
    return next(line for line in block.splitlines() if line.strip() and not line.startswith("import"))


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[_first_line(b)[:40] for b in BLOCKS])
def test_readme_example_runs(block):
    if "import transformers" in block:
        pytest.importorskip("transformers")
        os.environ["HF_HUB_OFFLINE"] = "1"
    if "init_process_group" in block:
        # A process group is process-wide state: run the example in a process of its own.
        subprocess.run([sys.executable, "-c", block], check=True, timeout=300,
                       cwd=README.parent, env={**os.environ, "PYTHONPATH": str(README.parent)})
        return
    # The profiler sees the ops called from compiled graphs too (a dispatch mode would not
    # let torch.compile run).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    fused = {e.name for e in prof.events() if e.name.startswith("fused_norm::")}
    assert fused, "the example never called a fused_norm op"
