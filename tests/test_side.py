"""The `side` pass (QST / LST side tuning): outputs unchanged at init, no base op recorded by
autograd, gradients only in the side network, QST (`nf4, side`), merge, checkpoints, ONNX Runtime,
errors."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import peftc
from peftc.errors import CheckpointError, OptionError, PassError
from peftc.tools.models import example_inputs

from conftest import captured, fill_trainable, loaded, onnx_runtime_gap


def inputs(arch, seed=1):
    args, kwargs = example_inputs(loaded(f"tiny-{arch}").model, batch=3, seq=7, seed=seed)
    kwargs["attention_mask"][0, 5:] = 0
    return args, kwargs


class Recorded(fx.Interpreter):
    """Runs the graph and keeps every base op that autograd recorded and that does not read the side
    network's output (the head after it does)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.recorded = []
        side = next(
            n
            for n in gm.graph.nodes
            if n.op == "call_module" and n.target == "side_network.default"
        )
        self.after_side, todo = set(), [side]
        while todo:
            for user in todo.pop().users:
                if user not in self.after_side:
                    self.after_side.add(user)
                    todo.append(user)

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and "peftc" not in n.meta and n not in self.after_side:
            tensors = out if isinstance(out, (tuple, list)) else [out]
            self.recorded += [
                n.name for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad
            ]
        return out


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_unchanged_at_init_no_base_op_recorded_and_only_side_weights_learn(arch):
    base = peftc.apply(captured(f"tiny-{arch}"), "freeze")
    gm = peftc.apply(captured(f"tiny-{arch}"), "side(reduction_factor=4)")
    args, kwargs = inputs(arch)
    torch.testing.assert_close(gm(*args, **kwargs)[0], base(*args, **kwargs)[0], atol=0, rtol=0)

    run = Recorded(gm)
    out = run.run(*args, *kwargs.values())[0]
    # the base builds no autograd graph; the side output does
    assert run.recorded == [] and out.requires_grad
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # step 1 moves the mix away from 0; step 2 trains the whole side network
        loss = gm(*args, **kwargs)[0].float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in gm.named_parameters() if n.startswith("side_network.default.")}
    assert all(
        gm.get_parameter(n).grad.abs().sum() > 0 for n in trained if n.endswith("upsample.weight")
    )
    assert (gm(*args, **kwargs)[0] - base(*args, **kwargs)[0]).abs().max() > 1e-4


def test_qst_is_nf4_then_side():
    nf4 = peftc.apply(captured("tiny-llama"), "nf4, freeze")
    qst = peftc.apply(captured("tiny-llama"), "nf4, side(reduction_factor=4)")
    # the taps are the blocks' outputs and the mix is at the final norm, NF4 linears or not
    taps = [
        n.args[0].name
        for n in qst.graph.nodes
        if n.meta.get("peftc", {}).get("pass") == "side"
        and n.target == torch.ops.aten.detach.default
    ]
    side = peftc.apply(captured("tiny-llama"), "side(reduction_factor=4)")
    assert taps == [
        n.args[0].name
        for n in side.graph.nodes
        if n.meta.get("peftc", {}).get("pass") == "side"
        and n.target == torch.ops.aten.detach.default
    ]
    args, kwargs = inputs("llama")
    torch.testing.assert_close(qst(*args, **kwargs)[0], nf4(*args, **kwargs)[0], atol=0, rtol=0)
    run = Recorded(qst)
    run.run(*args, *kwargs.values())
    assert run.recorded == []
    assert {n for n, p in qst.named_parameters() if p.requires_grad} == {
        n for n, _ in qst.named_parameters() if n.startswith("side_network.default.")
    }


def test_merge_leaves_it_and_checkpoints_round_trip(tmp_path):
    gm = fill_trainable(
        peftc.apply(captured("tiny-llama"), "side(reduction_factor=4, downsample='linear')")
    )
    args, kwargs = inputs("llama")
    expected = gm(*args, **kwargs)[0]
    merged = peftc.Pipeline.parse("merge").run(gm)
    assert not merged.results[0].modified and "default (side) stays" in merged.results[0].report
    folder = peftc.save_adapter(gm, tmp_path / "side")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = peftc.load_adapter(captured("tiny-llama"), folder)
    torch.testing.assert_close(reloaded(*args, **kwargs)[0], expected, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="does not fit"):
        peftc.load_adapter(captured("tiny-gpt2"), folder)


def test_onnx_export_matches_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    gm = fill_trainable(peftc.apply(captured("tiny-bert"), "side(reduction_factor=4)"))
    assert onnx_runtime_gap(gm, "tiny-bert", tmp_path / "side.onnx") < 1e-4


def test_errors_name_the_problem():
    with pytest.raises(PassError, match="encoder-decoder models are not supported"):
        peftc.apply(captured("tiny-t5"), "side")
    with pytest.raises(PassError, match="no repeated blocks"):
        peftc.apply(
            peftc.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),)), "side"
        )
    with pytest.raises(OptionError, match="larger than the hidden size 64"):
        peftc.apply(captured("tiny-llama"), "side(reduction_factor=128)")
    with pytest.raises(
        OptionError, match="'default' \\(side\\), 'b' \\(side\\) would be active together"
    ):
        peftc.apply(captured("tiny-llama"), "side, side(adapter='b')")
