"""LoHa against HF peft on linear and conv sites, tiny transformers: outputs, every gradient, merge,
checkpoints both ways (`peftc.tools.parity.against_peft`). Conv layouts: tests/test_conv_mha.py."""

import peft
import pytest

from zoo import adapted_paths, check

CELLS = {
    "mlp": ("mlp", peft.LoHaConfig(r=4, alpha=8, target_modules=["lin0", "lin1"])),
    "conv2d": ("conv2d", peft.LoHaConfig(r=4, alpha=8, target_modules=["conv0", "conv1"])),
    "llama": ("llama", peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])),
    "llama-gate_proj": ("llama", peft.LoHaConfig(r=4, alpha=8, target_modules=["gate_proj"])),
    "bert": ("bert", peft.LoHaConfig(r=8, alpha=8, target_modules=["query", "intermediate.dense"])),
    "opt": ("opt", peft.LoHaConfig(r=2, alpha=4, target_modules=["k_proj", "fc2"])),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    parity = check(*CELLS[cell], tmp_path)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
