"""The models the technique tests check against peft: small custom modules with the site kinds the
techniques act on, the tiny transformers models and the real MiniLM.

`check(name, config, folder, **options)` is `against_peft` on a model of the zoo, captured once per
process, or on a test's own.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

import peftc
from peftc.technique.adapters import adapters
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import Parity, against_peft

from conftest import captured, loaded


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 4)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Conv2dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.lin0 = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class Conv1dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.lin0 = nn.Conv1d(4, 8, 3, stride=2), nn.Linear(8 * 4, 3)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv0(x)).flatten(1))


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin0 = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, ids):
        return self.lin0(self.emb(ids))


class NormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.norm, self.lin1 = nn.Linear(10, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(self.norm(self.lin0(x)))


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x, need_weights=False)[0])


class Linears(nn.Module):
    """Two linears `a` (8 -> 16) and `b` (16 -> 4); with `conv`, a 2-d convolution `c` on a second
    input, both results flattened into one output (the comparison and the loss see both)."""

    def __init__(self, conv: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.c = nn.Conv2d(3, 5, 3, padding=1) if conv else None

    def forward(self, x, img=None):
        y = self.b(torch.relu(self.a(x)))
        return y if self.c is None else torch.cat([y.flatten(), self.c(img).flatten()])


def _custom(cls, *shape, ids=False):
    def make():
        torch.manual_seed(0)
        model = cls().eval()
        generator = torch.Generator().manual_seed(1)
        x = (
            torch.randint(0, 50, shape, generator=generator)
            if ids
            else torch.randn(*shape, generator=generator)
        )
        return model, (x,), {}

    return make


def _linears(conv):
    def make():
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(3, 8, generator=generator)
        return (
            Linears(conv).eval(),
            (x, torch.randn(2, 3, 6, 6, generator=generator)) if conv else (x,),
            {},
        )

    return make


CUSTOM = {
    "mlp": _custom(MLP, 4, 10),
    "conv2d": _custom(Conv2dModel, 2, 3, 5, 5),
    "conv1d": _custom(Conv1dModel, 2, 4, 9),
    "embedding": _custom(EmbModel, 3, 7, ids=True),
    "layernorm": _custom(NormModel, 4, 10),
    "mha": _custom(MHAModel, 2, 5, 16),
    # captured symbolically, the others by export
    "linears": _linears(conv=False),
    "linears-conv": _linears(conv=True),
}


def build(name: str) -> tuple[nn.Module, tuple, dict]:
    """A fresh model and its inputs: a custom one, "minilm", or a tiny transformers arch (batch 3,
    length 9)."""
    if name in CUSTOM:
        return CUSTOM[name]()
    if name == "minilm":
        lm = loaded("minilm")
        return copy.deepcopy(lm.model), lm.args, lm.kwargs
    model = tiny_model(name)
    return (model, *example_inputs(model, batch=3, seq=9, seed=2))


@functools.cache
def graph(name: str) -> torch.fx.GraphModule:
    """`build(name)`'s model captured and frozen, once (loading an adapter copies it). The
    transformers models are conftest's captures, at batch 2 and length 16: the checks run them on
    other shapes."""
    if name.startswith("linears"):
        return symbolic(*build(name))
    if name in CUSTOM:
        return peftc.apply(peftc.capture(*build(name)), "freeze")
    return peftc.apply(captured(name if name == "minilm" else f"tiny-{name}"), "freeze")


def with_pooler(out) -> torch.Tensor:
    """A BERT's hidden states and pooled output as one tensor: the `view` where the pooler's `dense`
    is a target."""
    return torch.cat([out[0].flatten(), out[1].flatten()])


def symbolic(model: nn.Module, args: tuple, kwargs: dict | None = None) -> torch.fx.GraphModule:
    """A copy of `model` captured symbolically and frozen."""
    return peftc.apply(
        peftc.capture(copy.deepcopy(model), args, kwargs, method="symbolic"), "freeze"
    )


def check(model, config, folder, **options) -> Parity:
    """`against_peft` on `build(model)` with its graph captured once, or on what a test's own
    `model()` returns, (module, args, kwargs), captured symbolically."""
    if callable(model):
        module, args, kwargs = model()
        return against_peft(
            module, args, kwargs, config, folder, graph=symbolic(module, args, kwargs), **options
        )
    module, args, kwargs = build(model)
    return against_peft(module, args, kwargs, config, folder, graph=graph(model), **options)


def adapted_paths(parity: Parity) -> tuple[set[str], set[str]]:
    """(the modules peftc's adapter acts on, those peft's does). peftc's sites inside a module peft
    adapts whole (nn.MultiheadAttention's out_proj) count as that module."""
    theirs = set(parity.peft.base_model.targeted_module_names)
    paths = {
        path
        for record in adapters(parity.graph).values()
        for path, kind in record.sites
        if kind != "module"
    }
    ours = {p.rpartition(".")[0] if p.rpartition(".")[0] in theirs else p for p in paths}
    return ours, theirs
