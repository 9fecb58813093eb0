"""UniLoRA against HF peft 0.21: one trained vector indexed into every site, outputs, gradients
(the vector's included), merge, checkpoints both ways (with and without the indices), two adapters
switched, refusals."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.unilora
from peftc.errors import CheckpointError, OptionError, TargetError
from peftc.tools.parity import close

from zoo import adapted_paths, check, graph, symbolic


class Small(torch.nn.Module):
    """`late` registered before `early` but called after it: peft's index order is the modules'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.late = torch.nn.Linear(14, 5, bias=False)
        self.early = torch.nn.Linear(6, 14)

    def forward(self, x):
        return self.late(torch.tanh(self.early(x)))


def small(dtype=torch.float32):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)
    return Small().to(dtype), (x,), {}


def small_bf16():
    return small(torch.bfloat16)


def unilora(*targets, **fields):
    return peft.UniLoraConfig(target_modules=list(targets), **{"theta_d_length": 40, **fields})


LLAMA = ("q_proj", "v_proj", "down_proj")
CELLS = {
    "small": (small, unilora("early", "late", r=2, proj_seed=5)),
    "small-dropout": (small, unilora("early", "late", unilora_dropout=0.1), {"train": True}),
    "small-saved-indices": (small, unilora("late", save_indices=True, init_weights=False)),
    "llama": ("llama", unilora(*LLAMA, r=4, theta_d_length=300)),
    # theta_d float32, the scales rounded to bfloat16 first: outputs exact, gradients bf16-close
    "small-bf16": (small_bf16, unilora("early", "late"), {"tol": 1e-2, "grad_tol": 3e-2}),
    "small-bf16-no-autocast": (
        small_bf16,
        unilora("early", "late"),
        {"tol": 1e-2, "grad_tol": 3e-2, "autocast_adapter_dtype": False},
    ),
    "gpt2": ("gpt2", unilora("c_attn", "c_proj", save_indices=True)),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.output == 0  # the same ops in the same order, bf16 too
    for path in peft_s:  # the indices and scales are peft's
        theirs = parity.peft.base_model.model.get_submodule(path)
        for attr in peftc.techniques.unilora.FRAMES:
            mine = parity.graph.get_buffer(f"{path}.{attr}.default")
            assert (
                torch.equal(mine, getattr(theirs, attr)["default"])
                and mine.dtype == getattr(theirs, attr)["default"].dtype
            )
    files = [load_file(tmp_path / side / "adapter_model.safetensors") for side in ("peft", "peftc")]
    assert {k: v.dtype for k, v in files[0].items()} == {k: v.dtype for k, v in files[1].items()}
    assert ("base_model.unilora_theta_d" in files[1]) and (
        any("unilora_indices_A" in k for k in files[1]) == config.save_indices
    )
    print(
        f"unilora {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch_as_in_peft(tmp_path):
    module, (x,), _ = small()
    theirs = peft.get_peft_model(copy.deepcopy(module), unilora("early"))
    theirs.add_adapter("other", unilora("early", "late", r=2, proj_seed=9, theta_d_length=30))
    with torch.no_grad():  # both vectors away from their init (only the active one trains)
        for p in theirs.base_model.unilora_theta_d.values():
            p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(tmp_path)
    gm = peftc.load_adapter(symbolic(module, (x,)), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name={name!r})")
        close(ours(x), theirs(x), f"adapter {name}")
        close(peftc.apply(ours, "merge")(x), theirs(x), f"adapter {name} merged")
    both = peftc.apply(gm, "set_adapter(name='default'), merge, set_adapter(name='other'), merge")
    theirs.set_adapter("default")
    theirs.base_model.set_adapter(["default", "other"])
    close(both(x), theirs(x), "both merged")


def test_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="bias='unilora_only'"):
        check(small, unilora("early", bias="unilora_only"), tmp_path)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    gm = peftc.apply(peftc.capture(mha, (x, x, x)), "freeze")
    with pytest.raises(OptionError, match="peft does not adapt nn.MultiheadAttention"):
        peftc.apply(gm, "unilora(targets='out_proj')")
    with pytest.raises(TargetError, match="matches no linear site"):
        peftc.apply(graph("linears-conv"), "unilora(targets='c')")
