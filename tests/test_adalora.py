"""AdaLoRA against HF peft: trained (pruned) checkpoints load, run and merge; outputs, gradients, checkpoints both ways."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.adalora
from peftc.technique.checkpoint import CheckpointError
from peftc.errors import OptionError, TargetError
from peft_parity import Case, check_loads_in_peft, check_merge, check_parity, close
from conftest import fill_trainable


def config(**fields):
    return peft.AdaLoraConfig(**{"init_r": 6, "lora_alpha": 12, "total_step": 100, **fields})


def test_init_is_peft_s():
    case = Case.transformer("tiny-llama")
    gm = peftc.apply(case.gm, "adalora(init_r=6)", check_numerics=True)  # E = 0: outputs unchanged
    model = peft.get_peft_model(copy.deepcopy(case.model), config())
    ours = {n: t for n, t in [*gm.named_parameters(), *gm.named_buffers()] if ".lora_" in n or ".ranknum." in n}
    theirs = {n.removeprefix("base_model.model."): t for n, t in model.named_parameters() if ".lora_" in n or ".ranknum." in n}
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in theirs.items()}  # peft's default targets
    assert all(torch.equal(t, torch.tensor([6.0])) for n, t in ours.items() if ".ranknum." in n)
    assert all(not t.any() for n, t in ours.items() if ".lora_E." in n)
    assert 0.01 < gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default").std() < 0.03


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_mlp_and_conv2d_match_peft(tmp_path, dropout):
    case = Case.mlp(conv=True)
    peft_model, gm = case.from_peft(config(target_modules=["a", "b", "c"], lora_dropout=dropout), tmp_path / "peft")
    assert gm.get_parameter("c.lora_A.default").shape == (6, 3 * 3 * 3)
    if dropout:  # both in training mode: the same masks, drawn in the same order
        peft_model.train(), gm.train()
    check_parity(case, peft_model, gm)
    check_merge(case, gm)
    check_loads_in_peft(case, gm, tmp_path / "peftc")


@pytest.mark.parametrize("name, targets", [("tiny-llama", ["q_proj", "v_proj", "down_proj"]), ("tiny-gpt2", ["c_attn", "c_fc"])])
def test_transformer_matches_peft(tmp_path, name, targets):
    case = Case.transformer(name)
    peft_model, gm = case.from_peft(config(target_modules=targets), tmp_path / "peft")
    out_diff, grad_diff = check_parity(case, peft_model, gm)
    merge_diff = check_merge(case, gm)
    saved_diff = check_loads_in_peft(case, gm, tmp_path / "peftc")
    assert set(load_file(tmp_path / "peftc" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))  # A, E, B; no ranknum
    print(f"adalora {name}: output {out_diff:.2g}, gradients {grad_diff:.2g}, merge {merge_diff:.2g}, "
          f"peft on peftc's checkpoint {saved_diff:.2g}")


def test_pruned_checkpoint_loads_runs_and_merges(tmp_path):
    """A checkpoint after rank allocation: peft saves only the kept ranks and the masks in rank_pattern."""
    case = Case.transformer("tiny-llama")
    trained = fill_trainable(peft.get_peft_model(copy.deepcopy(case.model), config(target_modules=["q_proj", "v_proj"])),
                             seed=1)
    masks = {"model.layers.0.self_attn.q_proj": [True, False, True, False, False, True],
             "model.layers.1.self_attn.v_proj": [False] * 6}  # one layer pruned away entirely
    with torch.no_grad():  # what update_and_allocate does: zero the pruned singular values, record the masks
        for path, mask in masks.items():
            trained.base_model.model.get_submodule(path).lora_E["default"][~torch.tensor(mask)] = 0.0
    trained.peft_config["default"].rank_pattern = {f"{p}.lora_E.default": m for p, m in masks.items()}
    trained.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert set(saved) == {f"{p}.lora_E" for p in masks}

    gm = peftc.load_adapter(case.gm, tmp_path / "peft")
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default").shape == (3, 64)
    assert gm.get_parameter("model.layers.1.self_attn.v_proj.lora_B.default").shape == (32, 0)
    assert torch.equal(gm.get_buffer("model.layers.0.self_attn.q_proj.ranknum.default"), torch.tensor([6.0]))
    for got, expected in zip(case.run(gm), case.run_peft(trained)):
        close(got, expected, "output against the trained model")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path / "peft", is_trainable=True)
    out_diff, grad_diff = check_parity(case, reloaded, gm)
    merge_diff = check_merge(case, gm)
    saved_diff = check_loads_in_peft(case, gm, tmp_path / "peftc")
    assert json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())["rank_pattern"] == saved
    print(f"adalora pruned: output {out_diff:.2g}, gradients {grad_diff:.2g}, merge {merge_diff:.2g}, "
          f"peft on peftc's checkpoint {saved_diff:.2g}")


def test_refuses_what_it_does_not_implement(tmp_path):
    case = Case.mlp(conv=True)
    with pytest.raises(CheckpointError, match="bias='all'"):
        case.from_peft(config(target_modules=["a"], bias="all"), tmp_path)
    with pytest.raises(TargetError, match="matches no"):
        peftc.apply(case.gm, "adalora(targets='*.nothing')")
    with pytest.raises(OptionError, match="rank_pattern names 'b', which the targets do not select"):
        peftc.apply(case.gm, "adalora(init_r=2, targets='a', rank_pattern=[['b', [true, false]]])")
    with pytest.raises(OptionError, match="mask of init_r=2 booleans"):
        peftc.apply(case.gm, "adalora(init_r=2, targets='a', rank_pattern=[['a', [true]]])")
    conv1d = peftc.capture(torch.nn.Conv1d(2, 4, 3), (torch.randn(1, 2, 8),), method="symbolic")
    with pytest.raises(OptionError, match="supports only ungrouped Conv2d"):
        peftc.apply(conv1d, "adalora(targets='re:.*')")


def test_nf4_sites_match_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the 4-bit oracle: pip install bitsandbytes")
    from bnb_oracle import linear4bit_model

    def quantized(model):
        model.is_loaded_in_4bit = True  # as from_pretrained(load_in_4bit=True) marks it: peft picks SVDLinear4bit
        return linear4bit_model(model, monkeypatch)

    case = Case.transformer("tiny-llama")
    case.gm = peftc.apply(case.gm, "nf4")
    peft_model, gm = case.from_peft(config(target_modules=["q_proj", "v_proj"]), tmp_path, prepare=quantized)
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "SVDLinear4bit"
    assert all(s.storage == "nf4" for s in peftc.linear_sites(gm) if s.path != "lm_head")
    out_diff, grad_diff = check_parity(case, peft_model, gm)
    merged = peftc.apply(gm, "merge(dtype='float32')")
    close(case.run(merged)[0], case.run(gm)[0], "merged output")
    print(f"adalora nf4: output {out_diff:.2g}, gradients {grad_diff:.2g}")


def test_text_round_trip():
    text = "adalora(init_r=2, alpha=4.0, dropout=0.1, rank_pattern=[['a', [true, false]]], total_step=50, targets='a|b')"
    step = peftc.Pipeline.parse(text).steps[0]
    assert peftc.Pipeline.parse(str(step)).steps[0] == step
    gm = peftc.apply(Case.mlp().gm, str(step))
    assert gm.get_parameter("a.lora_E.default").shape == (1, 1) and gm.get_parameter("b.lora_E.default").shape == (2, 1)
