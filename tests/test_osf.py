"""OSF against HF peft 0.21: tiny Llama and a small MLP (each factor shape: square, taller, wider;
per-site effective_rank), outputs, projected gradients, merge, checkpoints both ways, two adapters,
and refusals."""

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.osf
from peftc.errors import OptionError
from peftc.tools.parity import close

from zoo import adapted_paths, build, check, graph


def osf(*targets, **fields):
    return peft.OSFConfig(target_modules=list(targets), **fields)


def bfloat16_mlp():
    model, args, kwargs = build("mlp")
    return model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), kwargs


NO_AUTOCAST = {"autocast_adapter_dtype": False, "tol": 1e-2}  # merging rounds W + dW to bfloat16
CELLS = {
    "llama": ("llama", osf("q_proj", "v_proj", "down_proj", effective_rank=4)),
    # lin0 10 -> 20 (U taller), lin1 square, lin2 20 -> 4 (V wider); a fraction and a pattern
    "mlp-patterns": (
        "mlp",
        osf("lin0", "lin1", "lin2", effective_rank=0.5, rank_pattern={"lin1": 3}),
    ),
    "mlp-default-rank": ("mlp", osf("lin0", "lin1", "lin2")),
    "mlp-bfloat16": (bfloat16_mlp, osf("lin0", "lin1", "lin2", effective_rank=3), NO_AUTOCAST),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"osf {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch_as_peft(tmp_path):
    model, args, _ = build("mlp")
    theirs = peft.get_peft_model(model, osf("lin0", "lin1", effective_rank=4))
    theirs.add_adapter("other", osf("lin1", effective_rank=2))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "osf_svd_params" in name:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    gm = peftc.load_adapter(graph("mlp"), tmp_path)
    # one OSF adapter is active at a site at a time (peft runs only the first active one)
    gm = peftc.load_adapter(
        peftc.apply(gm, "disable_adapters"), tmp_path / "other", adapter="other"
    )
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name='{name}')")
        close(ours(*args), theirs(*args), f"adapter {name}")


def symbolic(layer, width):
    return peftc.capture(torch.nn.Sequential(layer), (torch.randn(2, width),), method="symbolic")


def test_refusals():
    with pytest.raises(OptionError, match="is a GPT-2 Conv1D, which peft's OSF does not adapt"):
        peftc.apply(symbolic(Conv1D(6, 4), 4), "osf(targets='0')")
    with pytest.raises(OptionError, match="stores its weight as 'nf4'"):
        peftc.apply(symbolic(torch.nn.Linear(64, 64), 64), "nf4, osf(targets='0')")
    # peft's float32 copies lose its projection hooks there (peftc.techniques.osf, case 6)
    with pytest.raises(OptionError, match="osf on a torch.bfloat16 model"):
        peftc.apply(peftc.capture(*bfloat16_mlp()), "osf(targets='lin0')")
    with pytest.raises(OptionError, match="keeps no direction of 'lin0'"):
        peftc.apply(graph("mlp"), "osf(effective_rank=0, targets='lin0')")
    with pytest.raises(OptionError, match="one active at a time"):
        gm = peftc.apply(graph("mlp"), "osf(targets='lin0'), osf(targets='lin0', adapter='b')")
        peftc.apply(gm, "set_adapter(name=['default', 'b'])")
