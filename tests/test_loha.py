"""LoHa against HF peft on linear and conv sites, tiny transformers: outputs, every gradient, merge,
checkpoints both ways (`peftc.tools.parity.against_peft`). Conv layouts: tests/test_conv_mha.py."""

import peft
import pytest
import torch

import peftc
from peftc.technique.adapters import disable

from zoo import adapted_paths, build, check, graph

CELLS = {
    "rank-alpha-pattern-layers": (
        "llama",
        peft.LoHaConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"q_proj": 16},
            layers_to_transform=[0],
        ),
    ),
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


@pytest.mark.parametrize(
    "method, model, targets, module_dropout",
    [
        (peft.LoHaConfig, "mlp", ["lin0", "lin1"], 0.0),
        (peft.LoHaConfig, "mlp", ["lin0", "lin1"], 0.1),
        (peft.LoKrConfig, "mlp", ["lin0", "lin1"], 0.0),
        (peft.LoKrConfig, "mlp", ["lin0", "lin1"], 0.1),
        (peft.LoHaConfig, "conv2d", ["conv0"], 0.0),
        (peft.LoKrConfig, "conv2d", ["conv0"], 0.0),
    ],
)
def test_rank_and_module_dropout_train_as_peft(method, model, targets, module_dropout, tmp_path):
    # peft's random draws in training, one state for both sides: the same rows and steps dropped
    # (the zoo builds from seed 0, so the draws are fixed; these keep the update)
    config = method(r=4, alpha=8, target_modules=targets, rank_dropout=0.5)
    config.module_dropout = module_dropout
    if method is peft.LoKrConfig:
        config.rank_dropout_scale = True
    parity = check(model, config, tmp_path, train=True)
    assert parity.reloaded is not None


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_a_dropped_step_computes_the_base_and_trains_nothing_as_peft(method):
    # peft skips the update for the step: the base's output, and no gradient for the adapter
    _, args, _ = build("mlp")
    gm = peftc.apply(graph("mlp"), f"{method}(r=2, targets='lin0', module_dropout=0.999)")
    gm.train()
    out = gm(*args)
    torch.testing.assert_close(out, disable(peftc.apply(gm, "freeze"))(*args), rtol=0, atol=0)
    assert not out.requires_grad  # nothing trainable took part
