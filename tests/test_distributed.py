"""examples/ddp_lora.py under torch.distributed.run (2 processes, gloo, CPU): DDP and FSDP2 end with
the same LoRA weights on both ranks, equal to one process training on the combined batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "ddp_lora.py"),
            "--mode",
            "single",
            "--steps",
            "3",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    return load_file(out / "single.rank0.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, mode):
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch>=2.6")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "ddp_lora.py"),
        "--mode",
        mode,
        "--steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"{mode}.rank{r}.safetensors") for r in range(2)]
    assert sorted(ranks[0]) == sorted(single) and len(single) == 8  # A and B at q/v of 2 layers
    # it trained
    assert max(t.abs().max().item() for n, t in single.items() if "lora_B" in n) > 1e-4
    for state in ranks:
        for name, expected in single.items():
            torch.testing.assert_close(state[name], expected, atol=1e-6, rtol=1e-5)
