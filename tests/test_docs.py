"""The Python snippets of the README and docs, run as written: each file's fenced `python` blocks in
order, in a fresh process and an empty folder, as a new user would paste them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    "README.md",
    "docs/quickstart.md",
    "docs/serving.md",
    "docs/triton.md",
    "docs/writing-a-pass.md",
    "docs/writing-a-technique.md",
    "docs/distributed.md",
    "docs/trainer.md",
]


def snippets(path: Path) -> str:
    return "\n".join(re.findall(r"^```python\n(.*?)^```$", path.read_text(), flags=re.S | re.M))


def test_every_document_with_python_is_run():
    having = {
        str(p.relative_to(ROOT))
        for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")]
        if snippets(p)
    }
    assert having == set(DOCUMENTS)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_snippets_run_as_written(document, tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # docs/triton.md on the CPU
    done = subprocess.run(
        [sys.executable, "-c", snippets(ROOT / document)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
