"""Composition is order-independent: several techniques on one site compute the documented form

    y = O(op(I(x), T(W), b)) + sum of additive updates

whatever order they were added in and after any sequence of disable / set_adapter / delete / merge /
unmerge. The oracle is a plain eager computation of that form from each adapter's own tensors.
Three small techniques defined here cover the stages LoRA and LoHa do not (input, weight, output).
"""

import itertools
import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peftc
from peftc.errors import OptionError
from peftc.technique import AdapterOptions, Param, Technique
from peftc.technique.adapters import adapter_tensors, adapters, register_technique

aten = torch.ops.aten


@dataclass(frozen=True)
class ScaleOptions(AdapterOptions):
    pass


def _vector(ctx, size):
    return [Param("test_l", (size,), init=nn.init.ones_)]


@register_technique
class OutScale(Technique):
    """y -> y * l (IA3's output form)."""

    name, options, stage = "test_out_scale", ScaleOptions, "output"

    def params(self, ctx):
        return _vector(ctx, ctx.site.out_features)

    def build(self, b, y):
        return b.call(aten.mul.Tensor, y, b.param("test_l"), role="scaled")

    def fold(self, ctx, weight, bias):
        scale = ctx.tensor("test_l").float()
        return weight * scale[:, None], None if bias is None else bias * scale


@register_technique
class InScale(Technique):
    """x -> x * l (IA3's feed-forward form)."""

    name, options, stage = "test_in_scale", ScaleOptions, "input"

    def params(self, ctx):
        return _vector(ctx, ctx.site.in_features)

    def build(self, b, x):
        return b.call(aten.mul.Tensor, x, b.param("test_l"), role="scaled_input")

    def fold(self, ctx, weight, bias):
        return weight * ctx.tensor("test_l").float()[None, :], bias


@register_technique
class WeightMix(Technique):
    """W -> W R (a reparameterisation of the weight, as OFT or HRA)."""

    name, options, stage = "test_weight_mix", ScaleOptions, "weight"

    def params(self, ctx):
        return [
            Param(
                "test_r",
                (ctx.site.in_features, ctx.site.in_features),
                init=lambda t: t.copy_(torch.eye(len(t))),
            )
        ]

    def build(self, b, weight):
        return b.call(aten.mm.default, weight, b.param("test_r"), role="mixed_weight")

    def fold(self, ctx, weight, bias):
        return weight @ ctx.tensor("test_r").float(), bias


STAGE = {
    "lora": "add",
    "loha": "add",
    "test_out_scale": "output",
    "test_in_scale": "input",
    "test_weight_mix": "weight",
}
MODEL = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6))
X = torch.randn(5, 8)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return peftc.apply(peftc.capture(MODEL, (X,)), "freeze")


def _tensor(values, name, attr, path):
    return next(v for k, v in values.items() if k.startswith(f"{path}.{attr}.{name}"))


def expected(gm, model=MODEL, x=X):
    """The documented composition, computed eagerly from each adapter's tensors."""
    live = {n: r for n, r in adapters(gm).items() if r.active or r.merged}
    values = {n: adapter_tensors(gm, n) for n in live}
    order = sorted(
        live,
        key=lambda n: (["input", "weight", "output", "add"].index(STAGE[live[n].technique]), n),
    )
    h = x
    for path, layer in (("0", model[0]), ("2", model[2])):
        here = [n for n in order if (path, "linear") in live[n].sites]
        xin, W = h, layer.weight
        for n in here:
            t = live[n].technique
            if t == "test_in_scale":
                xin = xin * _tensor(values[n], n, "test_l", path)
            if t == "test_weight_mix":
                W = W @ _tensor(values[n], n, "test_r", path)
        y = nn.functional.linear(xin, W, layer.bias)
        for n in here:
            t, o = live[n].technique, live[n].options
            if t == "test_out_scale":
                y = y * _tensor(values[n], n, "test_l", path)
            if t == "lora":
                y = (
                    y
                    + o.scaling
                    * h
                    @ _tensor(values[n], n, "lora_A", path).T
                    @ _tensor(values[n], n, "lora_B", path).T
                )
            if t == "loha":
                w1 = _tensor(values[n], n, "hada_w1_a", path) @ _tensor(
                    values[n], n, "hada_w1_b", path
                )
                w2 = _tensor(values[n], n, "hada_w2_a", path) @ _tensor(
                    values[n], n, "hada_w2_b", path
                )
                y = y + h @ (w1 * w2 * o.scaling).T
        h = torch.tanh(y) if path == "0" else y
    return h


def randomize(gm, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(gm.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return gm


ADD = {
    "a": "lora(r=2, adapter='a', targets='0|2')",
    "b": "test_out_scale(adapter='b', targets='2')",
    "c": "loha(r=2, adapter='c', targets='0')",
    "d": "test_in_scale(adapter='d', targets='0|2')",
    "e": "test_weight_mix(adapter='e', targets='2')",
}


@pytest.mark.parametrize("order", list(itertools.permutations("abde"))[::5])
def test_the_same_adapters_in_any_order_compute_the_same(base, order):
    reference = randomize(peftc.apply(base, ", ".join(ADD[n] for n in "abde")), 1)
    state = {k: v for k, v in reference.state_dict().items()}
    gm = peftc.apply(base, ", ".join(ADD[n] for n in order))
    gm.load_state_dict(state)
    torch.testing.assert_close(gm(X), reference(X), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gm(X), expected(gm), atol=1e-5, rtol=1e-5)


def test_lora_then_output_scale_is_not_scaled_lora(base):
    """The reported bug: `(Wx)*l + BAx` must not become `(Wx + BAx)*l` after switching adapters."""
    gm = randomize(peftc.apply(base, f"{ADD['a']}, {ADD['b']}"), 2)
    before = gm(X)
    cycled = peftc.apply(gm, "disable_adapters")
    peftc.technique.adapters.set_active(cycled, ["a", "b"])
    torch.testing.assert_close(cycled(X), before, atol=0, rtol=0)
    torch.testing.assert_close(before, expected(gm), atol=1e-5, rtol=1e-5)


OPERATIONS = [
    "add",
    "add",
    "add",
    "disable",
    "set",
    "set",
    "delete",
    "merge",
    "merge_one",
    "unmerge",
    "unmerge_one",
]


@pytest.mark.parametrize("seed", range(24))
def test_random_sequences_of_operations_keep_the_documented_form(base, seed):
    rng = random.Random(seed)
    gm, step = base, 0
    for _ in range(12):
        op = rng.choice(OPERATIONS)
        known = adapters(gm)
        unmerged = [n for n, r in known.items() if not r.merged]
        merged = [n for n, r in known.items() if r.merged]
        missing = [n for n in ADD if n not in known]
        try:
            if op == "add" and missing:
                gm = randomize(peftc.apply(gm, ADD[rng.choice(missing)]), seed * 100 + step)
            elif op == "disable" and unmerged:
                gm = peftc.apply(gm, "disable_adapters")
            elif op == "set" and unmerged:
                gm = peftc.ir.graph.clone(gm)
                peftc.technique.adapters.set_active(
                    gm, rng.sample(unmerged, rng.randint(1, len(unmerged)))
                )
            elif op == "delete" and unmerged:
                gm = peftc.apply(gm, f"delete_adapter(name='{rng.choice(unmerged)}')")
            elif op == "merge" and any(r.active and not r.merged for r in known.values()):
                gm = peftc.apply(gm, "merge")
            elif op == "merge_one" and unmerged and known[name := rng.choice(unmerged)].active:
                gm = peftc.apply(gm, f"merge(adapter='{name}')")
            elif op == "unmerge" and merged:
                gm = peftc.apply(gm, "unmerge")
            elif op == "unmerge_one" and merged:
                gm = peftc.apply(gm, f"unmerge(adapter='{rng.choice(merged)}')")
        except OptionError as e:  # a refused step names the adapters and leaves the graph as it was
            assert "stays unmerged around it" in str(e), e
        step += 1
        torch.testing.assert_close(
            gm(X), expected(gm), atol=1e-5, rtol=1e-5, msg=f"after {op} (step {step})"
        )


def test_merging_an_update_under_an_active_output_scale_is_refused(base):
    gm = randomize(peftc.apply(base, f"{ADD['a']}, {ADD['b']}"), 3)
    with pytest.raises(
        OptionError,
        match=r"'a' \(lora, add stage\) would be merged .* 'b' \(test_out_scale, output stage\)",
    ):
        peftc.apply(gm, "merge(adapter='a')")
    scale_first = peftc.apply(gm, "merge(adapter='b'), merge(adapter='a')")  # inside out: allowed
    torch.testing.assert_close(scale_first(X), gm(X), atol=1e-5, rtol=1e-5)
    both = peftc.apply(gm, "merge")
    torch.testing.assert_close(both(X), gm(X), atol=1e-5, rtol=1e-5)
    restored = peftc.apply(both, "unmerge")
    torch.testing.assert_close(restored(X), gm(X), atol=1e-6, rtol=1e-6)
