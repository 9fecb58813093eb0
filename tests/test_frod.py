"""FRoD against HF peft 0.21: shared bases and sparse positions, outputs, gradients, merge and
checkpoints both ways, on a tiny Llama and small linears, and refusals."""

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.frod
from peftc.errors import CheckpointError, OptionError

from zoo import adapted_paths, build, check, graph, symbolic


def frod(*targets, **fields):
    return peft.FrodConfig(target_modules=list(targets), progressbar=False, **fields)


CELLS = {
    "llama": ("llama", frod("q_proj", "v_proj", "down_proj", sparse_rate=0.05)),
    # regenerated from the weights on both sides
    "mlp-no-projection": (
        "mlp",
        frod("lin0", "lin1", "lin2", sparse_rate=0.1, projection_prng_key=3, save_projection=False),
    ),
    # in training mode, both drawing the same masks
    "linears-dropout": ("linears", frod("a", "b", frod_dropout=0.1), {"train": True}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    name, config, *options = CELLS[cell]
    parity = check(name, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.frod_V.") for k in keys) == config.save_projection
    print(
        f"frod {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    only_a = peftc.apply(graph("linears"), "frod(adapter='a', targets='a', init_weights=false)")
    both = peftc.apply(only_a, "frod(adapter='b', targets='a|b', init_weights=false)")
    torch.testing.assert_close(peftc.apply(both, "set_adapter(name='a')")(x), only_a(x))
    assert not torch.allclose(both(x), only_a(x))


def test_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(CheckpointError, match="bias='frod_only'"):
        check("linears", frod("a", bias="frod_only"), tmp_path)
    model, args, _ = build("linears")
    half = symbolic(model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args))
    with pytest.raises(OptionError, match="'a' is stored in torch.bfloat16"):
        peftc.apply(half, "frod(targets='a', autocast_adapter_dtype=false)")
