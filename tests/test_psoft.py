"""PSOFT against HF peft 0.21: a small MLP and tiny Llama (exact Cayley and Neumann series with
Q's projection, pissa_init, a free R, svd_lowrank, random init, dropout in training, bfloat16),
merging, checkpoints both ways, two adapters, and refusals."""

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.psoft
from peftc.errors import OptionError
from peftc.tools.parity import close

from zoo import adapted_paths, build, check, graph


def psoft(*targets, **fields):
    return peft.PsoftConfig(target_modules=list(targets), **fields)


def bfloat16_mlp():
    model, args, kwargs = build("mlp")
    return model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), kwargs


NEUMANN = {"use_cayley_neumann": True, "num_cayley_neumann_terms": 6, "cayley_neumann_eps": 0.1}
CELLS = {
    "mlp": ("mlp", psoft("lin0", "lin1", "lin2", r=4, psoft_alpha=8)),
    "mlp-neumann-pissa": ("mlp", psoft("lin0", "lin1", r=5, ab_svd_init="pissa_init", **NEUMANN)),
    "mlp-free-lowrank": (
        "mlp",
        psoft("lin0", "lin1", r=3, psoft_orth=False, psoft_svd="lowrank", random_seed=3),
    ),
    "mlp-no-mags-random": (
        "mlp",
        psoft("lin1", r=4, psoft_mag_a=False, psoft_mag_b=False, init_weights=False),
    ),
    "linears-dropout": ("linears", psoft("a", "b", r=4, psoft_dropout=0.2), {"train": True}),
    "llama": ("llama", psoft("q_proj", "v_proj", "down_proj", r=4)),
    # merging rounds W + dW to bfloat16
    "mlp-bfloat16": (bfloat16_mlp, psoft("lin0", "lin1", r=4), {"tol": 1e-2}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"psoft {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch_as_peft(tmp_path):
    model, args, _ = build("mlp")
    theirs = peft.get_peft_model(model, psoft("lin0", "lin1", r=4))
    theirs.add_adapter("other", psoft("lin1", r=2, psoft_orth=False))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(tmp_path)
    gm = peftc.load_adapter(graph("mlp"), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name='{name}')")
        close(ours(*args), theirs(*args), f"adapter {name}")


def symbolic(layer, width):
    return peftc.capture(torch.nn.Sequential(layer), (torch.randn(2, width),), method="symbolic")


def test_refusals():
    with pytest.raises(OptionError, match="is a GPT-2 Conv1D, which peft's PSOFT does not"):
        peftc.apply(symbolic(Conv1D(6, 4), 4), "psoft(r=2, targets='0')")
    with pytest.raises(OptionError, match="narrower than r=5"):
        peftc.apply(graph("mlp"), "psoft(r=5, targets='lin2')")
    with pytest.raises(OptionError, match="stores its weight as 'nf4'"):
        peftc.apply(symbolic(torch.nn.Linear(64, 64), 64), "nf4, psoft(r=4, targets='0')")
    with pytest.raises(OptionError, match="cayley_neumann_eps must be in"):
        peftc.apply(graph("mlp"), "psoft(use_cayley_neumann=true, cayley_neumann_eps=2.0)")
