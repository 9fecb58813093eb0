"""Mixture-of-experts models: peft's all-linear, as peft 0.21 spells it out on each family of
transformers 5 (experts and router as target_parameters where peft's conversion tables say so),
both ways."""

import copy
import sys

import peft
import pytest
import torch

import peftc
from peftc.errors import ExportError, OptionError
from peftc.ir.graph import get_tensor
from peftc.quant import dequantize_nf4, quantize_nf4
from peftc.technique.adapters import adapters
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close, perturb

from bnb_oracle import needs_bnb, quantize


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe", "olmoe", "qwen3moe", "deepseekv3"])
def test_all_linear_is_peft_s_all_linear(arch, tmp_path):
    """The same adapter tensors (names and shapes) as peft's all-linear; peft loads peftc's and
    computes the same; peft's loads in peftc (outputs, gradients, merge, reload)."""
    model = tiny_model(arch)
    args, kwargs = example_inputs(model)
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=8, target_modules="all-linear")
    )
    graph = peftc.apply(peftc.capture(copy.deepcopy(model), args, kwargs), "freeze")
    ours = perturb(peftc.apply(graph, "lora(targets='all-linear', r=8)"))
    shapes = {n: p.shape for n, p in ours.named_parameters() if p.requires_grad}
    expected = {
        n.removeprefix("base_model.model."): p.shape
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert shapes == expected
    peftc.save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        got = ours.eval()(*args, **kwargs)[0]
        close(reloaded(*args, **kwargs, use_cache=False).logits, got, "peft on peftc's adapter")
    config = peft.LoraConfig(r=8, target_modules="all-linear")
    parity = against_peft(model, args, kwargs, config, tmp_path, graph=graph)
    assert parity.merged is not None and parity.reloaded is not None


def test_mixtral_s_all_linear_is_written_out_as_peft_writes_it():
    model = tiny_model("mixtral")
    graph = peftc.capture(model, *example_inputs(model))
    options = adapters(peftc.apply(graph, "lora(targets='all-linear', r=8)"))["default"].options
    assert options.target_parameters == ("down_proj", "gate.weight", "gate_up_proj")
    assert options.rank_pattern == ((r".*\.gate_up_proj", 16),)  # w1 and w3 fused: rank 2r


def test_all_linear_on_experts_without_peft_s_tables_is_refused(monkeypatch):
    model = tiny_model("mixtral")
    graph = peftc.capture(model, *example_inputs(model))
    monkeypatch.setitem(sys.modules, "peft.utils.transformers_weight_conversion", None)
    with pytest.raises(OptionError, match="install peft to read them"):
        peftc.apply(graph, "lora(targets='all-linear')")


@needs_bnb
def test_nf4_quantizes_each_expert_slice_to_bitsandbytes_bytes():
    model = tiny_model("mixtral")
    stacks = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith("_proj") and p.dim() == 3
    }
    graph = peftc.capture(model, *example_inputs(model))
    result = peftc.Pipeline.parse("nf4").run(graph)
    assert f"{len(stacks)} expert stacks" in result.results[0].report
    quantized = result.graph_module
    assert not any(p.dim() == 3 for p in quantized.parameters())  # no float stack left
    for name, weight in stacks.items():
        for e, expert in enumerate(weight):
            packed, state = quantize(expert)
            assert torch.equal(get_tensor(quantized, f"{name}_nf4")[e], packed)
            assert torch.equal(get_tensor(quantized, f"{name}_absmax")[e], state.absmax)
            assert torch.equal(
                get_tensor(quantized, f"{name}_absmax_scale")[e], state.state2.absmax
            )
            assert torch.equal(get_tensor(quantized, f"{name}_absmax_offset")[e], state.offset)


def _nf4_round_trip(model):
    """`model` with the weights nf4 quantizes (every expert slice, every linear but the LM head)
    replaced by their NF4 values: QLoRA's base, for peft."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:
                p.copy_(torch.stack([dequantize_nf4(quantize_nf4(w)) for w in p]))
            elif name.endswith("proj.weight"):
                p.copy_(dequantize_nf4(quantize_nf4(p)))
    return model


def test_qlora_on_experts_is_peft_s_lora_on_the_nf4_weights(tmp_path):
    """nf4, freeze, lora(all-linear) on Mixtral equals peft's all-linear LoRA (experts and router
    as target_parameters) on the same model with NF4-decoded weights: outputs, every gradient,
    checkpoints both ways; merge folds into the stacks (dense and exact, or requantized) and
    unmerges."""
    model = tiny_model("mixtral")
    args, kwargs = example_inputs(model)
    graph = peftc.apply(peftc.capture(copy.deepcopy(model), args, kwargs), "nf4, freeze")
    config = peft.LoraConfig(r=4, target_modules="all-linear")
    parity = against_peft(
        _nf4_round_trip(model), args, kwargs, config, tmp_path, graph=graph, tol=1e-4, merge=False
    )
    ours = parity.graph.eval()
    with torch.no_grad():
        before = ours(*args, **kwargs)["logits"]
        dense = peftc.apply(copy.deepcopy(ours), "merge(dtype='float32')")
        close(dense(*args, **kwargs)["logits"], before, "merged into float32 stacks")
        requantized = peftc.Pipeline.parse("merge(requantize=true, keep=true)").run(ours)
        assert "requantizing to NF4 kept" in requantized.results[0].report
        restored = peftc.apply(requantized.graph_module, "unmerge")
        close(restored(*args, **kwargs)["logits"], before, "unmerged", tol=1e-6)


def test_nf4_experts_false_leaves_the_stacks_and_says_so():
    model = tiny_model("mixtral")
    graph = peftc.capture(model, *example_inputs(model))
    with pytest.warns(UserWarning, match="4 mixture-of-experts weight stacks .* stay in float"):
        result = peftc.Pipeline.parse("nf4(experts=false)").run(graph)
    assert "stay in float" in result.results[0].report


def test_nf4_on_expert_stacks_alone_by_name():
    model = tiny_model("olmoe")
    graph = peftc.capture(model, *example_inputs(model))
    result = peftc.Pipeline.parse("nf4(targets='*.experts.down_proj')").run(graph)
    assert result.results[0].sites == (
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.down_proj",
    )


def test_onnx_refuses_nf4_experts_by_name(tmp_path):
    pytest.importorskip("onnxruntime")
    from peftc.backends import onnx as peftc_onnx

    model = tiny_model("mixtral")
    graph = peftc.apply(peftc.capture(model, *example_inputs(model)), "nf4")
    with pytest.raises(ExportError, match="NF4 expert stack.*merge\\(dtype="):
        peftc_onnx.export(graph, tmp_path / "moe.onnx")
    assert not list(tmp_path.iterdir())


def test_onnx_runs_an_unmerged_expert_adapter_as_eager_does(tmp_path):
    """The grouped matmul is translated (a MatMul per expert on its rows); LoRA on the expert stacks
    and the router stays a separate branch; ONNX Runtime agrees with eager at another shape."""
    ort = pytest.importorskip("onnxruntime")
    from peftc.backends import onnx as peftc_onnx

    model = tiny_model("qwen2moe")
    graph = peftc.capture(model, *example_inputs(model))
    ours = perturb(peftc.apply(graph, "freeze, lora(targets='all-linear', r=4)")).eval()
    exported = peftc_onnx.export(ours, tmp_path / "moe.onnx")
    ids = torch.randint(
        3, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1)
    )
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    session = ort.InferenceSession(str(exported.path))
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask)["logits"]
    close(torch.from_numpy(got), expected, "ONNX Runtime vs eager")


@pytest.mark.parametrize("base", ["freeze", "nf4, freeze"])
def test_multi_lora_serves_expert_adapters_row_by_row(tmp_path, base):
    """Two peft adapters with experts and router as target_parameters (ranks 4 and 8, 2r on the
    fused gate_up): each row of a mixed batch equals peft's model with that row's adapter set, and
    a base row the base model."""
    model = tiny_model("qwen2moe")
    args, kwargs = example_inputs(model)
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, target_modules="all-linear"), adapter_name="a"
    )
    peft_model.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path)  # each adapter in tmp_path/<name>
    graph = peftc.apply(peftc.capture(copy.deepcopy(model), args, kwargs), base)
    for name in ("a", "b"):
        graph = peftc.load_adapter(graph, tmp_path / name, adapter=name)
    served = peftc.apply(graph, "multi_lora")
    ids = torch.randint(
        3, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1)
    )
    mask = torch.ones_like(ids)
    names = ["b", None, "a"]
    with torch.no_grad():
        got = served(ids, attention_mask=mask, adapter_ids=peftc.adapter_ids(served, names))
        single = peftc.apply(graph, "disable_adapters") if base == "freeze" else None
        for row, name in enumerate(names):
            if name is None:
                if single is None:
                    continue  # the NF4 base is not peft's float model
                expected = single(ids[row : row + 1], attention_mask=mask[:1])["logits"][0]
                with peft_model.disable_adapter():
                    close(
                        expected,
                        peft_model(input_ids=ids[row : row + 1], use_cache=False).logits[0],
                        "the base",
                    )
            elif base == "freeze":
                peft_model.set_adapter(name)
                expected = peft_model(input_ids=ids[row : row + 1], use_cache=False).logits[0]
            else:
                one = peftc.apply(graph, f"set_adapter(name='{name}')")
                expected = one(ids[row : row + 1], attention_mask=mask[:1])["logits"][0]
            close(got["logits"][row], expected, f"row {row} ({name or 'base'})")
