import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.errors import CaptureError
from peftc.tools.models import example_inputs, tiny_model

from conftest import ARCHITECTURES, captured, loaded, requires_minilm


def eager(model, args, kwargs):
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs = {**kwargs, "use_cache": False}
    with torch.no_grad():
        return model(*args, **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_capture_matches_eager_on_other_shapes(arch):
    model = loaded(f"tiny-{arch}").model
    gm = captured(f"tiny-{arch}")
    # batch 3, length 11: neither is the example's (2, 16)
    args, kwargs = example_inputs(model, batch=3, seq=11, seed=7)
    expected, got = eager(model, args, kwargs), gm(*args, **kwargs)
    assert type(got) is type(expected)
    for key in expected.keys():
        if isinstance(expected[key], torch.Tensor):
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_names_are_the_original_ones(arch):
    model, gm = loaded(f"tiny-{arch}").model, captured(f"tiny-{arch}")
    assert set(gm.state_dict()) == set(model.state_dict())
    original = dict(model.named_parameters())
    for name, p in gm.named_parameters():
        assert p.data_ptr() == original[name].data_ptr()  # shared, not copied


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_every_node_has_a_module_path_and_fake_value(arch):
    gm = captured(f"tiny-{arch}")
    model = loaded(f"tiny-{arch}").model
    module_paths = {p for p, _ in model.named_modules()}
    for node in gm.graph.nodes:
        assert node.meta["module_path"] in module_paths, node.name
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            assert node.meta["module_type"] == "torch.nn.modules.linear.Linear"
            assert (
                tuple(node.meta["val"].shape)[-1]
                == model.get_submodule(node.meta["module_path"]).out_features
            )


@requires_minilm
def test_real_minilm_captures_exactly():
    lm = loaded("minilm")
    gm = captured("minilm")
    batch = lm.tokenizer(
        ["a short one", "peftc rewrites graphs of real pretrained models", "third"],
        padding=True,
        return_tensors="pt",
    )
    expected = eager(lm.model, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]})
    got = gm(batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)
    assert len(peftc.linear_sites(gm)) == 37
    assert len(peftc.attention_sites(gm)) == 6


def test_capture_leaves_the_model_alone():
    model = tiny_model("bert").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = model.forward
    args, kwargs = example_inputs(model)
    gm = peftc.apply(peftc.capture(model, args, kwargs), "freeze")
    assert model.training and model.forward == forward
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in gm.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_train_and_eval_switch_dropout_like_the_original():
    model = tiny_model("bert")  # eval at capture; hidden dropout p=0.1
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, kwargs)
    assert not gm.training
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.1 for m in dropouts)
    reference = gm(*args, **kwargs).last_hidden_state
    gm.train()
    torch.manual_seed(0)
    noisy = gm(*args, **kwargs).last_hidden_state
    assert not torch.allclose(noisy, reference)
    gm.eval()
    torch.testing.assert_close(gm(*args, **kwargs).last_hidden_state, reference)


def test_captured_in_train_mode_matches_eager_with_the_same_seed():
    model = tiny_model("gpt2").train()
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, kwargs)
    assert gm.training
    torch.manual_seed(3)
    expected = model(*args, **kwargs, use_cache=False).logits
    torch.manual_seed(3)
    torch.testing.assert_close(gm(*args, **kwargs).logits, expected)


def test_captured_in_train_mode_computes_eager_s_eval_in_eval_mode():
    """Attention's dropout_p, baked by export as the training-mode number, follows the mode."""
    model = tiny_model("gpt2").train()
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, kwargs).eval()
    with torch.no_grad():
        expected = model.eval()(*args, **kwargs, use_cache=False).logits
        torch.testing.assert_close(gm(*args, **kwargs).logits, expected)


def test_flags_that_land_in_forward_kwargs_are_accepted():
    model = tiny_model("llama")
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, {**kwargs, "output_attentions": False})
    expected = model(*args, **kwargs, use_cache=False).logits
    torch.testing.assert_close(gm(*args, **kwargs).logits, expected)


class _Upper(nn.Module):
    """A forward whose inputs have upper-case names (peft's custom test models take `X`)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 4)

    def forward(self, X, Mask):
        return self.lin(X.float()) * Mask


def test_inputs_keep_the_model_s_names_which_export_lowercases():
    model, x, mask = _Upper(), torch.arange(30).view(3, 10), torch.rand(3, 4)
    gm = peftc.capture(model, (x, mask))
    assert [n.target for n in gm.graph.find_nodes(op="placeholder")] == ["X", "Mask"]
    torch.testing.assert_close(gm(X=x[:2], Mask=mask[:2]), model(x[:2], mask[:2]))


class _ExportBranch(nn.Module):
    """Takes another branch under torch.export than in eager mode (as models with export-only
    code paths do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * (2.0 if torch.compiler.is_exporting() else 1.0)


def test_a_graph_that_computes_something_else_is_refused():
    x = torch.randn(3, 4)
    with pytest.raises(CaptureError, match="computes another output .* max \\|difference\\|"):
        peftc.capture(_ExportBranch(), (x,))
    model = _ExportBranch()
    gm = peftc.capture(model, (x,), verify=False)
    torch.testing.assert_close(gm(x), 2 * model(x))


def test_a_length_the_model_fixes_is_said_and_guarded():
    """Mamba's scan fixes the sequence length under torch.export: capture says so, and the graph
    refuses another length naming the input and dim (not an error deep inside the scan)."""
    model = tiny_model("mamba")
    args, kwargs = example_inputs(model, seq=16)
    with pytest.warns(
        UserWarning, match="torch.export fixed these input dims .*'input_ids': {1: 16}"
    ):
        gm = peftc.capture(model, args, kwargs)
    torch.testing.assert_close(gm(*args, **kwargs).logits, model(*args, **kwargs).logits)
    other, other_kwargs = example_inputs(model, seq=12)
    with pytest.raises(
        AssertionError, match="input '(input_ids|attention_mask)' must have size 16 in dim 1"
    ):
        gm(*other, **other_kwargs)


def test_gradients_flow_like_eager():
    model = tiny_model("llama")
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, kwargs)
    gm(*args, **kwargs).logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(*args, **kwargs, use_cache=False).logits.square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])
        self.drop = nn.Dropout(0.5)
        self.head = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        for layer in self.layers:
            x = self.drop(F.relu(layer(x)))
        return F.linear(x, self.head)


def test_symbolic_and_export_give_passes_the_same_view():
    model = TwoLayer().eval()
    x = torch.randn(5, 8)
    symbolic = peftc.capture(model, (x,), method="symbolic")
    exported = peftc.capture(model, (x,), method="export")
    for gm in (symbolic, exported):
        sites = peftc.linear_sites(gm)
        assert [(s.path, s.in_features, s.out_features) for s in sites] == [
            ("layers.0", 8, 8),
            ("layers.1", 8, 4),
            ("", 4, 3),
        ]
        assert sites[-1].weight == "head"
        torch.testing.assert_close(gm(x), model(x))
        assert all("val" in n.meta for n in gm.graph.nodes if n.op != "output")
    assert [s.op for s in peftc.linear_sites(symbolic)] == ["nn.Linear", "nn.Linear", "F.linear"]
    assert [s.op for s in peftc.linear_sites(exported)] == ["aten.linear"] * 3


def test_symbolic_capture_does_not_share_modules_with_the_model():
    model = TwoLayer()
    gm = peftc.apply(peftc.capture(model), "freeze")
    assert peftc.ir.graph.peftc_meta(gm)["capture"]["method"] == "symbolic"
    assert gm.get_submodule("layers.0") is not model.layers[0]
    assert all(p.requires_grad for p in model.parameters())


def test_meta_device_llama_7b_captures_without_allocating():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, 32000, (2, 16))
    gm = peftc.capture(model, (ids,), dynamic=False)
    assert all(p.device.type == "meta" for p in gm.parameters())
    assert peftc.summary(gm).total == 6_738_415_616
    assert len(peftc.linear_sites(gm, "model.layers.*")) == 32 * 7


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


def test_untraceable_model_names_module_and_construct():
    with pytest.raises(CaptureError) as err:
        peftc.capture(DataDependent(), (torch.randn(2, 3),))
    message = str(err.value)
    assert "inner (Branchy)" in message
    assert "if x.sum() > 0" in message
    assert "fix:" in message
    with pytest.raises(CaptureError, match="inner \\(Branchy\\)"):
        peftc.capture(DataDependent(), method="symbolic")


def test_bad_capture_arguments():
    with pytest.raises(CaptureError, match="needs a torch.nn.Module"):
        peftc.capture(lambda x: x, (torch.ones(1),))
    with pytest.raises(CaptureError, match="unknown capture method"):
        peftc.capture(TwoLayer(), (torch.ones(2, 8),), method="jit")
    with pytest.raises(CaptureError, match="do not fit"):
        peftc.capture(TwoLayer(), (torch.ones(2, 8), torch.ones(2)))


def test_capture_records_the_config_of_a_wrapped_transformer():
    """Passes read the config (prompt's tokenizer, position limits); a wrapper's one transformer
    supplies it."""
    from peftc.ir.capture import _config_summary

    inner = loaded("tiny-llama").model

    class Head(nn.Module):
        def __init__(self, *encoders):
            super().__init__()
            self.encoders = nn.ModuleList(encoders)

    assert _config_summary(inner)["hidden_size"] == 64
    assert _config_summary(Head(inner)) == _config_summary(inner)
    # two transformers: no one config
    assert _config_summary(Head(inner, loaded("tiny-gpt2").model)) == {}


def test_paligemma_s_graph_which_export_gets_wrong_is_refused():
    """torch.export itself traces tiny PaliGemma into a graph whose logits differ from eager (an
    upstream problem, transformers 5.25): capture refuses it by name instead of handing it back."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    text = GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=300,
        max_position_embeddings=128,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    config = PaliGemmaConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_index=299,
        projection_dim=32,
        hidden_size=32,
        vocab_size=300,
    )
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config).eval()
    ids = torch.cat([torch.full((2, 4), 299), torch.randint(3, 200, (2, 8))], 1)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16)}
    inputs["attention_mask"] = torch.ones_like(ids)
    with pytest.raises(CaptureError, match=r"computes another output \['logits'\]"):
        peftc.capture(model, (), inputs)


def test_modules_keep_their_own_mode():
    """A wrapper in training mode around an encoder in eval mode (the demo's classifier, fresh):
    the graph's dropout under the encoder stays off, as in the model, so capture's own check
    passes and the graph computes what the model does."""

    class Wrapper(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder, self.dropout = encoder, torch.nn.Dropout(0.5)

        def forward(self, input_ids, attention_mask):
            states = self.encoder(input_ids, attention_mask=attention_mask).last_hidden_state
            return self.dropout(states[:, 0])

    model = Wrapper(tiny_model("bert"))  # the encoder in eval mode, the wrapper training
    args, kwargs = example_inputs(model.encoder)
    graph = peftc.capture(model, args, kwargs)
    modes = {p: m.training for p, m in graph.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert modes["dropout"] and not any(v for p, v in modes.items() if p.startswith("encoder"))


def test_a_graph_captured_in_training_mode_takes_adapters():
    """Attention's dropout p becomes a module called without input; sites skip it."""
    model = tiny_model("bert").train()
    graph = peftc.capture(model, *example_inputs(model))
    adapted = peftc.apply(graph, "freeze, lora(r=4, targets='*.query|*.value')")
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) > 0


def test_one_tensor_given_as_two_inputs_stays_two_inputs():
    """`labels=input_ids` (the same tensor object): the graph reads each input as its own; later
    calls with other labels still embed the token ids."""
    model = tiny_model("llama")
    (ids,), kwargs = example_inputs(model)
    gm = peftc.capture(model, (ids,), {**kwargs, "labels": ids})
    other = torch.randint(3, 200, ids.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = gm(other, **kwargs, labels=ids).logits
        expected = model(other, **kwargs, labels=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected)
