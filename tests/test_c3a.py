"""C3A against HF peft 0.21: outputs, gradients (peft's mirrored input gradient reaching the
adapters upstream), merging and checkpoints both ways on a small MLP and the tiny Llama; peft's
init; switching between two adapters; refusals."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
import peftc.techniques.c3a
from peftc.errors import OptionError, PeftcError, TargetError
from peftc.tools.parity import perturb

from zoo import MLP, adapted_paths, build, check, graph


def c3a(*targets, **fields):
    return peft.C3AConfig(target_modules=list(targets), **fields)


CELLS = {
    # lin0's kernel trains through lin1's C3A branch: peft's input gradient, not the true one
    "mlp": ("mlp", c3a("lin0", "lin1", block_size=5)),
    "llama": (
        "llama",
        c3a("q_proj", "v_proj", "down_proj", block_size=16, block_size_pattern={"down_proj": 32}),
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    model, config = CELLS[cell]
    parity = check(model, config, tmp_path)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.merged is not None and parity.reloaded is not None
    keys = set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    saved = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    assert saved["block_size"] == config.block_size
    assert saved["block_size_pattern"] == config.block_size_pattern
    for name, kernel in parity.graph.named_parameters():
        if kernel.requires_grad:  # (out/bs, in/bs, bs), bs from the pattern
            theirs = parity.peft.base_model.model.get_parameter(name)
            assert kernel.shape == theirs.shape
    print(
        f"c3a {cell}: output {parity.output:.2g}, gradients {parity.gradient:.2g}, merge "
        f"{parity.merged:.2g}, peft on peftc's checkpoint {parity.reloaded:.2g}"
    )


@pytest.mark.parametrize("init", [False, "xavier_uniform", "kaiming_uniform", "gaussian", True])
def test_init_is_peft_s(init):
    """The same draws as peft's reset_c3a_parameters from the same seed (true: zeros)."""
    base, captured = MLP(), graph("mlp")  # both draw: before the seed
    torch.manual_seed(7)
    model = peft.get_peft_model(base, c3a("lin0", "lin1", block_size=5, init_weights=init))
    torch.manual_seed(7)
    text = f"c3a(block_size=5, targets='lin0|lin1', init_weights={json.dumps(init)})"
    gm = peftc.apply(captured, text)
    for path in ("lin0", "lin1"):
        theirs = model.base_model.model.get_submodule(path).c3a_kernel["default"]
        assert torch.equal(gm.get_parameter(f"{path}.c3a_kernel.default"), theirs)


def test_switching_between_two_adapters(tmp_path):
    module, (x,), _ = build("mlp")
    model = peft.get_peft_model(copy.deepcopy(module), c3a("lin0", "lin1", block_size=5))
    model.add_adapter("other", c3a("lin1", block_size=10, init_weights="gaussian"))
    perturb(model, 0.1)
    model.save_pretrained(tmp_path)
    gm = peftc.load_adapter(graph("mlp"), tmp_path)
    gm = peftc.load_adapter(gm, tmp_path / "other", adapter="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        ours = peftc.apply(gm, f"set_adapter(name='{name}')")(x)
        torch.testing.assert_close(ours, model(x), atol=1e-6, rtol=1e-5)


def test_refusals(tmp_path):
    gm = graph("mlp")
    with pytest.raises(OptionError, match=r"block_size=4 does not divide in_features=10 of 'lin0'"):
        peftc.apply(gm, "c3a(block_size=4, targets='lin0')")
    with pytest.raises(OptionError, match="block_size_pattern must be"):
        peftc.apply(gm, "c3a(block_size=5, targets='lin0', block_size_pattern=[['lin0', 0]])")
    with pytest.raises(TargetError):
        peftc.apply(gm, "c3a(block_size=5, targets='nothing_here')")
    peft.get_peft_model(MLP(), c3a("lin1", block_size=5, bias="all")).save_pretrained(tmp_path)
    with pytest.raises(PeftcError, match="bias='all'"):
        peftc.load_adapter(gm, tmp_path)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    captured = peftc.capture(mha, (x, x, x), {"need_weights": False})
    with pytest.raises(OptionError, match="peft adapts nn.Linear layers only"):
        peftc.apply(captured, "c3a(block_size=4, targets='out_proj')")
