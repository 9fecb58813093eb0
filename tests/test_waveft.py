"""WaveFT against HF peft 0.21: positions, outputs, gradients, merge and checkpoints both ways on
several wavelet families, odd and non-square layers, GPT-2's Conv1D and the tiny Llama; two
adapters switched; refusals."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.waveft
from peftc.errors import OptionError, PeftcError
from peftc.tools.parity import close, perturb

from zoo import adapted_paths, check, symbolic


class Small(torch.nn.Module):
    """Non-square linears with odd sizes, one without a bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(7, 13)
        self.down = torch.nn.Linear(13, 6, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def small():
    return Small(), (torch.randn(4, 7, generator=torch.Generator().manual_seed(3)),), {}


class Conv1DModel(torch.nn.Module):
    """GPT-2's Conv1D layers ((in, out) weights), which peft adapts with fan_in_fan_out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c_attn, self.c_proj = Conv1D(12, 5), Conv1D(5, 12)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_attn(x)))


def conv1d():
    return Conv1DModel(), (torch.randn(3, 5, generator=torch.Generator().manual_seed(2)),), {}


def waveft(*targets, **fields):
    return peft.WaveFTConfig(target_modules=list(targets), **fields)


CELLS = {
    "small-db1": (small, waveft("up", "down", n_frequency=30, n_frequency_pattern={"down": 12})),
    "small-db3": (small, waveft("up", "down", n_frequency=20, wavelet_family="db3", scaling=3.0)),
    "small-sym4": (small, waveft("up", n_frequency=25, wavelet_family="sym4", random_loc_seed=5)),
    "small-coif2": (small, waveft("up", "down", n_frequency=15, wavelet_family="coif2")),
    "small-no-idwt": (small, waveft("up", "down", n_frequency=20, use_idwt=False)),
    "small-random-init": (small, waveft("up", n_frequency=9, init_weights=False)),
    # 13 x 7 and 6 x 13 share 2 x 20 in proportion: 21.5 and 18.5 round to 22 and 18; the pattern
    # yields to that, as in peft
    "small-proportional": (
        small,
        waveft(
            "up",
            "down",
            n_frequency=20,
            proportional_parameters=True,
            n_frequency_pattern={"up": 3},
        ),
    ),
    "conv1d": (conv1d, waveft("c_attn", "c_proj", n_frequency=24, wavelet_family="db2")),
    "llama": ("llama", waveft("q_proj", "v_proj", "down_proj", n_frequency=300)),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config = CELLS[cell]
    parity = check(model, config, tmp_path)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    for path in peft_s:  # peft's positions; only the coefficients are saved
        theirs = parity.peft.base_model.model.get_submodule(path).waveft_indices["default"]
        assert torch.equal(parity.graph.get_buffer(f"{path}.waveft_indices.default"), theirs)
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(k.endswith(".waveft_spectrum") for k in keys)
    saved = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    assert saved["wavelet_family"] == config.wavelet_family
    # a proportional allocation is written out as the pattern, which peft recomputes on loading
    allocation = {"up": 22, "down": 18} if config.proportional_parameters else None
    assert saved["n_frequency_pattern"] == (allocation or config.n_frequency_pattern)
    print(
        f"waveft {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch_as_in_peft(tmp_path):
    module, (x,), _ = small()
    theirs = peft.get_peft_model(copy.deepcopy(module), waveft("up", n_frequency=20))
    theirs.add_adapter("other", waveft("up", "down", n_frequency=10, wavelet_family="db2"))
    perturb(theirs, 0.3)
    theirs.save_pretrained(tmp_path)
    gm = peftc.load_adapter(symbolic(module, (x,)), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name={name!r})")
        close(ours(x), theirs(x), f"adapter {name}")
        close(peftc.apply(ours, "merge")(x), theirs(x), f"adapter {name} merged")


def test_refusals(tmp_path):
    with pytest.raises(PeftcError, match="bias='all'"):
        check(small, waveft("up", n_frequency=8, bias="all"), tmp_path)
    gm = symbolic(*small()[:2])
    with pytest.raises(OptionError, match="wavelet_family='coif5' reconstructs .* smaller than"):
        peftc.apply(gm, "waveft(n_frequency=8, wavelet_family='coif5', targets='up')")
    with pytest.raises(OptionError, match="wavelet_family='db20' has no filters in peft's tables"):
        peftc.apply(gm, "waveft(n_frequency=8, wavelet_family='db20', targets='up')")
    with pytest.raises(OptionError, match=r"n_frequency=2592 exceeds the 13 x 7 = 91 entries"):
        peftc.apply(gm, "waveft(targets='up')")
