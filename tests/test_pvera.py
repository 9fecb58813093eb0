"""PVeRA against HF peft: outputs, gradients (training draws the same noise), merge and checkpoints
both ways."""

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.pvera
from peftc.errors import NotMergeable
from peftc.technique.checkpoint import CheckpointError

from zoo import adapted_paths, build, check, graph

LINEARS = dict(r=4, target_modules=["a", "b"])
LLAMA = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])

CELLS = {
    "linears": ("linears", peft.PveraConfig(**LINEARS), {}),
    # training: both sides draw ε (and the dropout masks) from one global RNG state
    "linears-train": (
        "linears",
        peft.PveraConfig(**LINEARS, pvera_dropout=0.1),
        {"train": True},
    ),
    # training: ε from each site's own generator, seeded alike on both sides
    "linears-generator": (
        "linears",
        peft.PveraConfig(**LINEARS, generator_seed=5),
        {"train": True},
    ),
    "linears-sample-at-inference": (
        "linears",
        peft.PveraConfig(**LINEARS, sample_at_inference=True),
        {"merge": False},
    ),
    "llama": ("llama", peft.PveraConfig(**LLAMA), {}),
    "llama-train": ("llama", peft.PveraConfig(**LLAMA, save_projection=False), {"train": True}),
    "gpt2": ("gpt2", peft.PveraConfig(r=8, target_modules=["c_attn", "c_proj"]), {}),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    name, config, options = CELLS[cell]
    parity = check(name, config, tmp_path, **options)
    ours, theirs = adapted_paths(parity)
    assert ours == theirs
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert ({"base_model.pvera_A", "base_model.pvera_B"} <= keys) == config.save_projection
    print(
        f"pvera {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_projections_and_init_are_peft_s():
    gm = peftc.apply(graph("linears"), "pvera(r=4, targets='a|b')")
    model = peft.get_peft_model(build("linears")[0], peft.PveraConfig(**LINEARS))
    for name in ("pvera_A", "pvera_B"):
        assert torch.equal(
            gm.get_buffer(f"{name}.default"), getattr(model.base_model, name)["default"]
        )
    assert gm.get_buffer("pvera_A.default").shape == (8, 16)
    assert torch.equal(gm.get_parameter("a.pvera_lambda_d.default"), torch.full((8,), 0.1))


def test_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(CheckpointError, match="bias='pvera_only'"):
        check("linears", peft.PveraConfig(**LINEARS, bias="pvera_only"), tmp_path)
    gm = peftc.apply(graph("linears"), "pvera(r=4, targets='a|b', sample_at_inference=true)")
    with pytest.raises(NotMergeable, match="sample_at_inference"):
        peftc.apply(gm, "merge")
