"""Adaption prompt against peft's ADAPTION_PROMPT on a tiny Llama (GQA: 4 heads, 2 key/value).

`against_peft` compares gradients by name, and peft's adaption tensors carry no adapter name
(`...self_attn.adaption_gate`), so the same checks are written out here with `close`.
"""

import copy

import peft
import pytest
import torch

import peftc
import peftc.techniques.adaption_prompt  # registers it
from peftc.errors import OptionError, PassError
from peftc.technique.adapters import adapters
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import close, perturb


def run(model, args, kwargs, **extra):
    out = model(*args, **kwargs, **extra)[0]
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    return out


def test_parity_with_peft(tmp_path):
    model = tiny_model("llama")
    args, kwargs = example_inputs(model)
    config = peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")
    theirs = perturb(peft.get_peft_model(copy.deepcopy(model), config), scale=0.5)
    theirs.save_pretrained(tmp_path / "peft")
    gm = peftc.apply(peftc.capture(copy.deepcopy(model), args, kwargs), "freeze")
    ours = peftc.load_adapter(gm, tmp_path / "peft")
    expected = run(theirs, args, kwargs, use_cache=False)
    got = run(ours, args, kwargs)
    assert (expected - model(*args, **kwargs)[0]).abs().max() > 1e-2  # the prompt moves it
    close(got, expected, "outputs")
    grads = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert {f"base_model.model.{n.removesuffix('.default')}" for n in grads} == set(peft_grads)
    for name, p in grads.items():
        expected_grad = peft_grads[f"base_model.model.{name.removesuffix('.default')}"].grad
        close(p.grad, expected_grad, f"gradient of {name}")
    merged = peftc.apply(ours, "merge")  # left in the graph: peft does not merge it either
    assert not adapters(merged)["default"].merged
    with torch.no_grad():
        torch.testing.assert_close(merged(*args, **kwargs)[0], got)
    peftc.save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    with torch.no_grad():
        close(reloaded(*args, **kwargs, use_cache=False)[0], got, "peft on peftc's checkpoint")


def test_adapters_switch_and_zero_init():
    model = tiny_model("llama")
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, kwargs)
    base = gm(*args, **kwargs)[0]
    one = peftc.apply(gm, "freeze, adaption_prompt(adapter_len=2, adapter_layers=2)")
    close(one(*args, **kwargs)[0], base, "zero gate")  # the zero gate keeps the base outputs
    perturb(one, scale=0.5)
    first = one(*args, **kwargs)[0]
    # one active at a time: the second is added with the first disabled
    both = peftc.apply(
        one, "disable_adapters, adaption_prompt(adapter_len=4, adapter_layers=1, adapter='b')"
    )
    close(both(*args, **kwargs)[0], base, "zero gate of 'b'")
    back = peftc.apply(both, "set_adapter(name='default')")
    torch.testing.assert_close(back(*args, **kwargs)[0], first)


def test_refusals():
    model = tiny_model("llama")
    gm = peftc.capture(model, *example_inputs(model))
    with pytest.raises(PassError, match="adapter_layers=3"):
        peftc.apply(gm, "adaption_prompt(adapter_layers=3)")
    with pytest.raises(OptionError, match="layers_to_transform is not supported"):
        peftc.apply(gm, "adaption_prompt(adapter_layers=1, layers_to_transform=[0])")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(PassError, match="GPT-2's fused c_attn"):
        peftc.apply(
            peftc.capture(gpt2, *example_inputs(gpt2)),
            "adaption_prompt(adapter_layers=1, target_modules='attn')",
        )
