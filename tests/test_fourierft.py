"""FourierFT against HF peft: spectrum locations, outputs, gradients, merge and checkpoints both ways."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.fourierft
from peftc.technique.checkpoint import CheckpointError
from peftc.errors import OptionError, TargetError
from peft_parity import Case, check_loads_in_peft, check_merge, check_parity


def test_locations_and_init_are_peft_s():
    case = Case.transformer("tiny-llama")
    config = peft.FourierFTConfig(n_frequency=100, target_modules=["q_proj", "v_proj"], n_frequency_pattern={"v_proj": 40})
    model = peft.get_peft_model(copy.deepcopy(case.model), config)
    gm = peftc.apply(case.gm, "fourierft(n_frequency=100, targets='*.q_proj|*.v_proj', n_frequency_pattern=[['v_proj', 40]])")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        theirs = model.base_model.model.get_submodule(path).indices["default"]
        assert torch.equal(gm.get_buffer(f"{path}.indices.default"), theirs)
    assert gm.get_parameter("model.layers.0.self_attn.v_proj.fourierft_spectrum.default").shape == (40,)
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.fourierft_spectrum.default").std() > 0.5  # N(0, 1), as peft
    zero = peftc.apply(case.gm, "fourierft(n_frequency=100, init_weights=true, targets='*.q_proj')")
    for out, ref in zip(case.run(zero), case.run(case.gm)):
        assert torch.equal(out, ref)


def test_mlp_matches_peft(tmp_path):
    case = Case.mlp()
    config = peft.FourierFTConfig(n_frequency=32, scaling=10.0, target_modules=["a", "b"], random_loc_seed=3,
                                  n_frequency_pattern={"b": 20})
    peft_model, gm = case.from_peft(config, tmp_path / "peft")
    assert gm.get_parameter("b.fourierft_spectrum.default").shape == (20,)
    check_parity(case, peft_model, gm)
    check_merge(case, gm)
    check_loads_in_peft(case, gm, tmp_path / "peftc")
    config = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    assert config["n_frequency_pattern"] == {"b": 20} and config["random_loc_seed"] == 3


@pytest.mark.parametrize("name, targets", [("tiny-llama", ["q_proj", "v_proj", "down_proj"]), ("tiny-gpt2", ["c_attn", "mlp.c_proj"])])
def test_transformer_matches_peft(tmp_path, name, targets):
    case = Case.transformer(name)
    peft_model, gm = case.from_peft(peft.FourierFTConfig(n_frequency=200, scaling=20.0, target_modules=targets),
                                    tmp_path / "peft")
    out_diff, grad_diff = check_parity(case, peft_model, gm)
    merge_diff = check_merge(case, gm)
    saved_diff = check_loads_in_peft(case, gm, tmp_path / "peftc")
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))  # spectra only, no indices
    assert all(k.endswith(".fourierft_spectrum") for k in keys)
    print(f"fourierft {name}: output {out_diff:.2g}, gradients {grad_diff:.2g}, merge {merge_diff:.2g}, "
          f"peft on peftc's checkpoint {saved_diff:.2g}")


def test_refuses_what_it_does_not_implement(tmp_path):
    case = Case.mlp()
    with pytest.raises(CheckpointError, match="bias='fourier_only'"):
        case.from_peft(peft.FourierFTConfig(n_frequency=8, target_modules=["a"], bias="fourier_only"), tmp_path)
    with pytest.raises(TargetError, match="matches no linear site"):
        peftc.apply(case.gm, "fourierft(targets='*.nothing')")
    with pytest.raises(OptionError, match=r"n_frequency=1000 exceeds the 16 x 8 = 128 entries of 'a'"):
        peftc.apply(case.gm, "fourierft(targets='a')")
    with pytest.raises(OptionError, match="n_frequency_pattern must be"):
        peftc.apply(case.gm, "fourierft(targets='a', n_frequency_pattern=['a', 3])")


def test_text_round_trip():
    text = "fourierft(n_frequency=16, scaling=3.0, random_loc_seed=5, n_frequency_pattern=[['b', 8]], targets='a|b')"
    step = peftc.Pipeline.parse(text).steps[0]
    assert peftc.Pipeline.parse(str(step)).steps[0] == step
    gm = peftc.apply(Case.mlp().gm, str(step))
    assert gm.get_parameter("b.fourierft_spectrum.default").shape == (8,)
