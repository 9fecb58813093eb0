"""Captured attention takes the causal kernel when its mask is causal (as transformers' eager run
on an unpadded batch), the masked kernel otherwise, and plain masked SDPA whenever it is traced."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import peftc
from peftc.ir.attention import SDPA, _is_causal_mask, causal_sdpa, traced_masks_are_causal
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import close

B, H, L, D = 2, 4, 7, 8


def qkv(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=generator) for _ in range(3)]


def test_a_causal_mask_runs_the_causal_kernel_and_a_padded_one_its_mask():
    q, k, v = qkv()
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L)
    assert _is_causal_mask(causal, q, k)
    close(causal_sdpa(q, k, v, causal), SDPA(q, k, v, is_causal=True), "causal", tol=1e-6)
    padded = causal.clone()
    padded[0, :, :, :2] = False
    assert not _is_causal_mask(padded, q, k)
    assert torch.equal(causal_sdpa(q, k, v, padded), SDPA(q, k, v, padded))
    assert not _is_causal_mask(causal[..., :-1], q, k[..., :-1, :])  # not square
    assert not _is_causal_mask(causal.float(), q, k)  # additive masks are left alone


def test_traced_it_is_masked_sdpa_unless_told_the_masks_are_causal():
    q, k, v = qkv()
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L)
    with FakeTensorMode() as mode:
        fq, fk, fmask = mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(causal)
        assert not _is_causal_mask(fmask, fq, fk)
        with traced_masks_are_causal():
            assert _is_causal_mask(fmask, fq, fk)
    compiled = torch.compile(causal_sdpa, fullgraph=True, backend="aot_eager")
    close(compiled(q, k, v, causal), SDPA(q, k, v, causal), "compiled", tol=1e-6)


def test_captured_decoders_use_it_and_match_eager_with_and_without_padding():
    model = tiny_model("llama")
    graph = peftc.capture(model, *example_inputs(model))
    targets = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert causal_sdpa in targets and SDPA not in targets
    args, kwargs = example_inputs(model, batch=3, seq=11, seed=2)
    kwargs["attention_mask"][1, :4] = 0
    with torch.no_grad():
        close(graph(*args, **kwargs)["logits"], model(*args, **kwargs).logits, "padded")
        kwargs["attention_mask"].fill_(1)
        close(graph(*args, **kwargs)["logits"], model(*args, **kwargs).logits, "unpadded")
