"""The Triton backend against the eager graph it replaces: kernels, the fused linear's output and
every gradient, the lowering pass on real architectures. Without a GPU the kernels run on Triton's
CPU interpreter (TRITON_INTERPRET=1, set in conftest.py before they are imported); shapes stay
small."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftc
from peftc.backends.triton import ops
from peftc.errors import PassError
from peftc.ir.graph import peftc_meta
from peftc.quant.nf4 import dequantize_nf4, quantize_nf4

from conftest import captured, loaded

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative to the largest magnitude
TOLERANCE = {
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert error <= TOLERANCE[dtype] * max(scale, 1.0), (error, scale)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape, blocksize", [((48, 40), 64), ((33, 17), 128)])
def test_dequantize_equals_the_reference_decoder(shape, blocksize, double_quant):
    torch.manual_seed(0)
    state = quantize_nf4(torch.randn(shape), blocksize=blocksize, double_quant=double_quant)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ours = ops.dequantize(
            state.packed.to(DEVICE),
            state.absmax.to(DEVICE),
            None if state.absmax_scale is None else state.absmax_scale.to(DEVICE),
            None if state.offset is None else state.offset.to(DEVICE),
            shape,
            blocksize,
            dtype,
        ).cpu()
        expected = dequantize_nf4(state, dtype)
        if dtype == torch.bfloat16 and ops.interpreting():
            # the interpreter truncates float32 -> bfloat16 where GPUs round to nearest even: one
            # unit in the last place
            truncated = (
                dequantize_nf4(state, torch.float32)
                .view(torch.int32)
                .bitwise_and(-65536)
                .view(torch.float32)
            )
            expected = truncated.to(torch.bfloat16)
        assert torch.equal(ours, expected)


def eager_linear(x, W, b, A, B, scale, mask=None):
    """peft's LoRA linear: base + lora_B(lora_A(dropout(x))) * scale."""
    dropped = x if mask is None else x * mask.view_as(x).to(x.dtype)
    out = F.linear(x, W, b)
    return out + F.linear(F.linear(dropped, A), B) * scale if A is not None else out


def operands(dtype, nf4: bool, bias: bool, lora: bool, rows=(3, 7), features=(70, 45), r=5, seed=0):
    """x, fused-op weight arguments and the dense W they stand for; LoRA tensors require grad."""
    torch.manual_seed(seed)
    (in_features, out_features) = features
    x = torch.randn(*rows, in_features, device=DEVICE, dtype=dtype, requires_grad=True)
    W = torch.randn(out_features, in_features) / in_features**0.5
    if nf4:
        state = quantize_nf4(W, blocksize=64, double_quant=True)
        args = [None, state.packed, state.absmax, state.absmax_scale, state.offset]
        args = [None] + [t.to(DEVICE) for t in args[1:]]
        W = dequantize_nf4(state, dtype)
    else:
        W = W.to(dtype)
        args = [W.to(DEVICE), None, None, None, None]
    b = torch.randn(out_features, device=DEVICE, dtype=dtype, requires_grad=True) if bias else None
    A = (
        (
            torch.randn(r, in_features, device=DEVICE, dtype=dtype) / in_features**0.5
        ).requires_grad_()
        if lora
        else None
    )
    B = torch.randn(out_features, r, device=DEVICE, dtype=dtype).requires_grad_() if lora else None
    return x, args, W.to(DEVICE), b, A, B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_fused_linear_output_and_gradients_match_eager(dtype, nf4, bias):
    x, weight_args, W, b, A, B = operands(dtype, nf4, bias, lora=True)
    scale = 0.75
    y, xa = ops.triton_linear(x, *weight_args, b, A, B, scale, 0.0, 0, W.shape[0], W.shape[1], 64)
    expected = eager_linear(x, W, b, A, B, scale)
    close(y, expected, dtype)
    assert xa.shape == (21, 5)  # the rank-r product kept for backward, rows flattened
    grad = torch.randn_like(y)
    wrt = [t for t in (x, b, A, B) if t is not None]
    for ours, theirs in zip(
        torch.autograd.grad(y, wrt, grad), torch.autograd.grad(expected, wrt, grad), strict=True
    ):
        close(ours, theirs, dtype)


def test_bare_nf4_linear_and_a_frozen_input():
    x, weight_args, W, b, _, _ = operands(
        torch.float32, True, True, lora=False, rows=(2, 19), features=(130, 66)
    )
    y, xa = ops.triton_linear(
        x.detach(), *weight_args, b.detach(), None, None, 1.0, 0.0, 0, 66, 130, 64
    )
    close(y, F.linear(x, W, b))
    assert xa.numel() == 0 and not y.requires_grad
    y = ops.triton_linear(x, *weight_args, None, None, None, 1.0, 0.0, 0, 66, 130, 64)[0]
    close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(F.linear(x, W).sum(), x)[0])


def test_dropout_is_one_mask_in_forward_and_backward():
    """The kernels regenerate the mask from the seed wherever they read the dropped x."""
    x, weight_args, W, b, A, B = operands(torch.float32, True, False, lora=True)
    p, seed = 0.3, 1234
    mask = ops.dropout_mask(21, 70, seed, p, DEVICE)
    assert (
        mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
        and 0.2 < (mask == 0).float().mean() < 0.4
    )
    y, _ = ops.triton_linear(x, *weight_args, b, A, B, 2.0, p, seed, 45, 70, 64)
    expected = eager_linear(x, W, b, A, B, 2.0, mask)
    close(y, expected)
    grad = torch.randn_like(y)
    for ours, theirs in zip(
        torch.autograd.grad(y, (x, A, B), grad),
        torch.autograd.grad(expected, (x, A, B), grad),
        strict=True,
    ):
        close(ours, theirs)
    assert not torch.equal(ops.dropout_mask(21, 70, seed + 1, p, DEVICE), mask)


def test_only_x_and_the_rank_r_product_are_saved():
    x, weight_args, W, b, A, B = operands(torch.float32, True, True, lora=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, xa = ops.triton_linear(x, *weight_args, b.detach(), A, B, 1.0, 0.0, 0, 45, 70, 64)
    weights = [A, B, *weight_args]
    activations = [t for t in saved if t is not None and not any(t is w for w in weights)]
    # no dequantized weight, no dropped x
    assert sorted(t.shape for t in activations) == sorted([x.shape, xa.shape])


def lowered_pair(model: str, pipeline: str):
    """(eager, lowered) graphs of `pipeline` on a tiny model, LoRA B nonzero so the branch
    counts."""
    eager = peftc.apply(captured(model), pipeline)
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    return eager, peftc.apply(eager, "triton")


def first_output(out):
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


@pytest.mark.parametrize(
    "model, pipeline, sites",
    [
        ("tiny-llama", "nf4, freeze, lora(r=4, targets='all-linear')", 14),
        ("tiny-gpt2", "freeze, lora(r=4, targets='all-linear')", 8),  # Conv1D: stored transposed
        ("tiny-bert", "nf4, freeze, lora(r=4)", 12),  # LoRA on query/value, 8 bare NF4 linears
    ],
)
def test_lowered_graph_matches_eager_in_outputs_and_every_gradient(model, pipeline, sites):
    eager, lowered = lowered_pair(model, pipeline)
    assert len(peftc_meta(lowered)["lowered"]["sites"]) == sites
    assert not any(n.target == torch.ops.peftc.nf4_linear.default for n in lowered.graph.nodes)
    inputs = loaded(model)
    eager.eval(), lowered.eval()  # the models' own dropout off; LoRA dropout is 0 here
    expected = first_output(eager(*inputs.args, **inputs.kwargs))
    ours = first_output(lowered(*inputs.args, **inputs.kwargs))
    close(ours, expected)
    grad = torch.randn_like(expected)
    names = [n for n, p in eager.named_parameters() if p.requires_grad]
    assert names == [n for n, p in lowered.named_parameters() if p.requires_grad]
    theirs = torch.autograd.grad(
        expected,
        [eager.get_parameter(n) for n in names],
        grad,
        allow_unused=True,
        materialize_grads=True,
    )
    mine = torch.autograd.grad(
        ours,
        [lowered.get_parameter(n) for n in names],
        grad,
        allow_unused=True,
        materialize_grads=True,
    )
    for name, a, b in zip(names, mine, theirs, strict=True):
        assert b.abs().max() > 0 or "pooler" in name, name
        close(a, b)


def test_several_adapters_and_what_is_left_alone():
    two = (
        "freeze, lora(adapter='attn', r=4, targets='*.q_proj|*.v_proj'), lora(adapter='mlp', r=2, "
        "targets='*.mlp.*')"
    )
    eager, lowered = lowered_pair("tiny-llama", two + ", nf4(targets='*.k_proj|*.o_proj')")
    report = peftc_meta(lowered)["history"][-1]["report"]
    assert report.startswith("lowered 14 sites (10 LoRA, 4 bare NF4)"), report
    inputs = loaded("tiny-llama")
    close(
        lowered(*inputs.args, **inputs.kwargs).logits, eager(*inputs.args, **inputs.kwargs).logits
    )

    mixed = peftc.apply(
        captured("tiny-llama"),
        "freeze, lora(r=4, targets='*.q_proj'), lora(adapter='d', r=4, dora=true, "
        "targets='*.v_proj'), lora(adapter='twice', r=2, targets='*.q_proj')",
    )
    report = peftc_meta(peftc.apply(mixed, "triton"))["history"][-1]["report"]
    assert "2 DoRA sites" in report and "2 sites with several adapters" in report, report
    untouched = peftc.apply(captured("tiny-llama"), "freeze, ia3")
    assert (
        "no LoRA linear site and no NF4 linear to lower; left: "
        in peftc_meta(peftc.apply(untouched, "triton"))["history"][-1]["report"]
    )


def test_lowering_is_last_and_says_how_to_run_without_a_gpu(monkeypatch):
    _, lowered = lowered_pair("tiny-llama", "freeze, lora(r=4)")
    with pytest.raises(PassError, match="lowered by 'triton'.*before 'triton'"):
        peftc.apply(lowered, "merge")
    with pytest.raises(PassError, match="already lowered"):
        peftc.apply(lowered, "triton")
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    eager = peftc.apply(captured("tiny-llama"), "freeze, lora(r=4)")
    with pytest.raises(PassError, match="TRITON_INTERPRET=1.*fallback=true"):
        peftc.apply(eager, "triton")
    kept = peftc.apply(eager, "triton(fallback=true)")
    assert "graph left unchanged (fallback=true)" in peftc_meta(kept)["history"][-1]["report"]
    assert "lowered" not in peftc_meta(kept)


def test_qlora_trains_end_to_end_like_eager_and_exports():
    """Three AdamW steps in train mode: the lowered loss curve is eager's; the graph exports with
    the fused op."""
    inputs = loaded("tiny-llama")
    ids = inputs.args[0]
    curves = {}
    for name, extra in (("eager", ""), ("triton", ", triton")):
        torch.manual_seed(0)
        gm = peftc.apply(
            captured("tiny-llama"), f"nf4, freeze, lora(r=4, targets='all-linear'){extra}"
        )
        gm.train()
        optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for _ in range(3):
            logits = gm(ids, attention_mask=torch.ones_like(ids)).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves[name] = curve
    assert curves["triton"][-1] < curves["triton"][0]
    assert curves["triton"] == pytest.approx(curves["eager"], rel=1e-4)
    program = torch.export.export(gm.eval(), (ids,), {"attention_mask": torch.ones_like(ids)})
    assert sum(n.target == torch.ops.peftc.triton_linear.default for n in program.graph.nodes) == 14


def test_compile_option_compiles_the_lowered_forward():
    class TwoLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    gm = peftc.apply(
        peftc.capture(TwoLinears(), (torch.randn(2, 24),)),
        "nf4, freeze, lora(r=4, targets='up|down')",
    )
    compiled = peftc.apply(gm, "triton(compile=true)")
    assert "torch.compile" in peftc_meta(compiled)["history"][-1]["report"]
    x = torch.randn(3, 24)
    close(compiled(x), gm(x))
