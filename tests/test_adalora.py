"""AdaLoRA against HF peft: trained (pruned) checkpoints load, run and merge; outputs, gradients,
checkpoints both ways; rank allocation step by step."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

import peftc
import peftc.techniques.adalora
from peftc.errors import OptionError, TargetError
from peftc.technique.adapters import adapters
from peftc.technique.checkpoint import CheckpointError
from peftc.techniques.adalora_allocator import RankAllocator, orthogonal_regularization
from peftc.tools.parity import against_peft, close

from conftest import captured, fill_trainable, loaded
from zoo import build, check, graph


def config(**fields):
    return peft.AdaLoraConfig(**{"init_r": 6, "lora_alpha": 12, "total_step": 100, **fields})


def test_init_is_peft_s():
    # E = 0: outputs unchanged
    gm = peftc.apply(graph("llama"), "adalora(init_r=6)", check_numerics=True)
    model = peft.get_peft_model(copy.deepcopy(loaded("tiny-llama").model), config())
    ours = {
        n: t
        for n, t in [*gm.named_parameters(), *gm.named_buffers()]
        if ".lora_" in n or ".ranknum." in n
    }
    theirs = {
        n.removeprefix("base_model.model."): t
        for n, t in model.named_parameters()
        if ".lora_" in n or ".ranknum." in n
    }
    # peft's default targets
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in theirs.items()}
    assert all(torch.equal(t, torch.tensor([6.0])) for n, t in ours.items() if ".ranknum." in n)
    assert all(not t.any() for n, t in ours.items() if ".lora_E." in n)
    assert 0.01 < gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default").std() < 0.03


CELLS = {
    "mlp": (
        "mlp",
        peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin0", "lin1"]),
    ),
    "linears-conv2d": ("linears-conv", config(target_modules=["a", "b", "c"])),
    # in training mode, both drawing the same masks
    "linears-conv2d-dropout": (
        "linears-conv",
        config(target_modules=["a", "b", "c"], lora_dropout=0.1),
        {"train": True},
    ),
    "llama": (
        "llama",
        peft.AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]
        ),
    ),
    "llama-down_proj": ("llama", config(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": ("gpt2", config(target_modules=["c_attn", "c_fc"])),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    name, config, *options = CELLS[cell]
    parity = check(name, config, tmp_path, **dict(*options))
    # A, E, B; no ranknum
    assert set(load_file(tmp_path / "peftc" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )
    if name == "linears-conv":
        assert parity.graph.get_parameter("c.lora_A.default").shape == (6, 3 * 3 * 3)
    print(
        f"adalora {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_pruned_checkpoint_loads_runs_and_merges(tmp_path):
    """A checkpoint after rank allocation: peft saves only the kept ranks and the masks in
    rank_pattern."""
    model, args, kwargs = build("llama")
    trained = fill_trainable(
        peft.get_peft_model(copy.deepcopy(model), config(target_modules=["q_proj", "v_proj"])),
        seed=1,
    ).eval()
    # one layer pruned away entirely
    masks = {
        "model.layers.0.self_attn.q_proj": [True, False, True, False, False, True],
        "model.layers.1.self_attn.v_proj": [False] * 6,
    }
    # what update_and_allocate does: zero the pruned singular values, record the masks
    with torch.no_grad():
        for path, mask in masks.items():
            trained.base_model.model.get_submodule(path).lora_E["default"][~torch.tensor(mask)] = (
                0.0
            )
    trained.peft_config["default"].rank_pattern = {
        f"{p}.lora_E.default": m for p, m in masks.items()
    }
    trained.save_pretrained(tmp_path / "trained")
    saved = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())["rank_pattern"]
    assert set(saved) == {f"{p}.lora_E" for p in masks}

    parity = against_peft(model, args, kwargs, tmp_path / "trained", tmp_path, graph=graph("llama"))
    gm = parity.graph
    assert gm.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default").shape == (3, 64)
    assert gm.get_parameter("model.layers.1.self_attn.v_proj.lora_B.default").shape == (32, 0)
    assert torch.equal(
        gm.get_buffer("model.layers.0.self_attn.q_proj.ranknum.default"), torch.tensor([6.0])
    )
    with torch.no_grad():
        close(
            gm(*args, **kwargs).logits,
            trained(*args, **kwargs, use_cache=False).logits,
            "output against the trained model",
        )
    assert (
        json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())["rank_pattern"]
        == saved
    )
    print(
        f"adalora pruned: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(CheckpointError, match="bias='all'"):
        check("linears-conv", config(target_modules=["a"], bias="all"), tmp_path)
    gm = graph("linears-conv")
    with pytest.raises(TargetError, match="matches no"):
        peftc.apply(gm, "adalora(targets='*.nothing')")
    with pytest.raises(
        OptionError, match="rank_pattern names 'b', which the targets do not select"
    ):
        peftc.apply(gm, "adalora(init_r=2, targets='a', rank_pattern=[['b', [true, false]]])")
    with pytest.raises(OptionError, match="mask of init_r=2 booleans"):
        peftc.apply(gm, "adalora(init_r=2, targets='a', rank_pattern=[['a', [true]]])")
    conv1d = peftc.capture(torch.nn.Conv1d(2, 4, 3), (torch.randn(1, 2, 8),), method="symbolic")
    with pytest.raises(OptionError, match="supports only ungrouped Conv2d"):
        peftc.apply(conv1d, "adalora(targets='re:.*')")


def test_nf4_sites_match_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    pytest.importorskip(
        "bitsandbytes", reason="bitsandbytes is the 4-bit oracle: pip install bitsandbytes"
    )
    from bnb_oracle import linear4bit_model

    def quantized(model):
        # as from_pretrained(load_in_4bit=True) marks it: peft picks SVDLinear4bit
        model.is_loaded_in_4bit = True
        return linear4bit_model(model, monkeypatch)

    model, args, kwargs = build("llama")
    parity = against_peft(
        model,
        args,
        kwargs,
        config(target_modules=["q_proj", "v_proj"]),
        tmp_path,
        graph=peftc.apply(captured("tiny-llama"), "nf4, freeze"),
        prepare=quantized,
        merge=False,
    )
    assert (
        type(parity.peft.base_model.model.model.layers[0].self_attn.q_proj).__name__
        == "SVDLinear4bit"
    )
    gm = parity.graph
    assert all(s.storage == "nf4" for s in peftc.linear_sites(gm) if s.path != "lm_head")
    merged = peftc.apply(gm, "merge(dtype='float32')")
    close(merged(*args, **kwargs).logits, gm(*args, **kwargs).logits, "merged output")
    print(f"adalora nf4: output {parity.output:.2g}, gradients {parity.gradient:.2g}")


def test_text_round_trip():
    text = (
        "adalora(init_r=2, alpha=4.0, dropout=0.1, rank_pattern=[['a', [true, false]]], "
        "total_step=50, targets='a|b')"
    )
    step = peftc.Pipeline.parse(text).steps[0]
    assert peftc.Pipeline.parse(str(step)).steps[0] == step
    gm = peftc.apply(graph("linears"), str(step))
    assert gm.get_parameter("a.lora_E.default").shape == (1, 1) and gm.get_parameter(
        "b.lora_E.default"
    ).shape == (2, 1)


class Regressor(nn.Module):
    """Two linears and a loss in the output, as a transformers model returns it (peft adds its
    orthogonal regulariser to `outputs.loss`)."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 16), nn.Linear(16, 4)

    def forward(self, x, y):
        out = self.lin1(torch.relu(self.lin0(x)))
        return CausalLMOutput(loss=((out - y) ** 2).mean(), logits=out)


def test_rank_allocation_is_peft_s_step_by_step(tmp_path):
    """peft's update_and_allocate and peftc's RankAllocator on the same adapter, data and SGD:
    losses (regulariser included), every factor and the masks agree at every step, and the pruned
    adapter peftc saves loads in peft and computes the same."""
    torch.manual_seed(0)
    model = Regressor().eval()
    x, y = torch.randn(6, 10), torch.randn(6, 4)
    config = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=8,
        lora_alpha=4,
        target_modules=["lin0", "lin1"],
    )
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    theirs.save_pretrained(tmp_path / "init")
    ours = peftc.load_adapter(peftc.capture(copy.deepcopy(model), (x, y)), tmp_path / "init")
    allocator = RankAllocator(ours)
    sides = [
        (
            theirs,
            lambda: theirs.base_model(x, y).loss,  # AdaLoraModel.forward adds its regulariser
            lambda s: theirs.base_model.update_and_allocate(s),
        ),
        (
            ours,
            lambda: ours(x, y).loss + 0.5 * orthogonal_regularization(ours),
            allocator.update_and_allocate,
        ),
    ]
    optimizers = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m, *_ in sides
    ]
    for step in range(1, 11):
        losses = []
        for (_, loss_of, allocate), optimizer in zip(sides, optimizers, strict=True):
            loss = loss_of()
            loss.backward()
            optimizer.step()
            allocate(step)
            optimizer.zero_grad()
            losses.append(loss.detach())
        close(losses[1], losses[0], f"loss at step {step}")
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                mine = ours.get_parameter(name.removeprefix("base_model.model."))
                close(mine, p, f"{name} at step {step}")
        pattern = theirs.peft_config["default"].rank_pattern or {}
        assert {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()} == {
            path: list(kept) for path, kept in adapters(ours)["default"].options.rank_pattern
        }, step
    assert sum(sum(kept) for kept in theirs.peft_config["default"].rank_pattern.values()) == 4
    peftc.save_adapter(ours, tmp_path / "pruned")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "pruned").eval()
    with torch.no_grad():
        close(ours.eval()(x, y).logits, again(x, y).logits, "peft on the pruned adapter")
