"""GLoRA against HF peft 0.21: each parameterization of A/B, C and D/E on a tiny Llama (no biases:
C, D, E are zero buffers) and a biased MLP, random init; outputs, gradients, merge, checkpoints both
ways; two adapters active, switched and merged as peft; refusals."""

import peft
import pytest
import torch
from torch.nn import Sequential
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.glora  # registers the technique
from peftc.errors import CheckpointError, OptionError
from peftc.tools.parity import close, perturb

from zoo import MLP, adapted_paths, build, check, graph


def glora(*targets, **fields):
    return peft.GloraConfig(target_modules=list(targets), **fields)


def bf16_mlp():
    torch.manual_seed(0)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    return MLP().eval().to(torch.bfloat16), (x.to(torch.bfloat16),), {}


CELLS = {
    "llama": ("llama", glora("q_proj", "v_proj", "down_proj", r=4)),
    "mlp": ("mlp", glora("lin0", "lin1", "lin2", r=3)),
    "mlp-vector": ("mlp", glora("lin0", "lin1", config_A_B="vector", config_D_E="vector")),
    "mlp-constant": ("mlp", glora("lin0", "lin2", config_A_B="constant", config_C="vector")),
    "mlp-bias-only": ("mlp", glora("lin0", "lin1", config_A_B="none", config_C="lora", r=2)),
    "mlp-random-init": ("mlp", glora("lin0", "lin1", r=2, init_weights=False)),
    "mlp-bfloat16": (
        bf16_mlp,
        glora("lin0", "lin1", r=2),
        {"autocast_adapter_dtype": False, "tol": 1e-2},
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"glora {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_add_switch_and_merge_as_peft(tmp_path):
    model, (x,), _ = build("mlp")
    theirs = peft.get_peft_model(model, glora("lin0", "lin1", r=2), adapter_name="first")
    theirs.add_adapter("second", glora("lin1", config_A_B="vector", config_D_E="vector"))
    theirs.base_model.set_adapter(["first", "second"])
    perturb(theirs, 0.3).eval().save_pretrained(tmp_path)
    gm = graph("mlp")
    for name in ("first", "second"):  # peft saves adapters not named "default" in their own folder
        gm = peftc.load_adapter(gm, tmp_path / name, adapter=name)
    with torch.no_grad():
        close(gm(x), theirs(x), "both adapters")
        for name in ("first", "second"):
            theirs.base_model.set_adapter(name)
            close(peftc.apply(gm, f"set_adapter(name='{name}')")(x), theirs(x), f"adapter {name}")
        theirs.base_model.set_adapter(["first", "second"])
        theirs.merge_adapter()  # peft folds both from the original weights
        close(peftc.apply(gm, "merge")(x), theirs(x), "both merged")


def test_refusals(tmp_path):
    with pytest.raises(OptionError, match="config_C"):
        peftc.apply(graph("mlp"), "glora(config_C='constant', targets='lin0')")
    gpt2_style = peftc.capture(Sequential(Conv1D(6, 8)), (torch.randn(2, 8),), method="symbolic")
    with pytest.raises(OptionError, match="type transformers.pytorch_utils.Conv1D"):
        peftc.apply(gpt2_style, "glora(targets='0')")
    with pytest.raises(OptionError, match="NonDynamicallyQuantizableLinear"):
        peftc.apply(graph("mha"), "glora(targets='mha.out_proj')")
    peft.get_peft_model(MLP(), glora("lin0", bias="all")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="bias='all'"):
        peftc.load_adapter(graph("mlp"), tmp_path)
    half = peftc.apply(peftc.capture(*bf16_mlp()), "freeze")
    with pytest.raises(OptionError, match="glora on a torch.bfloat16 model"):
        peftc.apply(half, "glora(targets='lin0')")
