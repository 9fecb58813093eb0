"""`fused_loss`: the LM head and cross-entropy of a graph captured with labels as one chunked op,
against the unfused graph (transformers' own loss): the loss and every trainable gradient, with
ignored labels, chunks smaller than the batch, the logits kept or dropped, and under
torch.compile; what it cannot compute is refused by name."""

from __future__ import annotations

import pytest
import torch

import peftc
from peftc.errors import OptionError
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import close, perturb


@pytest.fixture(scope="module")
def with_labels():
    model = tiny_model("llama")
    args, kwargs = example_inputs(model, batch=3, seq=16)
    kwargs["labels"] = args[0].clone()
    kwargs["labels"][0, :5] = -100  # ignored, as padding is
    graph = peftc.capture(model, args, kwargs)
    return perturb(peftc.apply(graph, "freeze, lora(r=4, targets='all-linear')")), args, kwargs


def loss_and_grads(gm, args, kwargs):
    gm.zero_grad(set_to_none=True)
    out = gm(*args, **kwargs)
    out.loss.backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("options", ["chunk=7", "chunk=7, logits=false", "chunk=4096"])
def test_loss_and_gradients_equal_transformers_loss(with_labels, options):
    gm, args, kwargs = with_labels
    expected, expected_grads = loss_and_grads(gm, args, kwargs)
    fused = peftc.apply(gm, f"fused_loss({options})")
    got, grads = loss_and_grads(fused, args, kwargs)
    close(got.loss, expected.loss, "loss")
    for name, grad in expected_grads.items():
        close(grads[name], grad, f"gradient of {name}")
    if "logits=false" in options:
        assert got.logits is None
        assert not any(
            n.target is torch.ops.aten.linear.default and "lm_head" in str(n.args)
            for n in fused.graph.nodes
        )
    else:
        close(got.logits, expected.logits, "logits")


def test_a_trainable_head_gets_its_gradient():
    """With the base trainable (the LM head too), the fused backward computes W's gradient."""
    model = tiny_model("llama")
    args, kwargs = example_inputs(model, batch=2, seq=12)
    kwargs["labels"] = args[0].clone()
    graph = peftc.capture(model, args, kwargs)
    gm = perturb(peftc.apply(graph, "lora(r=4, targets='*.q_proj', freeze_base=false)"))
    assert gm.get_parameter("lm_head.weight").requires_grad
    expected, expected_grads = loss_and_grads(gm, args, kwargs)
    got, grads = loss_and_grads(peftc.apply(gm, "fused_loss(chunk=5)"), args, kwargs)
    close(got.loss, expected.loss, "loss")
    for name, grad in expected_grads.items():
        close(grads[name], grad, f"gradient of {name}", tol=1e-4)


def test_compiles_whole(with_labels):
    gm, args, kwargs = with_labels
    fused = peftc.apply(gm, "fused_loss(chunk=7, logits=false)")
    expected, expected_grads = loss_and_grads(fused, args, kwargs)
    compiled = peftc.compile(fused, backend="aot_eager")
    got, _ = loss_and_grads(compiled, args, kwargs)
    close(got.loss, expected.loss, "compiled loss")
    assert compiled.compiles == 1


def test_a_graph_without_labels_is_left_alone_and_says_why():
    model = tiny_model("llama")
    graph = peftc.capture(model, *example_inputs(model))
    result = peftc.Pipeline.parse("fused_loss").run(graph)
    assert not result.results[0].modified
    assert "capture the model with labels" in result.results[0].report
    with pytest.raises(OptionError, match="chunk must be at least 1"):
        peftc.apply(graph, "fused_loss(chunk=0)")
