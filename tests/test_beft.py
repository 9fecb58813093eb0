"""BEFT against HF peft 0.21: on a tiny Llama (no biases: merge refused, as peft refuses it), a
small MLP with biases (merged into them) and over bfloat16: outputs, gradients, merge, checkpoints
both ways; two adapters switched; refusals."""

import json

import peft
import pytest
import torch
from torch.nn import Sequential
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.beft
from peftc.errors import CheckpointError, NotMergeable, OptionError
from peftc.tools.parity import close, perturb

from zoo import adapted_paths, build, check, graph


def beft(*targets, **fields):
    return peft.BeftConfig(target_modules=list(targets) or None, **fields)


def mlp_bf16():
    model, args, kwargs = build("mlp")
    return model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), kwargs


CELLS = {
    "llama": ("llama", beft("q_proj", "v_proj", "down_proj"), {"merge": False}),
    "llama-default-targets": ("llama", beft(), {"merge": False}),
    "mlp": ("mlp", beft("lin0", "lin1", "lin2")),
    "mlp-random-init": ("mlp", beft("lin0", "lin2", init_weights=False)),
    "mlp-bf16": (mlp_bf16, beft("lin0", "lin1"), {"tol": 1e-2}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.reloaded is not None
    merged = "refused" if parity.merged is None else f"{parity.merged:.2g}"
    print(
        f"beft {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{merged}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch_as_peft_s(tmp_path):
    model, args, _ = build("linears")
    theirs = peft.get_peft_model(model, beft("a", "b"))
    theirs.add_adapter("other", beft("a"))
    perturb(theirs, 0.3)
    theirs.set_adapter("other")  # peft trains the active adapter only
    perturb(theirs, 0.3).eval().save_pretrained(tmp_path)
    gm = peftc.load_adapter(graph("linears"), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name='{name}')")
        close(ours(*args), theirs(*args), name)
        close(peftc.apply(ours, "merge")(*args), theirs(*args), f"{name} merged")


def test_refusals(tmp_path):
    llama = peftc.apply(graph("llama"), "beft(targets='*.v_proj')")
    with pytest.raises(NotMergeable, match="'model.layers.0.self_attn.v_proj' has no bias"):
        peftc.apply(llama, "merge")
    conv1d = peftc.capture(Sequential(Conv1D(8, 4)), (torch.randn(2, 4),), method="symbolic")
    with pytest.raises(OptionError, match="not GPT-2's Conv1D '0'"):
        peftc.apply(conv1d, "beft(targets='0')")
    with pytest.raises(OptionError, match="not nn.MultiheadAttention 'mha'"):
        peftc.apply(graph("mha"), "beft(targets='mha.out_proj')")
    peft.get_peft_model(build("linears")[0], beft("a")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "beft_dropout": 0.1}))
    with pytest.raises(CheckpointError, match="the config sets beft_dropout=0.1"):
        peftc.load_adapter(graph("linears"), tmp_path)
