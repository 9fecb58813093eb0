"""RandLoRA against HF peft: shared bases (dense, sparse, very sparse), outputs, gradients, merge,
checkpoints both ways (with and without the bases), switching, refusals."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.randlora
from peftc.errors import CheckpointError, OptionError

from conftest import fill_trainable, loaded
from zoo import adapted_paths, check, graph


def randlora(*targets, **fields):
    fields = {"r": 4, "randlora_alpha": 8, **fields}
    return peft.RandLoraConfig(target_modules=list(targets), **fields)


LLAMA = ("q_proj", "v_proj", "down_proj")  # (out, in): (64, 64), (32, 64), (64, 128)
CELLS = {
    # a: 8 -> 16 (in < out), b: 16 -> 4 (out < in)
    "linears": ("linears", randlora("a", "b")),
    "linears-dropout": ("linears", randlora("a", "b", randlora_dropout=0.1), {"train": True}),
    "linears-very-sparse-regenerated": (
        "linears",
        randlora("a", "b", very_sparse=True, save_projection=False, projection_prng_key=3),
    ),
    "llama": ("llama", randlora(*LLAMA, r=8, randlora_alpha=16)),
    "llama-sparse-regenerated": (
        "llama",
        randlora(*LLAMA, sparse=True, save_projection=False, init_weights=False),
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
    assert ("base_model.randlora_A" in keys) == config.save_projection
    print(
        f"randlora {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_bases_are_peft_s_and_the_init_changes_nothing():
    lm = loaded("tiny-llama")
    gm = peftc.apply(graph("llama"), "randlora(r=8, targets='*.q_proj|*.v_proj|*.down_proj')")
    theirs = peft.get_peft_model(copy.deepcopy(lm.model), randlora(*LLAMA, r=8)).base_model
    for name in ("randlora_A", "randlora_B"):
        assert torch.equal(gm.get_buffer(f"{name}.default"), getattr(theirs, name)["default"])
    assert gm.get_buffer("randlora_B.default").shape == (128, 8, 8)
    base = graph("llama")(*lm.args, **lm.kwargs).logits
    assert torch.equal(gm(*lm.args, **lm.kwargs).logits, base)


def test_two_adapters_switch():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    only_a = fill_trainable(
        peftc.apply(graph("linears"), "randlora(r=4, adapter='a', targets='a')")
    )
    both = fill_trainable(
        peftc.apply(only_a, "randlora(r=2, adapter='b', targets='a|b', sparse=true)"), seed=1
    )
    assert both.get_buffer("randlora_A.b").shape == (2, 1, 16)  # each adapter its own bases
    torch.testing.assert_close(peftc.apply(both, "set_adapter(name='a')")(x), only_a(x))
    assert not torch.allclose(both(x), only_a(x))


def test_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(CheckpointError, match="bias='randlora_only'"):
        check("linears", randlora("a", bias="randlora_only"), tmp_path)
    with pytest.raises(OptionError, match="lora_alpha"):
        peftc.apply(graph("linears"), "randlora(r=4, targets='a', lora_alpha=8)")
