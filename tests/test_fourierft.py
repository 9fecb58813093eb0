"""FourierFT against HF peft: spectrum locations, outputs, gradients, merge and checkpoints both
ways."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.fourierft
from peftc.errors import OptionError, TargetError
from peftc.technique.checkpoint import CheckpointError

from conftest import loaded
from zoo import check, graph


def test_locations_and_init_are_peft_s():
    lm = loaded("tiny-llama")
    base = graph("llama")
    config = peft.FourierFTConfig(
        n_frequency=100, target_modules=["q_proj", "v_proj"], n_frequency_pattern={"v_proj": 40}
    )
    model = peft.get_peft_model(copy.deepcopy(lm.model), config)
    gm = peftc.apply(
        base,
        "fourierft(n_frequency=100, targets='*.q_proj|*.v_proj', n_frequency_pattern=[['v_proj', "
        "40]])",
    )
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        theirs = model.base_model.model.get_submodule(path).indices["default"]
        assert torch.equal(gm.get_buffer(f"{path}.indices.default"), theirs)
    assert gm.get_parameter("model.layers.0.self_attn.v_proj.fourierft_spectrum.default").shape == (
        40,
    )
    # N(0, 1), as peft
    assert (
        gm.get_parameter("model.layers.0.self_attn.q_proj.fourierft_spectrum.default").std() > 0.5
    )
    zero = peftc.apply(base, "fourierft(n_frequency=100, init_weights=true, targets='*.q_proj')")
    assert torch.equal(zero(*lm.args, **lm.kwargs).logits, base(*lm.args, **lm.kwargs).logits)


CELLS = {
    "mlp": ("mlp", peft.FourierFTConfig(n_frequency=40, target_modules=["lin0", "lin1"])),
    "linears": (
        "linears",
        peft.FourierFTConfig(
            n_frequency=32,
            scaling=10.0,
            target_modules=["a", "b"],
            random_loc_seed=3,
            n_frequency_pattern={"b": 20},
        ),
    ),
    "llama": ("llama", peft.FourierFTConfig(n_frequency=100, target_modules=["q_proj", "v_proj"])),
    "llama-down_proj": (
        "llama",
        peft.FourierFTConfig(
            n_frequency=200, scaling=20.0, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    ),
    "gpt2": (
        "gpt2",
        peft.FourierFTConfig(
            n_frequency=200, scaling=20.0, target_modules=["c_attn", "mlp.c_proj"]
        ),
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    name, config = CELLS[cell]
    parity = check(name, config, tmp_path)
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    # spectra only, no indices
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(k.endswith(".fourierft_spectrum") for k in keys)
    for (
        path,
        spectrum,
    ) in parity.graph.named_parameters():  # each site's n_frequency, or its pattern's
        if spectrum.requires_grad:
            site = path.removesuffix(".fourierft_spectrum.default").rsplit(".", 1)[-1]
            assert spectrum.shape == (config.n_frequency_pattern.get(site, config.n_frequency),)
    saved = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    assert saved["n_frequency_pattern"] == config.n_frequency_pattern
    assert saved["random_loc_seed"] == config.random_loc_seed
    print(
        f"fourierft {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(CheckpointError, match="bias='fourier_only'"):
        check(
            "linears",
            peft.FourierFTConfig(n_frequency=8, target_modules=["a"], bias="fourier_only"),
            tmp_path,
        )
    gm = graph("linears")
    with pytest.raises(TargetError, match="matches no linear site"):
        peftc.apply(gm, "fourierft(targets='*.nothing')")
    with pytest.raises(
        OptionError, match=r"n_frequency=1000 exceeds the 16 x 8 = 128 entries of 'a'"
    ):
        peftc.apply(gm, "fourierft(targets='a')")
    with pytest.raises(OptionError, match="n_frequency_pattern must be"):
        peftc.apply(gm, "fourierft(targets='a', n_frequency_pattern=['a', 3])")


def test_text_round_trip():
    text = (
        "fourierft(n_frequency=16, scaling=3.0, random_loc_seed=5, n_frequency_pattern=[['b', 8]], "
        "targets='a|b')"
    )
    step = peftc.Pipeline.parse(text).steps[0]
    assert peftc.Pipeline.parse(str(step)).steps[0] == step
    gm = peftc.apply(graph("linears"), str(step))
    assert gm.get_parameter("b.fourierft_spectrum.default").shape == (8,)
