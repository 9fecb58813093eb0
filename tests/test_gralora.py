"""GraLoRA against HF peft 0.21: tiny Llama and small custom modules, k blocks, hybrid rank,
dropout in training, GPT-2's Conv1D, bfloat16; outputs, gradients, merge, checkpoints both ways;
two adapters switched; refusals."""

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.gralora  # registers the technique
from peftc.errors import OptionError, PeftcError
from peftc.tools.parity import perturb

from zoo import MLP, adapted_paths, check, graph


def gralora(*targets, **fields):
    return peft.GraloraConfig(target_modules=list(targets), **fields)


class Conv1DModel(torch.nn.Module):
    """GPT-2's Conv1D (weight stored as (in, out)) on a 3-d input, beside a linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.out = Conv1D(12, 8), torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def conv1d():
    return (
        Conv1DModel().eval(),
        (torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)),),
        {},
    )


def bf16_mlp():
    torch.manual_seed(0)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    return MLP().eval().to(torch.bfloat16), (x.to(torch.bfloat16),), {}


CELLS = {
    "llama-k4-hybrid": (
        "llama",
        gralora("q_proj", "v_proj", "down_proj", r=8, alpha=16, gralora_k=4, hybrid_r=2),
    ),
    "mlp-hybrid-dropout-train": (
        "mlp",
        gralora("lin0", "lin1", r=4, hybrid_r=2, gralora_dropout=0.3),
        {"train": True},
    ),
    "linears-random-init": ("linears", gralora("a", "b", r=4, init_weights=False)),
    "conv1d": (conv1d, gralora("proj", "out", r=4, hybrid_r=1, fan_in_fan_out=True)),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None


def test_bfloat16_as_peft(tmp_path):
    # merged bfloat16 weights round beyond the harness's tolerance on an MLP: equal peft's merge
    config = gralora("lin0", "lin1", r=4, hybrid_r=2)
    parity = check(bf16_mlp, config, tmp_path, merge=False, tol=1e-2, grad_tol=3e-2)
    args = bf16_mlp()[1]
    assert {p.dtype for p in parity.graph.parameters() if p.requires_grad} == {torch.float32}
    with torch.no_grad():
        parity.peft.merge_adapter()
        merged = peftc.apply(parity.graph, "merge")
        torch.testing.assert_close(merged(*args), parity.peft(*args), atol=0, rtol=0)


def test_two_adapters_switch_and_merge():
    x = torch.randn(4, 10)
    gm = peftc.apply(
        graph("mlp"),
        "gralora(r=4, targets='lin1', adapter='a'), "
        "gralora(r=2, hybrid_r=2, targets='lin0|lin1', adapter='b')",
    )
    both = perturb(gm, 0.3)
    base = peftc.apply(both, "disable_adapters")(x)
    only_a, only_b = (peftc.apply(both, f"set_adapter(name='{n}')")(x) for n in "ab")
    assert not torch.allclose(only_a, base) and not torch.allclose(only_b, base)
    assert not torch.allclose(both(x), only_b)
    merged = peftc.apply(both, "merge")
    torch.testing.assert_close(merged(x), both(x), atol=1e-5, rtol=1e-5)


def test_refusals(tmp_path):
    gm = graph("mlp")
    with pytest.raises(OptionError, match="r must be divisible by gralora_k"):
        peftc.apply(gm, "gralora(r=6, gralora_k=4, targets='lin1')")
    with pytest.raises(OptionError, match="in_features=10 of 'lin0' is not divisible"):
        peftc.apply(gm, "gralora(r=4, gralora_k=4, targets='lin0')")
    peft.get_peft_model(MLP(), gralora("lin1", r=4, bias="all")).save_pretrained(tmp_path)
    with pytest.raises(PeftcError, match="bias='all'"):
        peftc.load_adapter(gm, tmp_path)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    captured = peftc.capture(mha, (x, x, x), {"need_weights": False})
    with pytest.raises(PeftcError, match="does not support nn.MultiheadAttention"):
        peftc.apply(captured, "gralora(r=2, targets='out_proj')")
