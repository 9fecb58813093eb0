"""`peftc.compile`: the rewritten graph under torch.compile(fullgraph=True) computes what the eager
graph computes (outputs and every trainable gradient) on every kind of technique, compiles once
across batch sizes and lengths, and a mixed multi-adapter batch compiles whole. The breadth runs on
the `aot_eager` backend (tracing and autograd without code generation, seconds a case); Inductor
runs on the LoRA step and the multi-adapter batch. Speed is in benchmarks/bench_compile.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

import peftc
from peftc.backends.compile import CompileError
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import close, perturb

SHAPES = ((2, 16), (3, 9), (4, 21))
PIPELINES = [
    "freeze, lora(r=8, targets='all-linear', dropout=0.1)",
    "freeze, lora(r=8, dora=true, targets='*.q_proj|*.v_proj')",
    "nf4, freeze, lora(r=8, targets='all-linear')",
    "freeze, loha(r=4, targets='*.q_proj|*.v_proj')",
    "freeze, ia3(targets='*.k_proj|*.v_proj|*.down_proj', feedforward_modules=['down_proj'])",
    "freeze, oft(block_size=16, targets='*.q_proj')",
    "freeze, prefix(n=4)",
    "freeze, prompt(n=4)",
    "freeze, adapter(reduction_factor=8)",
    "nf4, side(reduction_factor=8)",
    "freeze, lora(r=4, targets='*.q_proj|*.v_proj'), outline(checkpoint=true)",
]


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, peftc.capture(model, *example_inputs(model))


def step(module, model, batch, seq, device="cpu"):
    """Outputs and the gradient of every trainable tensor of one forward and backward."""
    args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=batch)
    args, kwargs = tree_map(lambda t: t.to(device), (args, kwargs))
    module.zero_grad(set_to_none=True)
    logits = module(*args, **kwargs)["logits"]
    logits.square().mean().backward()
    grads = {
        n.removeprefix("graph_module."): p.grad
        for n, p in module.named_parameters()
        if p.requires_grad
    }
    return logits.detach(), grads


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.split("(")[0] for p in PIPELINES])
def test_compiled_training_equals_eager_and_compiles_once(llama, pipeline):
    model, graph = llama
    gm = perturb(peftc.apply(graph, pipeline))
    gm.train()
    compiled = peftc.compile(gm, backend="aot_eager")
    for batch, seq in SHAPES:
        torch.manual_seed(0)
        expected, expected_grads = step(gm, model, batch, seq)
        torch.manual_seed(0)  # the same dropout masks
        got, grads = step(compiled, model, batch, seq)
        close(got, expected, f"outputs at {batch}x{seq}")
        assert grads.keys() == expected_grads.keys() and grads
        for name, grad in grads.items():
            close(grad, expected_grads[name], f"gradient of {name} at {batch}x{seq}", tol=1e-4)
    assert compiled.compiles == 1


def test_inductor_lora_step_and_mixed_adapter_batch(llama):
    """Inductor's generated code: a LoRA training step with dropout (the same masks as eager from
    the same seed), and three adapters served in one mixed batch (`multi_lora`), each compiled
    once for every shape, equal to eager."""
    model, graph = llama
    lora = "freeze, lora(r=8, targets='all-linear', dropout=0.1)"
    gm = perturb(peftc.apply(graph, lora)).train()
    compiled = peftc.compile(gm)
    for batch, seq in SHAPES:
        torch.manual_seed(batch)
        expected, expected_grads = step(gm, model, batch, seq)
        torch.manual_seed(batch)
        got, grads = step(compiled, model, batch, seq)
        close(got, expected, f"outputs at {batch}x{seq}")
        for name, grad in grads.items():
            close(grad, expected_grads[name], f"gradient of {name}", tol=1e-4)
    assert compiled.compiles == 1
    pipeline = "freeze, lora(adapter='a'), lora(adapter='b', r=4), lora(adapter='c', r=2)"
    served = peftc.apply(perturb(peftc.apply(graph, pipeline)), "multi_lora").eval()
    fast = peftc.compile(served)
    with torch.no_grad():
        for batch, seq in SHAPES:
            args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=batch)
            kwargs["adapter_ids"] = torch.arange(batch) % 4 - 1  # base, a, b, c, ...
            close(fast(*args, **kwargs)["logits"], served(*args, **kwargs)["logits"], "mixed")
    assert fast.compiles == 1


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it on a GPU)"
)
@pytest.mark.parametrize("pipeline", PIPELINES[:3], ids=["lora", "dora", "qlora"])
def test_inductor_on_cuda_equals_eager(pipeline):
    """On a GPU, Inductor generates Triton: a training step, NF4 base included, equals eager
    across shapes with one compile."""
    model = tiny_model("llama").cuda()
    args, kwargs = tree_map(lambda t: t.cuda(), example_inputs(model))
    gm = perturb(peftc.apply(peftc.capture(model, args, kwargs), pipeline)).train()
    compiled = peftc.compile(gm)
    for batch, seq in SHAPES:
        torch.manual_seed(batch)
        expected, expected_grads = step(gm, model, batch, seq, "cuda")
        torch.manual_seed(batch)
        got, grads = step(compiled, model, batch, seq, "cuda")
        close(got, expected, f"outputs at {batch}x{seq}", tol=1e-4)
        for name, grad in grads.items():
            close(grad, expected_grads[name], f"gradient of {name}", tol=1e-3)
    assert compiled.compiles == 1


def test_errors():
    with pytest.raises(CompileError, match="takes a captured graph"):
        peftc.compile(torch.nn.Linear(2, 2))
    model = tiny_model("llama")
    graph = peftc.capture(model, *example_inputs(model))
    with pytest.raises(CompileError, match="mode='max-autotune' is an Inductor option"):
        peftc.compile(graph, backend="aot_eager", mode="max-autotune")
