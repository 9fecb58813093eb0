"""Poly against HF peft: a tiny Llama (eval and training, where the router draws a relaxed
Bernoulli sample from the same RNG state) and a small module; outputs, every gradient, checkpoints
both ways (`against_peft`); merge and unsupported sites refused by name."""

import peft
import pytest
import torch
from torch import nn

import peftc
import peftc.techniques.poly  # registers the technique
from peftc.errors import OptionError
from peftc.technique.adapters import adapters
from peftc.tools.parity import against_peft

from zoo import adapted_paths, build, graph, symbolic


def poly(*targets, **fields):
    fields = {"r": 4, "n_tasks": 3, "n_skills": 2, "n_splits": 2, **fields}
    return peft.PolyConfig(target_modules=list(targets), **fields)


class Tower(nn.Module):
    """Two linears over (batch, sequence, features), called as peft's feature extractor calls."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(8, 12), nn.Linear(12, 6)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        return self.lin1(torch.relu(self.lin0(input_ids)))


@pytest.mark.parametrize("train", [False, True])
def test_llama_matches_peft(tmp_path, train):
    model, args, kwargs = build("llama")
    ids = torch.tensor([2, 0, 1])
    config = poly("q_proj", "down_proj", task_type="CAUSAL_LM")
    parity = against_peft(
        model,
        args,
        {**kwargs, "task_ids": ids},
        config,
        tmp_path,
        graph=graph("llama"),
        train=train,
        merge=False,
    )
    ours, theirs = adapted_paths(parity)
    assert ours == theirs
    merged = peftc.apply(parity.graph, "merge")  # left in the graph, by name
    assert adapters(merged)["default"].merged is False


def test_module_matches_peft(tmp_path):
    torch.manual_seed(0)
    model, x = Tower(), torch.randn(2, 5, 8)
    config = poly("lin0", "lin1", n_skills=3, task_type="FEATURE_EXTRACTION")
    against_peft(
        model,
        (x,),
        {"task_ids": torch.tensor([1, 2])},
        config,
        tmp_path,
        graph=symbolic(model, (x,)),
        merge=False,
    )


def test_refuses_what_peft_does_not_do():
    torch.manual_seed(0)
    model, x = Tower(), torch.randn(2, 5, 8)
    with pytest.raises(OptionError, match="n_splits=5"):
        peftc.apply(symbolic(model, (x,)), "poly(targets='lin0', n_splits=5)")
