"""canonicalize: computations equal to a linear layer become one `aten.linear` (peftc/canonical.py,
cases 1-4)."""

import copy
import sys

import pytest
import torch
import transformers
from torch import nn

import peftc
from peftc.ir.canonical import canonicalize
from peftc.quant.nf4 import dequantize_nf4, quantize_nf4
from peftc.tools.models import example_inputs

from conftest import captured

aten = torch.ops.aten


def falcon(new_decoder_architecture: bool, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2 if new_decoder_architecture else None,
        new_decoder_architecture=new_decoder_architecture,
        bias=bias,
    )
    return transformers.FalconForCausalLM(config).eval()


def uncanonical(monkeypatch, model, args=(), kwargs=None):
    """The graph capture builds before canonicalize runs on it."""
    monkeypatch.setattr(sys.modules["peftc.ir.capture"], "canonicalize", lambda gm: 0)
    return peftc.capture(model, args, kwargs)


FALCON_LINEARS = [
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
]


@pytest.mark.parametrize("new_decoder_architecture", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_falcon_linear_becomes_a_linear_site(monkeypatch, new_decoder_architecture, bias):
    model = falcon(new_decoder_architecture, bias)
    args, kwargs = example_inputs(model)
    expected = model(*args, **kwargs, use_cache=False).logits
    gm = uncanonical(monkeypatch, model, args, kwargs)
    # `x @ self.weight.T` is not nn.Linear
    assert [s.path for s in peftc.linear_sites(gm)] == ["lm_head"]
    before = gm(*args, *kwargs.values()).logits
    assert canonicalize(gm) == 8
    after = gm(*args, *kwargs.values()).logits
    gm.graph.lint()
    assert not [
        n for n in gm.graph.nodes if n.target in (aten.matmul.default, aten.numpy_T.default)
    ]
    torch.testing.assert_close(before, expected, rtol=0, atol=0)
    if bias:  # linear(x, W, b) runs as one addmm; eager adds the bias after the matmul
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(after, expected, rtol=0, atol=0)
    sites = peftc.linear_sites(gm)
    assert [s.path for s in sites] == [
        f"transformer.h.{i}.{p}" for i in range(2) for p in FALCON_LINEARS
    ] + ["lm_head"]
    for site in sites[:-1]:
        module = model.get_submodule(site.path)
        assert site.node.target is aten.linear.default and not site.fan_in_fan_out
        assert (site.weight, site.bias) == (
            f"{site.path}.weight",
            f"{site.path}.bias" if bias else None,
        )
        assert (site.out_features, site.in_features) == tuple(module.weight.shape)
        assert site.node.meta["module_path"] == site.path
        assert site.node.meta["module_type"].endswith("FalconLinear")
        assert site.node.meta["nn_module_stack"] and "peftc" not in site.node.meta
        assert site.node.meta["val"].shape[-1] == module.weight.shape[0]


@pytest.mark.parametrize("new_decoder_architecture", [False, True])
def test_capture_canonicalizes_falcon_and_qlora_runs_on_it(new_decoder_architecture):
    model = falcon(new_decoder_architecture, bias=True)
    args, kwargs = example_inputs(model)
    gm = peftc.capture(model, args, kwargs)
    assert peftc.ir.graph.peftc_meta(gm)["capture"]["canonicalized"] == 8
    assert (
        len(peftc.linear_sites(gm, "*.query_key_value|*.dense|*.dense_h_to_4h|*.dense_4h_to_h"))
        == 8
    )
    result = peftc.Pipeline.parse('nf4, freeze, lora(r=4, targets="all-linear")').run(gm)
    lora = result.results[-1]
    assert len(lora.sites) == 8 and lora.modified
    # The oracle: eager Falcon on the NF4-rounded weights (LoRA's zero B keeps the function at
    # init).
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for path in (s.path for s in peftc.linear_sites(gm) if s.path != "lm_head"):
            weight = rounded.get_submodule(path).weight
            weight.copy_(dequantize_nf4(quantize_nf4(weight)))
    expected = rounded(*args, **kwargs, use_cache=False).logits
    out = result.graph_module(*args, *kwargs.values()).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in result.graph_module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


class Proj(nn.Module):
    def __init__(self, spelling: str, bias: bool = True):
        super().__init__()
        self.spelling = spelling
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(3)) if bias else None

    def forward(self, x):
        w, b = self.w, self.b
        return {
            "@.T+b": lambda: x @ w.T + b,
            "b+matmul.t()": lambda: b + torch.matmul(x, w.t()),
            "method.transpose": lambda: x.matmul(w.transpose(1, 0)),
            "mm.permute": lambda: torch.mm(x, w.permute(1, 0)),
            "addmm.mT": lambda: torch.addmm(b, x, w.mT),
            "transpose(-1,-2)": lambda: x @ torch.transpose(w, -1, -2),
        }[self.spelling]()


class Net(nn.Module):
    def __init__(self, spelling: str, bias: bool = True):
        super().__init__()
        self.proj = Proj(spelling, bias)

    def forward(self, x):
        return torch.relu(self.proj(x))


@pytest.mark.parametrize(
    "spelling,bias",
    [
        ("@.T+b", True),
        ("b+matmul.t()", True),
        ("method.transpose", False),
        ("mm.permute", False),
        ("addmm.mT", True),
        ("transpose(-1,-2)", False),
    ],
)
def test_hand_written_linear_traced_symbolically_is_a_linear_site(spelling, bias):
    torch.manual_seed(0)
    net = Net(spelling, bias)
    x = torch.randn(5, 4)
    gm = peftc.capture(net, (x,), method="symbolic")
    sites = peftc.linear_sites(gm)
    assert [(s.path, s.weight, s.bias, s.in_features, s.out_features) for s in sites] == [
        ("proj", "proj.w", "proj.b" if bias else None, 4, 3)
    ]
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "get_attr"] + ["get_attr"] * bias + [
        "call_function"
    ] * 2 + ["output"]
    assert sites[0].node.meta["module_type"].endswith("Proj") and sites[0].node.meta[
        "val"
    ].shape == (5, 3)
    torch.testing.assert_close(gm(x), net(x))
    if spelling not in ("mm.permute", "addmm.mT"):  # matmul takes any rank, as linear does
        x3 = torch.randn(2, 7, 4)
        torch.testing.assert_close(gm(x3), net(x3))


def test_weight_used_in_a_parent_module_belongs_to_its_owner():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.inner.weight.T

    gm = peftc.capture(Parent(), (torch.randn(2, 4),), method="symbolic")
    (site,) = peftc.linear_sites(gm)
    assert (
        site.path == "inner" and site.node.meta["module_type"] == "torch.nn.modules.module.Module"
    )


def test_gpt2_conv1d_is_left_alone():
    gm = peftc.ir.graph.clone(captured("tiny-gpt2"))
    assert peftc.ir.graph.peftc_meta(gm)["capture"]["canonicalized"] == 0
    assert canonicalize(gm) == 0
    conv = [s for s in peftc.linear_sites(gm) if s.fan_in_fan_out]
    assert len(conv) == 8 and all(
        s.fan_in_fan_out and s.node.target is aten.addmm.default for s in conv
    )


def test_nothing_to_match_on_real_linears():
    gm = peftc.ir.graph.clone(captured("tiny-llama"))
    nodes = [n.format_node() for n in gm.graph.nodes]
    assert canonicalize(gm) == 0
    assert [n.format_node() for n in gm.graph.nodes] == nodes


class NotLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in_out = nn.Parameter(torch.randn(4, 3))
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b2d = nn.Parameter(torch.randn(5, 3))
        self.cube = nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x, y):
        return (
            x @ self.w_in_out,  # stored (in, out): would need a copied weight
            x @ y.T,  # no weight: attention scores, not a layer
            torch.addmm(self.b2d, x, self.w.T),  # 2-D "bias": not a linear bias
            x @ self.cube.transpose(1, 2),  # 3-D weight
            torch.addmm(self.w[0, :3], x, self.w.T, beta=2.0),
        )


def test_computations_that_are_not_a_linear_stay():
    gm = peftc.capture(NotLinear(), (torch.randn(5, 4), torch.randn(6, 4)), method="symbolic")
    assert canonicalize(gm) == 0
    assert peftc.linear_sites(gm) == []


def test_product_with_other_users_keeps_its_bias_add_and_shared_transpose():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.b = nn.Parameter(torch.randn(3))

        def forward(self, x):
            wt = self.w.T
            h = x @ wt
            return h + self.b, h.sum(), wt.sum()

    torch.manual_seed(0)
    module = Shared()
    x = torch.randn(2, 4)
    gm = peftc.capture(module, (x,), method="symbolic")
    assert canonicalize(gm) == 0  # capture did it already
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.linear.default in targets and getattr in targets  # the transpose has another user
    (site,) = peftc.linear_sites(gm)
    assert site.bias is None  # the product is read without the bias too
    for got, want in zip(gm(x), module(x), strict=True):
        torch.testing.assert_close(got, want)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
