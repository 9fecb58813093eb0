"""LoKr against HF peft on linear and conv sites, tiny transformers and the real MiniLM, W1 and W2
whole or factored: outputs, every gradient, merge, checkpoints both ways
(`peftc.tools.parity.against_peft`). Conv layouts: tests/test_conv_mha.py."""

import peft
import pytest

from conftest import requires_minilm
from zoo import adapted_paths, check

CELLS = {
    "rank-alpha-pattern-layers": (
        "llama",
        peft.LoKrConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"q_proj": 16},
            layers_to_transform=[0],
        ),
    ),
    "mlp": ("mlp", peft.LoKrConfig(r=4, alpha=8, target_modules=["lin0", "lin1"])),
    "conv1d": ("conv1d", peft.LoKrConfig(r=4, alpha=8, target_modules=["conv0"])),
    "llama": ("llama", peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"])),
    "llama-v_proj": ("llama", peft.LoKrConfig(r=4, alpha=8, target_modules=["v_proj"])),
    "bert": ("bert", peft.LoKrConfig(r=16, alpha=4, target_modules=["query", "value"])),
    "opt-decomposed": (
        "opt",
        peft.LoKrConfig(
            r=2, alpha=4, target_modules=["q_proj", "fc1"], decompose_both=True, decompose_factor=4
        ),
    ),
    # W1's gradient on MiniLM's trained weights: peft's own float32 one, through kron(W1, W2), is
    # up to 2e-4 of its scale off the float64 value (peftc's 1.5e-5), so gradients get 1e-3 here
    "minilm": (
        "minilm",
        peft.LoKrConfig(r=8, alpha=8, target_modules=["intermediate.dense", "output.dense"]),
        {"grad_tol": 1e-3},
    ),
}


@pytest.mark.parametrize(
    "cell", [pytest.param(c, marks=requires_minilm) if c == "minilm" else c for c in CELLS]
)
def test_matches_peft(cell, tmp_path):
    name, config, *options = CELLS[cell]
    options = dict(*options)
    parity = check(name, config, tmp_path, **options)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.reloaded is not None
    assert (parity.merged is not None) == options.get("merge", True)
