"""VB-LoRA against HF peft: outputs, gradients (the shared bank's included), merge, checkpoints both
ways, switching, refusals."""

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.vblora
from peftc.errors import CheckpointError, OptionError

from conftest import fill_trainable
from zoo import adapted_paths, check, graph


def vblora(*targets, **fields):
    fields = {"r": 2, "vector_length": 4, "num_vectors": 8, **fields}
    return peft.VBLoRAConfig(target_modules=list(targets), **fields)


CELLS = {
    # a: 8 -> 16, b: 16 -> 4
    "linears": ("linears", vblora("a", "b")),
    "linears-dropout-top3": (
        "linears",
        vblora("a", "b", topk=3, vblora_dropout=0.1),
        {"train": True},
    ),
    # (out, in): (64, 64), (32, 64), (64, 128)
    "llama": (
        "llama",
        vblora("q_proj", "v_proj", "down_proj", r=4, vector_length=16, num_vectors=32),
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    name, config, *options = CELLS[cell]
    parity = check(name, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.vblora_vector_bank" in keys
    print(
        f"vblora {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    text = "vblora(r=2, vector_length=4, num_vectors=8, adapter='{}', targets='{}')"
    only_a = fill_trainable(peftc.apply(graph("linears"), text.format("a", "a")))
    both = fill_trainable(peftc.apply(only_a, text.format("b", "a|b")), seed=1)
    banks = [n for n, _ in both.named_parameters() if n.endswith(("bank.a", "bank.b"))]
    assert len(banks) == 2  # each adapter its own bank
    torch.testing.assert_close(peftc.apply(both, "set_adapter(name='a')")(x), only_a(x))
    assert not torch.allclose(both(x), only_a(x))


def test_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(CheckpointError, match="save_only_topk_weights"):
        check("linears", vblora("a", "b", save_only_topk_weights=True), tmp_path)
    with pytest.raises(OptionError, match="in_features=8, not a multiple of vector_length=16"):
        peftc.apply(graph("linears"), "vblora(vector_length=16, targets='a')")
