"""SHiRA against HF peft 0.21: positions, outputs, gradients, merge and checkpoints both ways (the
indices as peft stores them), two adapters switched, refusals."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.shira
from peftc.errors import OptionError, PeftcError
from peftc.tools.parity import close

from zoo import adapted_paths, check, symbolic


class Small(torch.nn.Module):
    """Non-square linears, one without a bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(6, 14)
        self.down = torch.nn.Linear(14, 5, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def small():
    return Small(), (torch.randn(4, 6, generator=torch.Generator().manual_seed(3)),), {}


CELLS = {
    "small": (small, peft.ShiraConfig(r=2, target_modules=["up", "down"], random_seed=5)),
    "small-random-init": (small, peft.ShiraConfig(r=1, target_modules=["up"], init_weights=False)),
    "llama": ("llama", peft.ShiraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config = CELLS[cell]
    parity = check(model, config, tmp_path)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    for path in peft_s:  # the positions are peft's, and saved as peft saves them
        theirs = parity.peft.base_model.model.get_submodule(path).shira_indices["default"]
        assert torch.equal(parity.graph.get_buffer(f"{path}.shira_indices.default"), theirs)
    files = [load_file(tmp_path / side / "adapter_model.safetensors") for side in ("peft", "peftc")]
    assert {k: v.dtype for k, v in files[0].items()} == {k: v.dtype for k, v in files[1].items()}
    print(
        f"shira {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch_as_in_peft(tmp_path):
    module, (x,), _ = small()
    theirs = peft.get_peft_model(
        copy.deepcopy(module), peft.ShiraConfig(r=2, target_modules=["up"])
    )
    theirs.add_adapter("other", peft.ShiraConfig(r=1, target_modules=["up", "down"], random_seed=9))
    with torch.no_grad():  # both adapters' values away from zero (only the active one trains)
        for p in [p for n, p in theirs.named_parameters() if ".shira_weight." in n]:
            p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(tmp_path)
    gm = peftc.load_adapter(symbolic(module, (x,)), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name={name!r})")
        close(ours(x), theirs(x), f"adapter {name}")
        close(peftc.apply(ours, "merge")(x), theirs(x), f"adapter {name} merged")


def test_refusals(tmp_path):
    config = peft.ShiraConfig(r=1, target_modules=["up"], mask_type="mine")
    config.mask_fn = lambda layer, r, **kwargs: (torch.arange(14 * 6) < 20).view(14, 6).float()
    with pytest.raises(PeftcError, match="mask_type='mine': peft's custom mask_fn"):
        check(small, config, tmp_path)
    module, args, _ = small()
    with pytest.raises(OptionError, match=r"r=5 gives r \(in \+ out\) = 95 entries, more than"):
        peftc.apply(symbolic(module, args), "shira(r=5, targets='down')")
    conv1d = torch.nn.Sequential(Conv1D(4, 6))
    with pytest.raises(OptionError, match="peft does not support GPT-2's Conv1D"):
        peftc.apply(symbolic(conv1d, (torch.randn(2, 6),)), "shira(r=1, targets='0')")
