"""LoRA on parameters (peft's `target_parameters`) against HF peft: a parameter used by `@`, 3-D
expert stacks in both layouts, the experts of a tiny transformers Mixtral (nested wrappers), with
outputs, every gradient, merge and checkpoints both ways."""

import peft
import pytest
import torch
from torch import nn

import peftc
from peftc.errors import OptionError
from peftc.technique.adapters import adapters

from zoo import check, graph


class _LinearUsingParameter(nn.Module):
    """peft's test model: a linear written as `x @ W + b`, W stored (in, out)."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out))
        self.bias = nn.Parameter(torch.ones(fan_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = _LinearUsingParameter(10, 20), _LinearUsingParameter(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class Experts(nn.Module):
    """A stack of expert matrices applied with bmm: (E, out, in), or (E, in, out) when transposed
    (transformers' `use_experts_implementation(is_transposed=True)`)."""

    def __init__(self, transposed):
        super().__init__()
        self.is_transposed = transposed
        shape = (3, 6, 5) if transposed else (3, 5, 6)
        self.weight = nn.Parameter(torch.randn(*shape) / 3)

    def forward(self, x):
        return torch.bmm(x, self.weight if self.is_transposed else self.weight.transpose(1, 2))


class ExpertsModel(nn.Module):
    def __init__(self, transposed):
        super().__init__()
        self.experts, self.head = Experts(transposed), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.experts(x)))


def mlp():
    torch.manual_seed(0)
    return MlpUsingParameters().eval(), (torch.randn(4, 10),), {}


def experts(transposed):
    def build():
        torch.manual_seed(0)
        return ExpertsModel(transposed).eval(), (torch.randn(3, 4, 6),), {}

    return build


def lora(**fields):
    return peft.LoraConfig(**{"r": 2, "lora_alpha": 4, "init_lora_weights": False, **fields})


CELLS = {
    "mlp-parameter": (mlp, lora(target_parameters=["lin0.weight"])),
    "linear-module-and-parameter": (
        "mlp",
        lora(target_modules=["lin0"], target_parameters=["lin1.weight"]),
    ),
    "experts": (experts(False), lora(target_parameters=["experts.weight"])),
    "experts-transposed": (experts(True), lora(target_parameters=["experts.weight"])),
    "mixtral-experts": (
        "mixtral",
        lora(
            target_modules=["q_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        ),
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config = CELLS[cell]
    parity = check(model, config, tmp_path)
    assert parity.merged is not None and parity.reloaded is not None
    ours = {
        path
        for record in adapters(parity.graph).values()
        for path, kind in record.sites
        if kind == "parameter"
    }
    assert ours == set(parity.peft.base_model.targeted_parameter_names)


def test_nested_parameters_are_keyed_as_peft_nests_its_wrappers(tmp_path):
    gm = peftc.apply(
        graph("mixtral"),
        "lora(targets='none', target_parameters=['experts.gate_up_proj', 'experts.down_proj'])",
    )
    names = {n for n, p in gm.named_parameters() if p.requires_grad}
    # peft wraps gate_up_proj first (registration order), then wraps that wrapper for down_proj
    assert "model.layers.0.mlp.experts.lora_A.default.weight" in names
    assert "model.layers.0.mlp.experts.base_layer.lora_A.default.weight" in names
    peftc.save_adapter(gm, tmp_path)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert config.target_modules == set() and set(config.target_parameters) == {
        "experts.gate_up_proj",
        "experts.down_proj",
    }


def test_refuses_what_peft_refuses():
    with pytest.raises(OptionError, match="peft does not support dropout on parameters"):
        peftc.apply(graph("mixtral"), "lora(target_parameters=['experts.down_proj'], dropout=0.1)")
    with pytest.raises(OptionError, match="matches no parameter the graph reads"):
        peftc.apply(graph("mixtral"), "lora(target_parameters=['experts.up_proj'])")
    with pytest.raises(OptionError, match="belongs to a module targets also adapts"):
        peftc.apply(
            graph("mixtral"),
            "lora(targets='*.q_proj', target_parameters=['q_proj.weight'])",
        )
