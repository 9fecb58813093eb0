"""RoAd against HF peft 0.21: its three variants on a tiny Llama and small linears, outputs,
gradients, merge, checkpoints both ways, and refusals."""

import json

import peft
import pytest
import torch
from torch.nn import Sequential
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.road
from peftc.errors import CheckpointError, OptionError
from peftc.tools.parity import close, perturb

from zoo import adapted_paths, build, check, graph


class Small(torch.nn.Module):
    """A biased and an unbiased linear, so that merging rotates a bias too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 16)
        self.out = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def small():
    return Small(), (torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(3)),), {}


def road(*targets, **fields):
    return peft.RoadConfig(target_modules=list(targets), **fields)


FAR = {"scale": 0.3}  # rotations far from the identity
CELLS = {
    "llama": ("llama", road("q_proj", "v_proj", "down_proj", group_size=16), FAR),
    "small-road_2": (small, road("lin", "out", variant="road_2", group_size=8), FAR),
    "small-road_4": (small, road("lin", "out", variant="road_4", group_size=8), FAR),
    "small-random-init": (small, road("lin", "out", group_size=4, init_weights=False)),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"road {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_starts_at_the_identity():
    model, args, _ = small()
    gm = peftc.apply(
        peftc.capture(model, args, method="symbolic"), "freeze, road(group_size=8, targets='*')"
    )
    torch.testing.assert_close(gm(*args), model(*args), atol=1e-6, rtol=0)


def test_two_adapters_switch_as_peft_s(tmp_path):
    model, args, _ = build("linears")
    theirs = peft.get_peft_model(model, road("a", "b", group_size=4))
    theirs.add_adapter("other", road("a", variant="road_2", group_size=8))
    perturb(theirs, 0.3)
    theirs.set_adapter("other")  # peft trains the active adapter only
    perturb(theirs, 0.3).eval().save_pretrained(tmp_path)
    with theirs.disable_adapter():
        base = theirs(*args)
    gm = peftc.load_adapter(graph("linears"), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name='{name}')")
        assert not torch.allclose(ours(*args), base)
        close(ours(*args), theirs(*args), name)
        close(peftc.apply(ours, "merge")(*args), theirs(*args), f"{name} merged")


def test_refusals(tmp_path):
    with pytest.raises(OptionError, match="variant"):
        peftc.apply(graph("linears"), "road(variant='road_3', targets='a')")
    with pytest.raises(OptionError, match="group_size"):
        peftc.apply(graph("linears"), "road(group_size=3, targets='a')")
    with pytest.raises(OptionError, match="not a multiple of group_size=64"):
        peftc.apply(graph("linears"), "road(targets='a')")
    conv1d = peftc.capture(Sequential(Conv1D(8, 4)), (torch.randn(2, 4),), method="symbolic")
    with pytest.raises(OptionError, match="not GPT-2's Conv1D '0'"):
        peftc.apply(conv1d, "road(group_size=8, targets='0')")
    with pytest.raises(OptionError, match="not nn.MultiheadAttention 'mha'"):
        peftc.apply(graph("mha"), "road(group_size=8, targets='mha.out_proj')")
    peft.get_peft_model(build("linears")[0], road("a", group_size=8)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "road_dropout": 0.1}))
    with pytest.raises(CheckpointError, match="the config sets road_dropout=0.1"):
        peftc.load_adapter(graph("linears"), tmp_path)
