"""PEANuT against HF peft 0.21: a tiny Llama and a small MLP (depth 0-2, other activations, random
B at init, bfloat16): outputs, gradients, merging, checkpoints both ways; two adapters switched;
refusals."""

import json

import peft
import pytest
import torch
from torch.nn import Sequential
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.peanut
from peftc.errors import CheckpointError, OptionError
from peftc.tools.parity import close, perturb

from zoo import adapted_paths, build, check, graph


def peanut(*targets, **fields):
    return peft.PeanutConfig(target_modules=list(targets), **fields)


def bfloat16_mlp():
    model, args, kwargs = build("mlp")
    return model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), kwargs


CELLS = {
    "llama": ("llama", peanut("q_proj", "v_proj", "down_proj", r=4, depth=1)),
    "mlp-depth2-gelu": ("mlp", peanut("lin0", "lin1", "lin2", r=3, depth=2, act_fn="gelu")),
    "mlp-tanh-random-b": (
        "mlp",
        peanut("lin0", "lin2", r=5, act_fn="tanh", scaling=0.5, init_weights=False),
    ),
    "mlp-bfloat16": (bfloat16_mlp, peanut("lin0", "lin1", r=4, depth=1), {"tol": 1e-2}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"peanut {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_starts_as_the_base_model():
    model, args, _ = build("mlp")
    gm = peftc.apply(graph("mlp"), "peanut(r=4, depth=1, targets='lin0|lin1')")
    close(gm(*args), model(*args), "outputs at init")


def test_two_adapters_switch_as_peft_s(tmp_path):
    model, args, _ = build("mlp")
    theirs = peft.get_peft_model(model, peanut("lin0", "lin1", r=4, depth=1))
    theirs.add_adapter("other", peanut("lin1", r=2, act_fn="silu", scaling=2.0))
    perturb(theirs, 0.3)
    theirs.set_adapter("other")  # peft trains the active adapter only
    perturb(theirs, 0.3).eval().save_pretrained(tmp_path)
    gm = peftc.load_adapter(graph("mlp"), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    with torch.no_grad():
        for name in ("default", "other"):
            theirs.set_adapter(name)
            ours = peftc.apply(gm, f"set_adapter(name='{name}')")
            close(ours(*args), theirs(*args), f"adapter {name}")
            close(peftc.apply(ours, "merge")(*args), theirs(*args), f"{name} merged")


def test_refusals(tmp_path):
    refused = {
        "act_fn='xielu', targets='lin0'": "act_fn",
        "depth=-1, targets='lin0'": "depth",
        "r=0, targets='lin0'": "r must be a positive integer",
    }
    for text, message in refused.items():
        with pytest.raises(OptionError, match=message):
            peftc.apply(graph("mlp"), f"peanut({text})")
    conv1d = peftc.capture(Sequential(Conv1D(8, 4)), (torch.randn(2, 4),), method="symbolic")
    with pytest.raises(OptionError, match="is GPT-2's Conv1D, and peft's PEANuT"):
        peftc.apply(conv1d, "peanut(r=2, targets='0')")
    with pytest.raises(OptionError, match="is an nn.MultiheadAttention"):
        peftc.apply(graph("mha"), "peanut(r=2, targets='mha.out_proj')")
    dense = peftc.capture(Sequential(torch.nn.Linear(64, 64)), (torch.randn(2, 64),))
    with pytest.raises(OptionError, match="stores its weight as 'nf4'"):
        peftc.apply(dense, "nf4, peanut(r=2, targets='0')")
    peft.get_peft_model(build("mlp")[0], peanut("lin0", r=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peanut_dropout": 0.1}))
    with pytest.raises(CheckpointError, match="the config sets peanut_dropout=0.1"):
        peftc.load_adapter(graph("mlp"), tmp_path)
