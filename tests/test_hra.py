"""HRA against HF peft 0.21: linear and 2-d convolution sites, tiny Llama, Gram-Schmidt, merging,
checkpoints both ways, refusals, and composition with LoRA on one site."""

import copy

import peft
import pytest
import torch

import peftc
import peftc.techniques.hra  # noqa: F401  (registers the pass)
from peftc.errors import OptionError, PeftcError, TargetError
from conftest import captured, loaded
from rotation_parity import check_merge, check_parity, check_reload_in_peft, pair, perturb


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, stride=2)
        self.lin = torch.nn.Linear(16, 12)
        self.out = torch.nn.Linear(12, 5)

    def forward(self, x, img):
        return self.out(torch.relu(self.lin(x))) + self.conv(img).mean((2, 3))[:, :1]


def small_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(3, 16, generator=g), torch.randn(3, 2, 6, 6, generator=g)), {}


CONFIGS = {"r4": dict(r=4), "r3-gram-schmidt": dict(r=3, apply_GS=True), "r2-random-init": dict(r=2, init_weights=False)}


@pytest.mark.parametrize("case", CONFIGS)
def test_small_model_matches_peft(case, tmp_path):
    args, kwargs = small_inputs()
    config = peft.HRAConfig(target_modules=["conv", "lin", "out"], **CONFIGS[case])
    peft_model, gm = pair(Small(), args, kwargs, config, tmp_path)
    check_parity(peft_model, gm, args, kwargs)
    check_merge(gm, args, kwargs)
    check_reload_in_peft(gm, Small(), args, kwargs, tmp_path)


def test_even_r_starts_at_the_identity():
    args, _ = small_inputs()
    gm = peftc.apply(peftc.capture(Small(), args, method="symbolic"), "freeze, hra(r=4, targets='lin|out')")
    torch.testing.assert_close(gm(*args), Small()(*args), atol=1e-6, rtol=0)


def test_tiny_llama_matches_peft_both_ways(tmp_path):
    lm = loaded("tiny-llama")
    config = peft.HRAConfig(r=4, target_modules=["k_proj", "up_proj"])
    graph = peftc.apply(captured("tiny-llama"), "freeze")
    peft_model, gm = pair(copy.deepcopy(lm.model), lm.args, lm.kwargs, config, tmp_path, graph=graph)
    check_parity(peft_model, gm, lm.args, lm.kwargs, {"use_cache": False})
    check_merge(gm, lm.args, lm.kwargs)
    check_reload_in_peft(gm, copy.deepcopy(lm.model), lm.args, lm.kwargs, tmp_path, {"use_cache": False})


def test_hra_and_lora_on_one_site_compose_in_either_order():
    """HRA rewrites W (`weight` stage), LoRA adds beside it: y = (W H) x + b + s B A x, in either order."""
    model = torch.nn.Linear(8, 6)
    x = torch.randn(5, 8)
    hra, lora = "hra(r=2, adapter='h', targets='all-linear')", "lora(r=2, adapter='l', targets='all-linear')"
    first = perturb(peftc.apply(peftc.capture(model, (x,), method="symbolic"), f"freeze, {hra}, {lora}"), 0.3)
    second = peftc.apply(peftc.capture(model, (x,), method="symbolic"), f"freeze, {lora}, {hra}")
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second(x), first(x), atol=0, rtol=0)
    reflected = peftc.apply(first, "set_adapter(name='h')")(x)
    added = peftc.apply(first, "set_adapter(name='l')")(x) - model(x)
    torch.testing.assert_close(first(x), reflected + added, atol=1e-6, rtol=1e-5)
    merged = peftc.apply(first, "merge")
    torch.testing.assert_close(merged(x), first(x), atol=1e-5, rtol=1e-5)


def test_refusals(tmp_path):
    args, _ = small_inputs()
    peft.get_peft_model(Small(), peft.HRAConfig(target_modules=["lin"], bias="hra_only")).save_pretrained(tmp_path)
    with pytest.raises(PeftcError, match="the config sets bias='hra_only'"):
        peftc.load_adapter(peftc.capture(Small(), args, method="symbolic"), tmp_path)
    gm = peftc.capture(Small(), args, method="symbolic")
    with pytest.raises(OptionError, match="r must be a positive integer"):
        peftc.apply(gm, "hra(r=0, targets='lin')")
    with pytest.raises(TargetError):
        peftc.apply(gm, "hra(targets='nothing_here')")
    dilated = peftc.capture(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, dilation=2)), (torch.randn(1, 2, 7, 7),),
                            method="symbolic")
    with pytest.raises(OptionError, match="is a dilated convolution, which peft's HRA does not support"):
        peftc.apply(dilated, "hra(r=2, targets='0')")
