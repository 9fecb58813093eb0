"""The nf4 pass: linear weights become NF4 buffers read by `peftc::nf4_linear`; QLoRA on top."""

import copy

import pytest
import torch

import peftc
from peftc.errors import OptionError, TargetError

from conftest import captured, fill_trainable, loaded

pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is the NF4 oracle: pip install bitsandbytes"
)
from bnb_oracle import dequantized_model, linear4bit_model


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_nf4_linear_in_row_tiles_equals_the_dense_weight(monkeypatch, bias):
    """Large weights are decoded and multiplied a tile of rows at a time; the tiles start on block
    boundaries even when a row is not a whole number of blocks (100 columns, blocks of 64)."""
    from peftc.quant import nf4, ops

    monkeypatch.setattr(ops, "_TILE_VALUES", 1600)  # 16 rows a tile: 5 tiles, the last one short
    g = torch.Generator().manual_seed(0)
    state = nf4.quantize_nf4(torch.randn(70, 100, generator=g), blocksize=64, double_quant=True)
    b = torch.randn(70, generator=g, requires_grad=True) if bias else None
    x = torch.randn(2, 3, 100, generator=g, requires_grad=True)
    y = torch.ops.peftc.nf4_linear(
        x, state.packed, state.absmax, state.absmax_scale, state.offset, b, 70, 100, 64
    )
    dense = nf4.dequantize_nf4(state)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_() if bias else None
    y_ref = torch.nn.functional.linear(x_ref, dense, b_ref)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad)


@pytest.fixture(scope="module")
def quantized():
    return peftc.apply(captured("tiny-llama"), "nf4")


def test_nf4_graph_equals_bitsandbytes_dequantized_weights(quantized):
    lm = loaded("tiny-llama")
    paths = [s.path for s in peftc.linear_sites(captured("tiny-llama")) if s.path != "lm_head"]
    reference = dequantized_model(lm.model, paths)
    expected = reference(*lm.args, **lm.kwargs, use_cache=False).logits
    torch.testing.assert_close(quantized(*lm.args, **lm.kwargs).logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, lm.model(*lm.args, **lm.kwargs, use_cache=False).logits)


def test_no_full_precision_copy_survives(quantized):
    sites = peftc.linear_sites(quantized)
    assert [s.path for s in sites if s.storage != "nf4"] == ["lm_head"]
    names = {n for n, _ in quantized.named_parameters()}
    assert not any(n.endswith("proj.weight") for n in names)
    packed = dict(quantized.named_buffers())["model.layers.0.self_attn.q_proj.weight_nf4"]
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 64 // 2
    assert (
        peftc.ir.graph.peftc_meta(quantized)["quantized"]["model.layers.0.mlp.down_proj"]
        == 128 * 64
    )


def test_qlora_trains_adapters_and_reaches_the_input(quantized):
    lm = loaded("tiny-llama")
    gm = fill_trainable(peftc.apply(quantized, "freeze, lora(r=4, targets='all-linear')"))
    assert all(s.storage == "nf4" for s in peftc.linear_sites(gm) if s.path != "lm_head")
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
    # the LM head stays
    assert "peftc.nf4_linear.default" in targets and "aten.linear.default" in targets
    lm = loaded("tiny-llama")
    torch.testing.assert_close(
        program.module()(*lm.args, lm.kwargs["attention_mask"]).logits,
        quantized(*lm.args, **lm.kwargs).logits,
    )


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("nf4(blocksize=48)", OptionError, "blocksize"),
        ("nf4(blocksize=8192)", OptionError, "blocksize"),
        ("nf4, nf4", OptionError, "already NF4"),
        ("nf4(targets='*.self_attn')", TargetError, "matches no linear site"),
    ],
)
def test_bad_nf4_input(text, error, message):
    with pytest.raises(error, match=message):
        peftc.apply(captured("tiny-llama"), text)


class _Residual(torch.nn.Module):
    """One linear feeding the next, a third and the output (fan-out and a skip around a chain)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (
            torch.nn.Linear(16, 16),
            torch.nn.Linear(16, 16, bias=False),
            torch.nn.Linear(16, 4),
        )

    def forward(self, x):
        h = self.a(x)
        return self.c(self.b(h) + h), self.c(h)


@pytest.mark.parametrize("method", ["symbolic", "export"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.Sequential(
            torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        ),
        lambda: torch.nn.Sequential(
            torch.nn.Linear(16, 16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 16),
            torch.nn.Linear(16, 4),
        ),
        _Residual,
    ],
    ids=["chain", "relu-then-chain", "fan-out"],
)
def test_nf4_on_linears_feeding_linears(method, make):
    """Each site's input may be the previous site's output, which the pass has just replaced."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 16)
    gm = peftc.apply(peftc.capture(model, (x,), method=method), "nf4")
    targets = {str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module")}
    assert "peftc.nf4_linear.default" in targets and not targets & {
        "aten.linear.default",
        "0",
        "a",
        "b",
        "c",
    }
    reference = dequantized_model(
        model, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    )
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(gm(x), reference(x), atol=1e-6, rtol=1e-6)


def test_merge_into_nf4_requantized_or_dense(quantized):
    lm = loaded("tiny-llama")
    qlora = peftc.apply(quantized, "freeze, lora(r=4, targets='*.q_proj|*.down_proj')")
    with torch.no_grad():  # a large update (||dW||/||W|| about 0.1+) mostly survives requantization
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    expected = qlora(*lm.args, **lm.kwargs).logits
    with pytest.raises(OptionError, match="requantizing would keep .* of it"):
        peftc.apply(qlora, "merge")
    dense = peftc.apply(qlora, "merge(dtype='float32')")
    assert {s.path: s.op for s in peftc.linear_sites(dense)}[
        "model.layers.0.self_attn.q_proj"
    ] == "aten.linear"
    torch.testing.assert_close(dense(*lm.args, **lm.kwargs).logits, expected, atol=1e-4, rtol=1e-4)
    half = peftc.apply(qlora, "merge(dtype='float16')")
    assert half.get_parameter("model.layers.0.self_attn.q_proj.weight").dtype == torch.float16
    torch.testing.assert_close(half(*lm.args, **lm.kwargs).logits, expected, atol=5e-3, rtol=5e-3)
    requantized = peftc.apply(qlora, "merge(requantize=true)")
    report = requantized.meta["peftc"]["history"][-1]["report"]
    assert "requantizing to NF4 kept" in report
    assert all(s.storage == "nf4" for s in peftc.linear_sites(requantized) if s.path != "lm_head")
    error = (requantized(*lm.args, **lm.kwargs).logits - expected).abs().max()
    base_gap = (quantized(*lm.args, **lm.kwargs).logits - expected).abs().max()
    assert error < base_gap  # the requantized merge keeps most of a large update
    restored = peftc.apply(requantized, "unmerge")  # the original 4-bit bytes were kept: exact
    torch.testing.assert_close(
        restored(*lm.args, **lm.kwargs).logits, qlora(*lm.args, **lm.kwargs).logits, atol=0, rtol=0
    )
    with pytest.raises(
        OptionError, match="merged into a dense weight; that merge cannot be undone"
    ):
        peftc.apply(dense, "unmerge")
    with pytest.raises(OptionError, match="not both"):
        peftc.Pipeline.parse("merge(requantize=true, dtype='float16')")


def test_small_updates_vanish_when_requantized(quantized):
    qlora = peftc.apply(quantized, "freeze, lora(r=4, targets='*.q_proj')")
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    report = peftc.apply(qlora, "merge(requantize=true)").meta["peftc"]["history"][-1]["report"]
    assert 'prefer merge(dtype="float16")' in report


@pytest.mark.parametrize("double_quant, limit", [(True, 4.13), (False, 4.51)])
def test_summary_reports_bits_per_quantized_weight(double_quant, limit):
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)
    )
    gm = peftc.capture(model, (torch.randn(2, 1024),))
    stats = peftc.summary(peftc.apply(gm, f"nf4(double_quant={str(double_quant).lower()})"))
    assert stats.quantized_weights == 1024 * 1024 + 1024 * 512
    # counted as frozen parameters, as transformers counts them; the biases stay float32 and
    # trainable (nothing froze them)
    assert stats.total == 1024 * 1024 + 1024 * 512 + 1024 + 512
    assert (stats.frozen, stats.trainable) == (stats.quantized_weights, 1024 + 512)
    assert 4.0 < stats.quantized_bits_per_weight <= limit
    assert f"{stats.quantized_bits_per_weight:.3f} bits each" in str(stats)


@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_qlora_matches_peft_on_bitsandbytes_linear4bit(tmp_path, monkeypatch, dora):
    """QLoRA, and DoRA on the 4-bit base (peft dequantizes it for the weight norm; so does
    peftc)."""
    import peft

    from peftc.tools.models import example_inputs, tiny_model
    from peftc.tools.parity import against_peft, close

    model = tiny_model("llama")
    args, kwargs = example_inputs(model)
    gm = peftc.apply(peftc.capture(copy.deepcopy(model), args, kwargs), "nf4, freeze")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=dora)
    parity = against_peft(
        model,
        args,
        kwargs,
        config,
        tmp_path,
        graph=gm,
        prepare=lambda m: linear4bit_model(m, monkeypatch),
        merge=False,
    )
    qlora = parity.graph
    assert sum(p.requires_grad for p in qlora.parameters()) == (12 if dora else 8)
    if dora:
        merged = peftc.apply(qlora, "merge(dtype='float32')")
        close(merged(*args, **kwargs).logits, qlora(*args, **kwargs).logits, "merged outputs")


def test_qdora_initial_magnitude_is_the_dequantized_norm(quantized):
    """A fresh DoRA adapter on NF4 sites starts at the row norm of the 4-bit weight (as bitsandbytes
    dequantizes it), so it changes nothing."""
    lm = loaded("tiny-llama")
    qdora = peftc.apply(quantized, "freeze, lora(r=4, dora=true, targets='*.q_proj')")
    torch.testing.assert_close(
        qdora(*lm.args, **lm.kwargs).logits,
        quantized(*lm.args, **lm.kwargs).logits,
        atol=1e-6,
        rtol=0,
    )
    path = "model.layers.0.self_attn.q_proj"
    norm = dequantized_model(lm.model, [path]).get_submodule(path).weight.norm(dim=1)
    # 4-bit, not the original
    assert not torch.allclose(norm, lm.model.get_submodule(path).weight.norm(dim=1))
    magnitude = qdora.get_parameter(
        "model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
    )
    torch.testing.assert_close(magnitude, norm)
    program = peftc.export_program(qdora)
    assert "peftc.nf4_dequantize.default" in {str(n.target) for n in program.graph.nodes}
    torch.testing.assert_close(
        program.module()(*lm.args, lm.kwargs["attention_mask"]).logits,
        qdora(*lm.args, **lm.kwargs).logits,
    )


def _transformers_4bit_modules(model) -> set[str]:
    """The linears transformers turns into bitsandbytes' Linear4bit when it loads `model` in 4 bits
    (its own module selection, run on a copy)."""
    import bitsandbytes
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    model = copy.deepcopy(model)
    replace_with_bnb_linear(
        model,
        modules_to_not_convert=get_keys_to_not_convert(model),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True),
    )
    return {p for p, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)}


@pytest.mark.parametrize("head", ["ForCausalLM", "ForSequenceClassification"])
def test_default_targets_keep_what_transformers_keeps_in_full_precision(head):
    """nf4 alone quantizes the linears transformers quantizes in 4 bits: not the LM head, not a
    classifier's `score`."""
    import transformers

    from peftc.tools.models import example_inputs, tiny_config

    config = tiny_config("llama")
    config.pad_token_id = 0
    model = getattr(transformers, f"Llama{head}")(config).eval()
    gm = peftc.capture(model, *example_inputs(model))
    quantized = set(peftc.apply(gm, "nf4").meta["peftc"]["quantized"])
    assert quantized == _transformers_4bit_modules(model)
    assert not {"lm_head", "score"} & quantized


def test_a_classifier_ending_in_a_bias_stays_full_precision_too():
    """transformers names BERT's last module by its bias, which keeps nothing; the classifier is
    meant, and nf4 keeps it (an explicit `targets` quantizes what it names)."""
    import transformers

    from peftc.tools.models import example_inputs, tiny_config

    model = transformers.BertForSequenceClassification(tiny_config("bert")).eval()
    gm = peftc.capture(model, *example_inputs(model))
    quantized = set(peftc.apply(gm, "nf4").meta["peftc"]["quantized"])
    assert quantized == _transformers_4bit_modules(model) - {"classifier"}
    named = peftc.apply(gm, "nf4(targets='classifier')").meta["peftc"]["quantized"]
    assert set(named) == {"classifier"}
