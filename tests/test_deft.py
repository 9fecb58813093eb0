"""DeFT against HF peft 0.21: tiny Llama and small custom modules (relu and qr projectors, alpha,
PaRa, random R, dropout in training, GPT-2's Conv1D, bfloat16); outputs, gradients, merge,
checkpoints both ways; two adapters switched; refusals."""

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.deft  # registers the technique
from peftc.errors import CheckpointError, OptionError
from peftc.tools.parity import close

from zoo import MLP, adapted_paths, build, check, graph


def deft(*targets, **fields):
    return peft.DeftConfig(target_modules=list(targets), **fields)


class Conv1DModel(torch.nn.Module):
    """GPT-2's Conv1D (weight stored as (in, out)) on a 3-d input, beside a linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.out = Conv1D(12, 8), torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def conv1d():
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    return Conv1DModel().eval(), (x,), {}


def bf16_mlp():
    model, args, kwargs = build("mlp")
    return model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), kwargs


CELLS = {
    "llama": ("llama", deft("q_proj", "v_proj", "down_proj", r=4)),
    "llama-qr-alpha": ("llama", deft("k_proj", "up_proj", r=4, alpha=8, decomposition_method="qr")),
    "mlp-para-capped-r": ("mlp", deft("lin1", "lin2", r=6, para=True)),
    "mlp-random-r-dropout": (
        "mlp",
        deft("lin0", "lin1", r=3, init_weights=False, init_scale=0.5, deft_dropout=0.3),
        {"train": True},
    ),
    "conv1d": (conv1d, deft("proj", "out", r=2, fan_in_fan_out=True)),
    # merging rounds W + dW to bfloat16
    "mlp-bfloat16": (bf16_mlp, deft("lin0", "lin1", r=4, alpha=4), {"tol": 1e-2, "grad_tol": 3e-2}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"deft {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_init_is_the_identity_and_two_adapters_as_peft(tmp_path):
    model, args, _ = build("mlp")
    close(peftc.apply(graph("mlp"), "deft(r=4, targets='lin0|lin1')")(*args), model(*args), "init")
    theirs = peft.get_peft_model(model, deft("lin0", "lin1", r=4, init_weights=False))
    theirs.add_adapter("other", deft("lin1", r=2, decomposition_method="qr", init_weights=False))
    theirs.save_pretrained(tmp_path)
    gm = peftc.load_adapter(graph("mlp"), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    theirs.base_model.set_adapter(["default", "other"])  # both on lin1, each from the base output
    close(gm(*args), theirs(*args), "both adapters")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name='{name}')")
        close(ours(*args), theirs(*args), f"adapter {name}")


def test_refusals(tmp_path):
    peft.get_peft_model(MLP(), deft("lin1", r=2, bias="deft_only")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="bias='deft_only'"):
        peftc.load_adapter(graph("mlp"), tmp_path)
    with pytest.raises(OptionError, match="decomposition_method"):
        peftc.apply(graph("mlp"), "deft(decomposition_method='svd', targets='lin0')")
    half = peftc.capture(MLP().to(torch.bfloat16), (torch.randn(2, 10, dtype=torch.bfloat16),))
    with pytest.raises(OptionError, match="autocast_adapter_dtype=false"):
        peftc.apply(half, "deft(r=2, targets='lin0', autocast_adapter_dtype=False)")
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    captured = peftc.capture(mha, (x, x, x), {"need_weights": False})
    with pytest.raises(OptionError, match="does not support nn.MultiheadAttention"):
        peftc.apply(captured, "deft(r=2, targets='out_proj')")
