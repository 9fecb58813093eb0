"""DeLoRA against HF peft 0.21: a small MLP and tiny Llama (per-site r and λ, dropout in training,
random B at init, bfloat16), merging, checkpoints both ways, two adapters, and refusals."""

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.delora
from peftc.errors import CheckpointError, OptionError
from peftc.tools.parity import close

from zoo import adapted_paths, build, check, graph


def delora(*targets, **fields):
    return peft.DeloraConfig(target_modules=list(targets), **fields)


def bfloat16_mlp():
    model, args, kwargs = build("mlp")
    return model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), kwargs


PATTERNS = {"rank_pattern": {"lin1": 2}, "lambda_pattern": {"lin0": 3.5}}
CELLS = {
    "mlp-patterns": ("mlp", delora("lin0", "lin1", "lin2", r=4, **PATTERNS)),
    "mlp-random-b": ("mlp", delora("lin0", "lin2", r=3, init_weights=False)),
    "linears-dropout": ("linears", delora("a", "b", r=4, module_dropout=0.2), {"train": True}),
    "llama": ("llama", delora("q_proj", "v_proj", "down_proj", r=4)),
    # merging rounds W + dW to bfloat16
    "mlp-bfloat16": (bfloat16_mlp, delora("lin0", "lin1", r=4), {"tol": 1e-2}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"delora {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_init_is_the_identity_and_w_norm_is_peft_s():
    model, args, _ = build("mlp")
    gm = peftc.apply(graph("mlp"), "delora(r=4, targets='lin0|lin1')")
    close(gm(*args), model(*args), "outputs at init")
    theirs = peft.get_peft_model(model, delora("lin0", r=4))
    close(
        gm.get_buffer("lin0.delora_w_norm.default"),
        theirs.base_model.model.lin0.delora_w_norm["default"],
        "w_norm",
    )


def test_two_adapters_switch_as_peft(tmp_path):
    model, args, _ = build("mlp")
    theirs = peft.get_peft_model(model, delora("lin0", "lin1", r=4))
    theirs.add_adapter("other", delora("lin1", r=2, delora_lambda=5))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "delora_B" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path)
    gm = peftc.load_adapter(graph("mlp"), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name='{name}')")
        close(ours(*args), theirs(*args), f"adapter {name}")


def symbolic(layer, width):
    return peftc.capture(torch.nn.Sequential(layer), (torch.randn(2, width),), method="symbolic")


def test_refusals(tmp_path):
    peft.get_peft_model(build("mlp")[0], delora("lin0", bias="all")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="the config sets bias='all'"):
        peftc.load_adapter(graph("mlp"), tmp_path)
    with pytest.raises(OptionError, match="is a GPT-2 Conv1D, which peft's DeLoRA does not"):
        peftc.apply(symbolic(Conv1D(6, 4), 4), "delora(targets='0')")
    with pytest.raises(OptionError, match="stores its weight as 'nf4'"):
        peftc.apply(symbolic(torch.nn.Linear(64, 64), 64), "nf4, delora(targets='0')")
    with pytest.raises(OptionError, match="r must be a positive integer"):
        peftc.apply(graph("mlp"), "delora(r=0, targets='lin0')")
