"""LN tuning against HF peft (LNTuningConfig): outputs, gradients, checkpoints both ways, merge, one
adapter at a time."""

import peft
import pytest
import torch
from torch import nn

import peftc
import peftc.techniques.ln_tuning
from peftc.errors import NotMergeable, OptionError, TargetError
from peftc.technique.adapters import adapters, set_active
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close

from conftest import captured, fill_trainable, loaded
from zoo import check, symbolic

# cell: (model, config, how many norms it tunes)
CELLS = {
    "layernorm": ("layernorm", peft.LNTuningConfig(target_modules=["norm"]), 1),
    "llama": ("llama", peft.LNTuningConfig(target_modules=["input_layernorm", "norm"]), 3),
    "gpt2": ("gpt2", peft.LNTuningConfig(target_modules=["ln_1", "ln_f"]), 3),
    "gpt2-default": ("gpt2", peft.LNTuningConfig(), 5),  # peft's default: ln_1, ln_2, ln_f
    # post-LN; peft has no default for bert
    "bert": (
        "bert",
        peft.LNTuningConfig(target_modules=["LayerNorm"]),
        5,
    ),
}


@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, tmp_path):
    name, config, norms = CELLS[cell]
    parity = check(name, config, tmp_path)
    assert len(adapters(parity.graph)["default"].sites) == norms


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_saved_adapters_load_in_peft(arch, tmp_path):
    model = tiny_model(arch)
    args, kwargs = example_inputs(model)
    text = "freeze, ln_tuning(targets='*.LayerNorm')" if arch == "bert" else "freeze, ln_tuning"
    gm = fill_trainable(peftc.apply(captured(f"tiny-{arch}"), text))
    peftc.save_adapter(gm, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(model, tmp_path)
    close(
        gm(*args, **kwargs)[0],
        reloaded(*args, **kwargs, use_cache=False)[0],
        "peft on peftc's checkpoint",
    )
    again = peftc.load_adapter(peftc.apply(captured(f"tiny-{arch}"), "freeze"), tmp_path)
    assert torch.equal(again(*args, **kwargs)[0], gm(*args, **kwargs)[0])


def test_layer_norms_without_bias_on_a_symbolic_graph(tmp_path):
    model = nn.Sequential(
        nn.Linear(4, 8), nn.LayerNorm(8, bias=False), nn.Linear(8, 8), nn.LayerNorm(8)
    )
    x = torch.randn(3, 4)
    parity = against_peft(
        model,
        (x,),
        {},
        peft.LNTuningConfig(target_modules=["1", "3"]),
        tmp_path,
        graph=symbolic(model, (x,)),
    )
    assert sorted(n for n, p in parity.graph.named_parameters() if p.requires_grad) == [
        "1.ln_tuning_layers.default.weight",
        "3.ln_tuning_layers.default.bias",
        "3.ln_tuning_layers.default.weight",
    ]


def test_merge_copies_into_the_base_and_unmerge_restores_it():
    lm = loaded("tiny-gpt2")
    base = peftc.apply(captured("tiny-gpt2"), "freeze")
    tuned = fill_trainable(peftc.apply(base, "ln_tuning"))
    run = lambda gm: gm(*lm.args, **lm.kwargs).logits  # noqa: E731
    merged = peftc.apply(tuned, "merge")
    assert not peftc.tagged(merged, adapter="default")
    assert torch.equal(
        merged.get_parameter("transformer.ln_f.weight"),
        tuned.get_parameter("transformer.ln_f.ln_tuning_layers.default.weight"),
    )
    torch.testing.assert_close(run(merged), run(tuned), atol=0, rtol=0)
    restored = peftc.apply(merged, "unmerge")
    torch.testing.assert_close(run(restored), run(tuned), atol=0, rtol=0)
    for n, p in base.named_parameters():
        assert torch.equal(restored.get_parameter(n), p), n


def test_one_active_adapter_per_layer_norm():
    lm = loaded("tiny-gpt2")
    run = lambda gm: gm(*lm.args, **lm.kwargs).logits  # noqa: E731
    a = fill_trainable(
        peftc.apply(captured("tiny-gpt2"), "freeze, ln_tuning(adapter='a', targets='*.ln_f')")
    )
    with pytest.raises(
        OptionError, match=r"adapters 'a' \(ln_tuning\), 'b' \(ln_tuning\) would be active together"
    ):
        peftc.apply(a, "ln_tuning(adapter='b', targets='*.ln_f')")
    both = fill_trainable(
        peftc.apply(a, "disable_adapters, ln_tuning(adapter='b', targets='*.ln_f')"), seed=3
    )
    assert peftc.technique.adapters.active_adapters(both) == ["b"]
    with pytest.raises(OptionError, match="one active at a time"):
        set_active(both, ["a", "b"])
    assert torch.equal(run(peftc.apply(both, "set_adapter(name='a')")), run(a))
    with pytest.raises(OptionError, match="would be merged into the base while 'a'"):
        peftc.apply(peftc.apply(both, "merge"), "set_adapter(name='a')")


def test_default_targets_and_refusals(tmp_path):
    tuned = peftc.apply(captured("tiny-llama"), "ln_tuning")  # peft's Llama targets are RMSNorms
    assert len(peftc.technique.adapters.adapters(tuned)["default"].sites) == 5
    with pytest.raises(TargetError, match="matches no module site"):
        peftc.apply(captured("tiny-gpt2"), "ln_tuning(targets='*.nothing')")
    with pytest.raises(OptionError, match="no default targets"):  # as peft, which has no bert entry
        peftc.apply(captured("tiny-bert"), "ln_tuning")


def test_a_target_that_is_no_norm_trains_a_copy_as_peft(tmp_path):
    # peft copies whatever module it is pointed at: a linear, and GPT-2's wte beside its norms
    parity = check("layernorm", peft.LNTuningConfig(target_modules=["lin0", "norm"]), tmp_path)
    assert adapters(parity.graph)["default"].sites == (("norm", "layer_norm"), ("lin0", "module"))
    # GPT-2's wte is tied to its lm_head: peft's copy replaces the embedding only, and merging it
    # would change both, so it stays unmerged
    config = peft.LNTuningConfig(target_modules=["ln_f"], modules_to_save=["wte"])
    parity = check("gpt2", config, tmp_path / "gpt2", merge=False)
    assert adapters(parity.graph)["default"].saved_modules == ("transformer.wte",)
    with pytest.raises(NotMergeable, match="tied to"):
        peftc.apply(parity.graph, "merge")
