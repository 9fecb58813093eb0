"""AdaMSS against HF peft 0.21: a tiny Llama (no biases) and a small MLP (biases folded in as an
extra column; r above the weight's size; dynamic ranks; random B at init; ASA's options; bfloat16
without autocast): outputs, gradients, merging, checkpoints both ways; two adapters switched;
refusals."""

import peft
import pytest
import torch
from torch.nn import Linear, Sequential
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.techniques.adamss
from peftc.errors import OptionError
from peftc.tools.parity import close, perturb

from zoo import adapted_paths, build, check, graph

pytest.importorskip("sklearn", reason="peft's AdaMSS clusters with scikit-learn's KMeans")


def adamss(*targets, **fields):
    return peft.AdamssConfig(target_modules=list(targets), **fields)


def bfloat16_mlp():
    model, args, kwargs = build("mlp")
    return model.to(torch.bfloat16), tuple(a.to(torch.bfloat16) for a in args), kwargs


ASA = {"use_asa": True, "asa_target_subspaces": 3, "init_warmup": 1, "final_warmup": 5}
CELLS = {
    "llama": (
        "llama",
        adamss("q_proj", "down_proj", r=8, num_subspaces=3, subspace_rank=2),
    ),
    # r=100 is clamped to the weight's size; lin2's 4 outputs make 4 one-row subspaces
    "mlp": ("mlp", adamss("lin0", "lin1", "lin2", num_subspaces=4, subspace_rank=2)),
    "mlp-dynamic": (
        "mlp",
        adamss("lin0", "lin1", r=6, subspace_rank=3, use_dynamic_rank=True, init_weights=None),
    ),
    "mlp-asa": ("mlp", adamss("lin0", "lin1", r=6, num_subspaces=3, **ASA)),
    # the adapter in the model's dtype (peft's default casts A and B to float32); merging rounds
    "mlp-bfloat16": (
        bfloat16_mlp,
        adamss("lin0", "lin1", r=6, num_subspaces=3),
        {"autocast_adapter_dtype": False, "tol": 1e-2},
    ),
}


@pytest.mark.filterwarnings("ignore:adamss. use_asa is set")
@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config, *options = CELLS[cell]
    parity = check(model, config, tmp_path, **dict(*options))
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    print(
        f"adamss {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


def test_two_adapters_switch_as_in_peft(tmp_path):
    model, (x,), _ = build("mlp")
    theirs = peft.get_peft_model(model, adamss("lin0", "lin1", r=6), adapter_name="first")
    theirs.add_adapter("second", adamss("lin1", r=4, num_subspaces=2, random_seed=3))
    perturb(theirs.base_model.model)
    theirs.save_pretrained(tmp_path)
    gm = graph("mlp")
    for name in ("first", "second"):  # peft saves each adapter but "default" in its own folder
        gm = peftc.load_adapter(gm, tmp_path / name, adapter=name)
    with torch.no_grad():
        for name in ("first", "second"):
            theirs.base_model.set_adapter(name)
            close(peftc.apply(gm, f"set_adapter(name='{name}')")(x), theirs(x), f"adapter {name}")
        with theirs.disable_adapter():
            close(peftc.apply(gm, "disable_adapters")(x), theirs(x), "no adapter")


def symbolic(layer, width, dtype=torch.float32):
    model = Sequential(layer).to(dtype)
    return peftc.capture(model, (torch.randn(2, width, dtype=dtype),), method="symbolic")


def test_refusals():
    with pytest.raises(OptionError, match="adapts nn.Linear layers only, not GPT-2's Conv1D"):
        peftc.apply(symbolic(Conv1D(6, 4), 4), "adamss(targets='0')")
    with pytest.raises(OptionError, match="stores its weight as 'nf4'"):
        peftc.apply(symbolic(Linear(64, 64), 64), "nf4, adamss(targets='0')")
    with pytest.raises(OptionError, match="adamss on a torch.bfloat16 model"):
        peftc.apply(symbolic(Linear(8, 8), 8, torch.bfloat16), "adamss(targets='0')")
    with pytest.raises(OptionError, match="init_warmup < final_warmup"):
        peftc.apply(graph("mlp"), "adamss(use_asa=True, init_warmup=9, final_warmup=9)")
    with pytest.warns(UserWarning, match="peftc does not run ASA"):
        peftc.apply(graph("mlp"), "adamss(r=4, use_asa=True, targets='lin0')")
