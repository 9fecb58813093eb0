"""Mixture-of-experts models: peft's all-linear, as peft 0.21 spells it out on each family of
transformers 5 (experts and router as target_parameters where peft's conversion tables say so),
both ways."""

import copy
import sys

import peft
import pytest
import torch

import peftc
from peftc.errors import OptionError
from peftc.technique.adapters import adapters
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close, perturb


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe", "olmoe"])
def test_all_linear_is_peft_s_all_linear(arch, tmp_path):
    """The same adapter tensors (names and shapes) as peft's all-linear; peft loads peftc's and
    computes the same; peft's loads in peftc (outputs, gradients, merge, reload)."""
    model = tiny_model(arch)
    args, kwargs = example_inputs(model)
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=8, target_modules="all-linear")
    )
    graph = peftc.apply(peftc.capture(copy.deepcopy(model), args, kwargs), "freeze")
    ours = perturb(peftc.apply(graph, "lora(targets='all-linear', r=8)"))
    shapes = {n: p.shape for n, p in ours.named_parameters() if p.requires_grad}
    expected = {
        n.removeprefix("base_model.model."): p.shape
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert shapes == expected
    peftc.save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        got = ours.eval()(*args, **kwargs)[0]
        close(reloaded(*args, **kwargs, use_cache=False).logits, got, "peft on peftc's adapter")
    config = peft.LoraConfig(r=8, target_modules="all-linear")
    parity = against_peft(model, args, kwargs, config, tmp_path, graph=graph)
    assert parity.merged is not None and parity.reloaded is not None


def test_mixtral_s_all_linear_is_written_out_as_peft_writes_it():
    model = tiny_model("mixtral")
    graph = peftc.capture(model, *example_inputs(model))
    options = adapters(peftc.apply(graph, "lora(targets='all-linear', r=8)"))["default"].options
    assert options.target_parameters == ("down_proj", "gate.weight", "gate_up_proj")
    assert options.rank_pattern == ((r".*\.gate_up_proj", 16),)  # w1 and w3 fused: rank 2r


def test_all_linear_on_experts_without_peft_s_tables_is_refused(monkeypatch):
    model = tiny_model("mixtral")
    graph = peftc.capture(model, *example_inputs(model))
    monkeypatch.setitem(sys.modules, "peft.utils.transformers_weight_conversion", None)
    with pytest.raises(OptionError, match="install peft to read them"):
        peftc.apply(graph, "lora(targets='all-linear')")


def test_nf4_says_it_leaves_the_expert_stacks_in_float():
    """nf4 quantizes linear weights; the experts' 3-D stacks stay float, and the pass says so."""
    model = tiny_model("mixtral")
    graph = peftc.capture(model, *example_inputs(model))
    with pytest.warns(
        UserWarning, match="4 mixture-of-experts weight stacks .* stay in their float"
    ):
        result = peftc.Pipeline.parse("nf4").run(graph)
    assert "stay in their float dtype" in result.results[0].report
