"""VeRA against HF peft: shared projections, outputs, gradients, merge and checkpoints both ways."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc
import peftc.techniques.vera
from peftc.errors import TargetError
from peftc.technique.checkpoint import CheckpointError
from peftc.tools.parity import against_peft, close

from conftest import captured, fill_trainable, loaded
from zoo import build, check, graph

# (64, 64), (32, 64), (64, 128): the projections are (r, 128), (64, r)
LLAMA = [
    "q_proj",
    "v_proj",
    "down_proj",
]


def test_projections_are_peft_s_and_shared():
    lm = loaded("tiny-llama")
    base = graph("llama")
    gm = peftc.apply(base, f"vera(r=16, targets='{'|'.join('*.' + t for t in LLAMA)}')")
    model = peft.get_peft_model(
        copy.deepcopy(lm.model), peft.VeraConfig(r=16, target_modules=LLAMA)
    )
    for name in ("vera_A", "vera_B"):
        ours, theirs = gm.get_buffer(f"{name}.default"), getattr(model.base_model, name)["default"]
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert gm.get_buffer("vera_A.default").shape == (16, 128) and gm.get_buffer(
        "vera_B.default"
    ).shape == (64, 16)
    # one pair, read by every site
    assert sum(1 for n, _ in gm.named_buffers() if n.startswith("vera_")) == 2
    torch.testing.assert_close(
        gm.get_parameter("model.layers.0.self_attn.q_proj.vera_lambda_d.default"),
        torch.full((16,), 0.1),
    )
    # lambda_b = 0 at init
    assert torch.equal(gm(*lm.args, **lm.kwargs).logits, base(*lm.args, **lm.kwargs).logits)


CELLS = {
    "mlp": ("mlp", peft.VeraConfig(r=4, target_modules=["lin0", "lin1"])),
    "linears": ("linears", peft.VeraConfig(r=4, target_modules=["a", "b"])),
    # in training mode, both drawing the same masks
    "linears-dropout": (
        "linears",
        peft.VeraConfig(r=4, target_modules=["a", "b"], vera_dropout=0.1),
        {"train": True},
    ),
    "llama": ("llama", peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"])),
    "llama-down_proj": ("llama", peft.VeraConfig(r=8, target_modules=LLAMA)),
    "gpt2": ("gpt2", peft.VeraConfig(r=8, target_modules=["c_attn", "c_proj"])),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    name, config, *options = CELLS[cell]
    parity = check(name, config, tmp_path, **dict(*options))
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    if config.vera_dropout:
        assert parity.graph.get_submodule("a.vera_dropout.default").p == config.vera_dropout
    print(
        f"vera {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_checkpoint_without_projection_regenerates_it(tmp_path):
    config = peft.VeraConfig(
        r=8, target_modules=LLAMA, save_projection=False, projection_prng_key=7
    )
    check("llama", config, tmp_path)
    assert not any(
        "vera_A" in k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )
    assert not any(
        "vera_" in k and "lambda" not in k
        for k in load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    )


def test_checkpoint_missing_its_saved_projection_is_refused(tmp_path):
    peft.get_peft_model(
        build("linears")[0], peft.VeraConfig(r=4, target_modules=["a", "b"])
    ).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "base_model.vera_B"}, weights)
    with pytest.raises(CheckpointError, match=r"missing \(1\): base_model.vera_B"):
        peftc.load_adapter(graph("linears"), tmp_path)


def test_init_weights_false_is_peft_s(tmp_path):
    gm = peftc.apply(
        graph("linears"), "vera(r=4, targets='a|b', init_weights=false, d_initial=0.5)"
    )
    assert torch.equal(gm.get_parameter("a.vera_lambda_b.default"), torch.ones(16))
    assert not torch.equal(gm.get_parameter("a.vera_lambda_d.default"), torch.full((4,), 0.5))
    peftc.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_weights"] is False and config["d_initial"] == 0.5


def test_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(CheckpointError, match="bias='vera_only'"):
        check("linears", peft.VeraConfig(r=4, target_modules=["a"], bias="vera_only"), tmp_path)
    with pytest.raises(TargetError, match="matches no linear site"):
        peftc.apply(graph("linears"), "vera(r=4, targets='*.nothing')")


def test_nf4_sites_match_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip(
        "bitsandbytes", reason="bitsandbytes is the 4-bit oracle: pip install bitsandbytes"
    )
    from bnb_oracle import linear4bit_model

    model, args, kwargs = build("llama")
    parity = against_peft(
        model,
        args,
        kwargs,
        peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
        tmp_path,
        graph=peftc.apply(captured("tiny-llama"), "nf4, freeze"),
        prepare=lambda m: linear4bit_model(m, monkeypatch),
        merge=False,
    )
    gm = parity.graph
    assert all(s.storage == "nf4" for s in peftc.linear_sites(gm) if s.path != "lm_head")
    merged = peftc.apply(gm, "merge(dtype='float32')")
    close(merged(*args, **kwargs).logits, gm(*args, **kwargs).logits, "merged output")
    print(f"vera nf4: output {parity.output:.2g}, gradients {parity.gradient:.2g}")


def test_text_round_trip():
    text = (
        "vera(r=4, dropout=0.1, d_initial=0.5, projection_prng_key=3, save_projection=false, "
        "targets='a')"
    )
    gm = fill_trainable(peftc.apply(graph("linears"), text))
    step = peftc.Pipeline.parse(text).steps[0]
    assert peftc.Pipeline.parse(str(step)).steps[0] == step
    assert gm.get_buffer("vera_A.default").shape == (4, 8)
