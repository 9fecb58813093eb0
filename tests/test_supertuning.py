"""SuperTuning against HF peft 0.21: its sparse values alone and with the LoRA, on a tiny Llama and
small linears: positions, outputs, gradients, merge, checkpoints both ways, dropout in training,
two adapters switched, refusals."""

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.supertuning
from peftc.errors import OptionError
from peftc.tools.parity import close, perturb

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


def supertuning(*targets, **fields):
    return peft.SupertuningConfig(target_modules=list(targets), **fields)


CELLS = {
    "llama": ("llama", supertuning("q_proj", "v_proj", "down_proj", sparsity=0.9), {}),
    "small-supra": (small, supertuning("up", "down", sparsity=0.5, r=2, lora_alpha=3), {}),
    "small-bottom-random-init": (
        small,
        supertuning("up", "down", sparsity=0.7, select_top=False, r=3, init_weights=False),
        {},
    ),
    "small-dropout-train": (
        small,
        supertuning("up", "down", sparsity=0.5, r=2, lora_dropout=0.3),
        {"train": True},
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, options = CELLS[cell]
    parity = check(model, config, tmp_path, **options)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    for path in peft_s:  # the positions are peft's
        theirs = parity.peft.base_model.model.get_submodule(path).supertuning_indices["default"]
        assert torch.equal(parity.graph.get_buffer(f"{path}.supertuning_indices.default"), theirs)
    print(
        f"supertuning {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_positions_recomputed_at_load(tmp_path):
    config = supertuning("up", "down", sparsity=0.6, save_precomputed_indices=False)
    with pytest.warns(UserWarning, match="save_precomputed_indices=False"):
        check(small, config, tmp_path)


def test_two_adapters_switch_as_in_peft(tmp_path):
    module, (x,), _ = small()
    theirs = peft.get_peft_model(module, supertuning("up", sparsity=0.5))
    theirs.add_adapter("other", supertuning("up", "down", sparsity=0.8, r=2))
    perturb(theirs, 0.3)
    theirs.set_adapter("other")  # peft trains the active adapter only
    perturb(theirs, 0.3).save_pretrained(tmp_path)
    gm = peftc.load_adapter(symbolic(Small(), (x,)), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name={name!r})")
        close(ours(x), theirs(x), f"adapter {name}")
        close(peftc.apply(ours, "merge")(x), theirs(x), f"adapter {name} merged")


def test_refusals():
    module, args, _ = small()
    gm = symbolic(module, args)
    with pytest.raises(OptionError, match="lora_alpha=4.0 needs r"):
        peftc.apply(gm, "supertuning(lora_alpha=4, targets='up')")
    with pytest.raises(OptionError, match="sparsity=0.99 leaves none to train"):
        peftc.apply(gm, "supertuning(targets='down')")
    with pytest.raises(OptionError, match="layers_to_transform is no field"):
        peftc.apply(gm, "supertuning(layers_to_transform=0, targets='up')")
    conv1d = torch.nn.Sequential(Conv1D(4, 6))
    with pytest.raises(OptionError, match="is a GPT-2 Conv1D"):
        peftc.apply(
            symbolic(conv1d, (torch.randn(2, 6),)), "supertuning(sparsity=0.5, targets='0')"
        )
    half = symbolic(Small().to(torch.bfloat16), (args[0].to(torch.bfloat16),))
    with pytest.raises(OptionError, match="computes in half precision"):
        peftc.apply(half, "supertuning(sparsity=0.5, targets='up')")
