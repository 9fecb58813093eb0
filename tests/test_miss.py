"""MiSS against HF peft 0.21: the default, random, "mini" and "bat" variants on a tiny Llama and a
small MLP with biases (padding where r does not divide in_features, dropout in training mode):
outputs, gradients, merging, checkpoints both ways; two adapters composed and switched; refusals."""

import peft
import pytest
import torch
from torch.nn import Sequential
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.miss
from peftc.errors import CheckpointError, OptionError
from peftc.tools.parity import close

from zoo import adapted_paths, build, check, graph


def miss(*targets, **fields):
    return peft.MissConfig(target_modules=list(targets), **fields)


CELLS = {
    # r=6 divides neither 64 nor 128: x is padded
    "llama": ("llama", miss("q_proj", "v_proj", "down_proj", r=6)),
    "llama-bat": ("llama", miss("k_proj", "o_proj", "down_proj", r=8, init_weights="bat")),
    "mlp-random-init": ("mlp", miss("lin0", "lin1", r=3, init_weights=False)),
    "mlp-dropout": ("mlp", miss("lin0", "lin1", "lin2", r=4, miss_dropout=0.3), {"train": True}),
    "mlp-bat": ("mlp", miss("lin0", "lin1", r=5, init_weights="bat")),
    "mlp-mini": ("mlp", miss("lin0", "lin1", r=4, mini_r=5, init_weights="mini")),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    if config.miss_dropout:
        assert parity.graph.get_submodule("lin0.miss_dropout.default").p == config.miss_dropout
    print(
        f"miss {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


PAIRS = {
    "default": (miss("lin0", "lin1", r=4), miss("lin1", r=3, miss_dropout=0.1)),
    # peft chains bat updates: the second reads the weight the first made
    "bat": (miss("lin0", "lin1", r=5, init_weights="bat"), miss("lin1", r=2, init_weights="bat")),
}


@pytest.mark.parametrize("pair", PAIRS)
def test_two_adapters_compose_and_switch_as_in_peft(pair, tmp_path):
    model, (x,), _ = build("mlp")
    theirs = peft.get_peft_model(model, PAIRS[pair][0], adapter_name="a")
    theirs.add_adapter("b", PAIRS[pair][1])
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "miss_block" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    theirs.save_pretrained(tmp_path)
    gm = graph("mlp")
    for name in ("a", "b"):  # peft saves adapters not named "default" in their own folder
        gm = peftc.load_adapter(gm, tmp_path / name, adapter=name)
    theirs.eval().base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        close(gm(x), theirs(x), "both adapters")
        for name in ("a", "b"):
            theirs.base_model.set_adapter(name)
            close(peftc.apply(gm, f"set_adapter(name='{name}')")(x), theirs(x), f"adapter {name}")
        with theirs.disable_adapter():
            close(peftc.apply(gm, "disable_adapters")(x), theirs(x), "no adapter")


def test_refusals(tmp_path):
    peft.get_peft_model(build("mlp")[0], miss("lin0", r=2, bias="MiSS_only")).save_pretrained(
        tmp_path
    )
    with pytest.raises(CheckpointError, match="the config sets bias='MiSS_only'"):
        peftc.load_adapter(graph("mlp"), tmp_path)
    refused = {
        "r=12, targets='lin0'": "has in_features=10 < r=12",
        "r=3, init_weights='bat', targets='lin0'": "which r=3 does not cut into r x r blocks",
        "r=2, mini_r=3, init_weights='mini', targets='lin0'": "not a multiple of mini_r=3",
        "init_weights='olora', targets='lin0'": "init_weights",
    }
    for text, message in refused.items():
        with pytest.raises(OptionError, match=message):
            peftc.apply(graph("mlp"), f"miss({text})")
    gpt2_style = peftc.capture(Sequential(Conv1D(6, 8)), (torch.randn(2, 8),), method="symbolic")
    with pytest.raises(OptionError, match="is a GPT-2 Conv1D, which peft's MiSS does not support"):
        peftc.apply(gpt2_style, "miss(r=2, targets='0')")
