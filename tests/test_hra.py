"""HRA against HF peft 0.21: linear and 2-d convolution sites, tiny Llama, Gram-Schmidt, merging,
checkpoints both ways, refusals, and composition with LoRA on one site."""

import peft
import pytest
import torch

import peftc
import peftc.techniques.hra
from peftc.errors import OptionError, PeftcError, TargetError
from peftc.tools.parity import perturb

from zoo import adapted_paths, check


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


def small():
    return Small(), *small_inputs()


def hra(*targets, **fields):
    return peft.HRAConfig(target_modules=list(targets), **fields)


FAR = {"scale": 0.3}  # reflections far from the identity
CELLS = {
    "mlp": ("mlp", hra("lin0", "lin1", r=2)),
    "llama": ("llama", hra("q_proj", "v_proj", r=4)),
    "llama-k_proj-up_proj": ("llama", hra("k_proj", "up_proj", r=4), FAR),
    "small-r4": (small, hra("conv", "lin", "out", r=4), FAR),
    "small-r3-gram-schmidt": (small, hra("conv", "lin", "out", r=3, apply_GS=True), FAR),
    "small-r2-random-init": (small, hra("conv", "lin", "out", r=2, init_weights=False), FAR),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    options = dict(*options)
    parity = check(model, config, tmp_path, **options)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.reloaded is not None
    assert (parity.merged is not None) == options.get("merge", True)


def test_even_r_starts_at_the_identity():
    args, _ = small_inputs()
    gm = peftc.apply(
        peftc.capture(Small(), args, method="symbolic"), "freeze, hra(r=4, targets='lin|out')"
    )
    torch.testing.assert_close(gm(*args), Small()(*args), atol=1e-6, rtol=0)


def test_hra_and_lora_on_one_site_compose_in_either_order():
    """HRA rewrites W (`weight` stage), LoRA adds beside it: y = (W H) x + b + s B A x, in either
    order."""
    model = torch.nn.Linear(8, 6)
    x = torch.randn(5, 8)
    hra, lora = (
        "hra(r=2, adapter='h', targets='all-linear')",
        "lora(r=2, adapter='l', targets='all-linear')",
    )
    first = perturb(
        peftc.apply(peftc.capture(model, (x,), method="symbolic"), f"freeze, {hra}, {lora}"), 0.3
    )
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
    peft.get_peft_model(
        Small(), peft.HRAConfig(target_modules=["lin"], bias="hra_only")
    ).save_pretrained(tmp_path)
    with pytest.raises(PeftcError, match="the config sets bias='hra_only'"):
        peftc.load_adapter(peftc.capture(Small(), args, method="symbolic"), tmp_path)
    gm = peftc.capture(Small(), args, method="symbolic")
    with pytest.raises(OptionError, match="r must be a positive integer"):
        peftc.apply(gm, "hra(r=0, targets='lin')")
    with pytest.raises(TargetError):
        peftc.apply(gm, "hra(targets='nothing_here')")
    dilated = peftc.capture(
        torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, dilation=2)),
        (torch.randn(1, 2, 7, 7),),
        method="symbolic",
    )
    with pytest.raises(
        OptionError, match="is a dilated convolution, which peft's HRA does not support"
    ):
        peftc.apply(dilated, "hra(r=2, targets='0')")
