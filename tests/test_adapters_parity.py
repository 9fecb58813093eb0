"""LoRA, DoRA, LoHa and LoKr against HF peft: same outputs and gradients from the same weights.

peft's adapters get random non-zero weights (B included), are saved with `save_pretrained`,
and loaded into peftc with `peftc.load_adapter`, so each case also checks peft's checkpoint format.
"""

import copy

import peft
import pytest
import torch

import peftc
from peftc.tools.models import example_inputs, tiny_model
from conftest import fill_trainable, loaded, requires_minilm


def eager_kwargs(model, kwargs):
    return kwargs if model.config.model_type in ("bert", "roberta") else {**kwargs, "use_cache": False}


def loss(output):
    return sum(v.square().mean() for v in output.values() if isinstance(v, torch.Tensor))


def build_pair(model, args, kwargs, config, tmp_path):
    """(peft model, peftc module) with identical adapter weights."""
    base = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, config)
    fill_trainable(peft_model, seed=1)
    peft_model.save_pretrained(tmp_path)
    gm = peftc.apply(peftc.capture(base, args, kwargs), "freeze")
    return peft_model, peftc.load_adapter(gm, tmp_path)


def assert_same_output(got, expected):
    # peftc and peft sum in different orders (LoKr: vec(W1 X W2^T) against peft's kron(W1, W2)), so
    # float32 rounding differs with the CPU and BLAS path: up to ~3e-6 of the largest output after
    # MiniLM's six layers. So the bound is 1e-5 of the output scale, not a fixed 1e-5; the adapters
    # here move outputs by 5e-3 of that scale or more, so a wrong branch still fails by far.
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)


def assert_parity(peft_model, gm, args, kwargs):
    expected_out = peft_model(*args, **eager_kwargs(peft_model.base_model.model, kwargs))
    got_out = gm(*args, **kwargs)
    expected, got = expected_out[0], got_out[0]
    assert_same_output(got, expected)
    loss(expected_out).backward()
    loss(got_out).backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n.replace(".default", ""): p for n, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and ours
    for name, p in ours.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-6, rtol=1e-4)
    base_out = peftc.technique.adapters.disable(peftc.ir.graph.clone(gm))(*args, **kwargs)[0]
    assert (base_out - got).abs().max() > 1e-3  # the adapter really changes the output


# Llama, GPT-2 and BERT cases of LoRA, DoRA, LoHa and LoKr are cells of tests/test_matrix.py; these add OPT,
# rsLoRA and LoKr's factorisations.
CASES = {
    "bert-rslora-dora": ("bert", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                                                 use_rslora=True, use_dora=True)),
    "opt-lora": ("opt", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"])),
    "opt-loha": ("opt", peft.LoHaConfig(r=2, alpha=4, target_modules=["k_proj", "fc2"])),
    "opt-lokr-decomposed": ("opt", peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "fc1"], decompose_both=True,
                                                   decompose_factor=4)),
}


@pytest.mark.parametrize("case", CASES)
def test_parity_with_peft(case, tmp_path):
    arch, config = CASES[case]
    model = tiny_model(arch)
    args, kwargs = example_inputs(model, batch=3, seq=9, seed=2)
    peft_model, gm = build_pair(model, *example_inputs(model), config, tmp_path)
    assert_parity(peft_model, gm, args, kwargs)


@requires_minilm
@pytest.mark.parametrize("config", [
    peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], use_dora=True),
    peft.LoKrConfig(r=8, alpha=8, target_modules=["intermediate.dense", "output.dense"]),
], ids=["lora", "dora", "lokr"])
def test_parity_with_peft_on_real_minilm(config, tmp_path):
    lm = loaded("minilm")
    model = copy.deepcopy(lm.model)
    peft_model, gm = build_pair(model, lm.args, lm.kwargs, config, tmp_path)
    assert_parity(peft_model, gm, lm.args, lm.kwargs)


@pytest.mark.parametrize("config", [
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], use_dora=True),
    peft.LoHaConfig(r=4, alpha=8, target_modules=["gate_proj"]),
    peft.LoKrConfig(r=4, alpha=8, target_modules=["v_proj"]),
], ids=["lora", "dora", "loha", "lokr"])
def test_saved_adapters_load_in_peft(config, tmp_path):
    model = tiny_model("llama")
    args, kwargs = example_inputs(model)
    _, gm = build_pair(copy.deepcopy(model), args, kwargs, config, tmp_path / "from_peft")
    peftc.save_adapter(gm, tmp_path / "from_peftc")
    reloaded = peft.PeftModel.from_pretrained(model, tmp_path / "from_peftc")
    assert_same_output(gm(*args, **kwargs).logits, reloaded(*args, **kwargs, use_cache=False).logits)
