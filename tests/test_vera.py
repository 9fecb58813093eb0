"""VeRA against HF peft: shared projections, outputs, gradients, merge and checkpoints both ways."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc
import peftc.techniques.vera
from peftc.technique.checkpoint import CheckpointError
from peftc.errors import TargetError
from peft_parity import Case, check_loads_in_peft, check_merge, check_parity, close
from conftest import fill_trainable

LLAMA = ["q_proj", "v_proj", "down_proj"]  # (64, 64), (32, 64), (64, 128): the projections are (r, 128), (64, r)


def test_projections_are_peft_s_and_shared():
    case = Case.transformer("tiny-llama")
    gm = peftc.apply(case.gm, f"vera(r=16, targets='{'|'.join('*.' + t for t in LLAMA)}')")
    model = peft.get_peft_model(copy.deepcopy(case.model), peft.VeraConfig(r=16, target_modules=LLAMA))
    for name in ("vera_A", "vera_B"):
        ours, theirs = gm.get_buffer(f"{name}.default"), getattr(model.base_model, name)["default"]
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert gm.get_buffer("vera_A.default").shape == (16, 128) and gm.get_buffer("vera_B.default").shape == (64, 16)
    assert sum(1 for n, _ in gm.named_buffers() if n.startswith("vera_")) == 2  # one pair, read by every site
    torch.testing.assert_close(gm.get_parameter("model.layers.0.self_attn.q_proj.vera_lambda_d.default"),
                               torch.full((16,), 0.1))
    for out, rel in zip(case.run(gm), case.run(case.gm)):
        assert torch.equal(out, rel)  # lambda_b = 0: the branch adds nothing at init


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_mlp_matches_peft(tmp_path, dropout):
    case = Case.mlp()
    config = peft.VeraConfig(r=4, target_modules=["a", "b"], vera_dropout=dropout)
    peft_model, gm = case.from_peft(config, tmp_path / "peft")
    if dropout:  # both in training mode: the same masks, drawn in the same order
        assert gm.get_submodule("a.vera_dropout.default").p == dropout
        peft_model.train(), gm.train()
    check_parity(case, peft_model, gm)
    check_merge(case, gm)
    check_loads_in_peft(case, gm, tmp_path / "peftc")


@pytest.mark.parametrize("name, targets", [("tiny-llama", LLAMA), ("tiny-gpt2", ["c_attn", "c_proj"])])
def test_transformer_matches_peft(tmp_path, name, targets):
    case = Case.transformer(name)
    peft_model, gm = case.from_peft(peft.VeraConfig(r=8, target_modules=targets), tmp_path / "peft")
    out_diff, grad_diff = check_parity(case, peft_model, gm)
    merge_diff = check_merge(case, gm)
    saved_diff = check_loads_in_peft(case, gm, tmp_path / "peftc")
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    print(f"vera {name}: output {out_diff:.2g}, gradients {grad_diff:.2g}, merge {merge_diff:.2g}, "
          f"peft on peftc's checkpoint {saved_diff:.2g}")


def test_checkpoint_without_projection_regenerates_it(tmp_path):
    case = Case.transformer("tiny-llama")
    config = peft.VeraConfig(r=8, target_modules=LLAMA, save_projection=False, projection_prng_key=7)
    peft_model, gm = case.from_peft(config, tmp_path / "peft")
    assert not any("vera_A" in k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    check_parity(case, peft_model, gm)
    check_loads_in_peft(case, gm, tmp_path / "peftc")
    assert not any("vera_" in k and "lambda" not in k for k in load_file(tmp_path / "peftc" / "adapter_model.safetensors"))


def test_checkpoint_missing_its_saved_projection_is_refused(tmp_path):
    case = Case.mlp()
    case.from_peft(peft.VeraConfig(r=4, target_modules=["a", "b"]), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "base_model.vera_B"}, weights)
    with pytest.raises(CheckpointError, match=r"missing \(1\): base_model.vera_B"):
        peftc.load_adapter(case.gm, tmp_path)


def test_init_weights_false_is_peft_s(tmp_path):
    gm = peftc.apply(Case.mlp().gm, "vera(r=4, targets='a|b', init_weights=false, d_initial=0.5)")
    assert torch.equal(gm.get_parameter("a.vera_lambda_b.default"), torch.ones(16))
    assert not torch.equal(gm.get_parameter("a.vera_lambda_d.default"), torch.full((4,), 0.5))
    peftc.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_weights"] is False and config["d_initial"] == 0.5


def test_refuses_what_it_does_not_implement(tmp_path):
    case = Case.mlp()
    with pytest.raises(CheckpointError, match="bias='vera_only'"):
        case.from_peft(peft.VeraConfig(r=4, target_modules=["a"], bias="vera_only"), tmp_path)
    with pytest.raises(TargetError, match="matches no linear site"):
        peftc.apply(case.gm, "vera(r=4, targets='*.nothing')")


def test_nf4_sites_match_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the 4-bit oracle: pip install bitsandbytes")
    from bnb_oracle import linear4bit_model

    case = Case.transformer("tiny-llama")
    case.gm = peftc.apply(case.gm, "nf4")
    peft_model, gm = case.from_peft(peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), tmp_path,
                                    prepare=lambda m: linear4bit_model(m, monkeypatch))
    assert all(s.storage == "nf4" for s in peftc.linear_sites(gm) if s.path != "lm_head")
    out_diff, grad_diff = check_parity(case, peft_model, gm)
    merged = peftc.apply(gm, "merge(dtype='float32')")
    close(case.run(merged)[0], case.run(gm)[0], "merged output")
    print(f"vera nf4: output {out_diff:.2g}, gradients {grad_diff:.2g}")


def test_text_round_trip():
    text = "vera(r=4, dropout=0.1, d_initial=0.5, projection_prng_key=3, save_projection=false, targets='a')"
    gm = fill_trainable(peftc.apply(Case.mlp().gm, text))
    step = peftc.Pipeline.parse(text).steps[0]
    assert peftc.Pipeline.parse(str(step)).steps[0] == step
    assert gm.get_buffer("vera_A.default").shape == (4, 8)
