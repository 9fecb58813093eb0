"""The nf4 pass: linear weights become NF4 buffers read by `peftc::nf4_linear`; QLoRA on top."""

import copy

import pytest
import torch

import peftc
from peftc.errors import OptionError, TargetError
from conftest import captured, fill_trainable, loaded

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 oracle: pip install bitsandbytes")


def bnb_dequantized_model(model, paths, blocksize=64):
    """The eager model with each weight at `paths` replaced by bitsandbytes' NF4 round trip."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for path in paths:
            weight = reference.get_submodule(path).weight
            packed, state = bnb.functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True,
                                                         quant_type="nf4")
            weight.copy_(bnb.functional.dequantize_4bit(packed, state))
    return reference


@pytest.fixture(scope="module")
def quantized():
    return peftc.apply(captured("tiny-llama"), "nf4")


def test_nf4_graph_equals_bitsandbytes_dequantized_weights(quantized):
    lm = loaded("tiny-llama")
    paths = [s.path for s in peftc.linear_sites(captured("tiny-llama")) if s.path != "lm_head"]
    reference = bnb_dequantized_model(lm.model, paths)
    expected = reference(*lm.args, **lm.kwargs, use_cache=False).logits
    torch.testing.assert_close(quantized(*lm.args, **lm.kwargs).logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, lm.model(*lm.args, **lm.kwargs, use_cache=False).logits)


def test_no_full_precision_copy_survives(quantized):
    sites = peftc.linear_sites(quantized)
    assert [s.path for s in sites if s.kind != "nf4"] == ["lm_head"]
    names = {n for n, _ in quantized.named_parameters()}
    assert not any(n.endswith("proj.weight") for n in names)
    packed = dict(quantized.named_buffers())["model.layers.0.self_attn.q_proj.weight_nf4"]
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 64 // 2
    assert peftc.graph.peftc_meta(quantized)["quantized"]["model.layers.0.mlp.down_proj"] == 128 * 64


def test_qlora_trains_adapters_and_reaches_the_input(quantized):
    lm = loaded("tiny-llama")
    gm = fill_trainable(peftc.apply(quantized, "freeze, lora(r=4, targets='all-linear')"))
    assert all(s.kind == "nf4" for s in peftc.linear_sites(gm) if s.path != "lm_head")
    embeddings = gm.get_parameter("model.embed_tokens.weight")
    embeddings.requires_grad_(True)  # the gradient must flow through every 4-bit op to reach it
    try:
        gm(*lm.args, **lm.kwargs).logits.square().mean().backward()
        assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    finally:
        embeddings.requires_grad_(False)
    lora = [p for n, p in gm.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(not b.requires_grad for b in gm.buffers())


def test_nf4_graph_exports_again(quantized):
    program = peftc.export_program(quantized)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "peftc.nf4_linear.default" in targets and "aten.linear.default" in targets  # the LM head stays
    lm = loaded("tiny-llama")
    torch.testing.assert_close(program.module()(*lm.args, lm.kwargs["attention_mask"]).logits,
                               quantized(*lm.args, **lm.kwargs).logits)


@pytest.mark.parametrize("text, error, message", [
    ("nf4(blocksize=48)", OptionError, "blocksize"),
    ("nf4(blocksize=8192)", OptionError, "blocksize"),
    ("nf4, nf4", OptionError, "already NF4"),
    ("nf4(targets='*.self_attn')", TargetError, "matches no linear site"),
    ("nf4, lora(dora=true, targets='*.q_proj')", OptionError, "NF4-quantized"),
])
def test_bad_nf4_input(text, error, message):
    with pytest.raises(error, match=message):
        peftc.apply(captured("tiny-llama"), text)
