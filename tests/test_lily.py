"""LiLy against HF peft 0.21: shared A's and B's grouped by target name or regex, outputs,
gradients, checkpoints both ways (peft rebuilding the same sharing), bfloat16, switching,
refusals."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.lily
from peftc.errors import CheckpointError, OptionError
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft

from conftest import fill_trainable
from zoo import adapted_paths, build, check, symbolic


class Stack(nn.Module):
    """Three blocks of two 8 x 8 linears `a` and `b`: one shape, so a regex makes one group."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        pairs = ({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)} for _ in range(3))
        self.layers = nn.ModuleList(nn.ModuleDict(p) for p in pairs)

    def forward(self, x):
        for layer in self.layers:
            x = layer["b"](torch.tanh(layer["a"](x)))
        return x


def stack():
    return Stack(), (torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)),), {}


def lily(targets, **fields):
    return peft.LilyConfig(target_modules=targets, **{"r": 4, **fields})


CELLS = {
    "llama": ("llama", lily(["q_proj", "v_proj", "down_proj"], stride_A=2, num_B=3)),
    "stack-names": (stack, lily(["a", "b"], stride_A=2, scaling=0.5)),
    "stack-regex": (stack, lily(r"layers\.\d\.(a|b)", stride_A=4, init_weights=False)),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config = CELLS[cell]
    parity = check(model, config, tmp_path)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is None  # peft does not merge LiLy
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    print(
        f"lily {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, peft on "
        f"peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_peft_rebuilds_the_sharing_from_peftc_s_checkpoint(tmp_path):
    pipeline = "lily(r=4, stride_A=4, targets='re:layers[.][0-9][.](a|b)')"
    gm = peftc.apply(symbolic(*stack()), pipeline)
    assert len([n for n, _ in gm.named_parameters() if "lily_A" in n]) == 2  # 6 sites, stride 4
    peftc.save_adapter(fill_trainable(gm), tmp_path)
    layers = peft.PeftModel.from_pretrained(Stack(), tmp_path).base_model.model.layers
    shared = [layers[i][name].lily_A["default"] for i in range(3) for name in "ab"]
    assert [m is shared[0] for m in shared] == [True] * 4 + [False] * 2
    assert len({id(layers[i][n].lily_B["default"]) for i in range(3) for n in "ab"}) == 1


def test_bfloat16_matches_peft(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    args, kwargs = example_inputs(model, batch=3, seq=9, seed=2)
    config = lily(["q_proj", "v_proj"], stride_A=2)
    parity = against_peft(model, args, kwargs, config, tmp_path, tol=1e-2, grad_tol=3e-2)
    assert parity.output == 0 and parity.reloaded == 0  # the term cast before the add, as peft


def test_two_adapters_switch():
    model, (x,), _ = stack()
    base = symbolic(model, (x,))
    only_x = fill_trainable(peftc.apply(base, "lily(r=4, adapter='x', targets='*.a')"))
    both = fill_trainable(
        peftc.apply(only_x, "lily(r=2, num_B=3, adapter='y', targets='*.a|*.b')"), seed=1
    )
    torch.testing.assert_close(peftc.apply(both, "set_adapter(name='x')")(x), only_x(x))
    assert not torch.allclose(both(x), only_x(x))
    torch.testing.assert_close(peftc.apply(only_x, "merge")(x), only_x(x))  # left unmerged


def test_refusals(tmp_path):
    gm = symbolic(*stack())
    with pytest.raises(OptionError, match="has the glob 'layers.0.\\*'"):
        peftc.apply(gm, "lily(targets='layers.0.*')")
    with pytest.raises(OptionError, match="ends with the targets"):
        peftc.apply(gm, "lily(targets='*.b|*.0.b')")
    with pytest.raises(OptionError, match="num_B"):
        peftc.apply(gm, "lily(num_B=1, targets='*.a')")
    conv1d = peftc.capture(nn.Sequential(Conv1D(8, 4)), (torch.randn(2, 4),), method="symbolic")
    with pytest.raises(OptionError, match="not GPT-2's Conv1D '0'"):
        peftc.apply(conv1d, "lily(targets='0')")
    peft.get_peft_model(build("linears")[0], lily(["a"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lily_dropout": 0.1}))
    with pytest.raises(CheckpointError, match="the config sets lily_dropout=0.1"):
        peftc.load_adapter(symbolic(*build("linears")), tmp_path)
