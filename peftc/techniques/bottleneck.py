"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) at the blocks' residual adds, as adapter-hub
defines them.

    f(v) = scaling * up(act(down(v)))   down: d -> d // reduction_factor, up: back to d (biases)

At a sublayer's residual add z = x + h (h: what the attention or feed-forward sublayer adds, x: the
stream it is added to; post-LN blocks then apply their LayerNorm to z), an adapter rewrites z:

    houlsby   attention, feed-forward   z -> z + f(h)       post-LN: LN(x + h + f(h))
    pfeiffer  feed-forward              z -> z + f(LN(z))   post-LN: LN(x + h + f(LN(x + h))), the
                                                            model's LN used twice; pre-LN: x + h +
                                                            f(x + h)
    parallel  feed-forward              z -> z + f(x)       post-LN: LN(x + h + f(x)); pre-LN: x is
                                                            the stream before the sublayer's norm

1. Defaults follow adapter-hub `adapters` (DoubleSeqBnConfig, SeqBnConfig, ParBnConfig): activation
   swish / relu / relu, reduction factor 16 / 16 / 2, scaling 1.0 / 1.0 / 4.0, init bert / bert /
   zero_up. Inits: "bert" N(0, 0.02) weights and zero biases (not the identity at init), "zero_up"
   (adapter-hub's "mam_adapter") nn.Linear's init down and a zero up projection (the model is
   unchanged at init), "houlsby" truncated N(0, 1e-2) in [-2e-2, 2e-2]. `dropout` follows the
   scaled up projection, as adapter-hub's.
2. Sites are `regions.sublayer_sites` (block residual adds found by what the graph computes), named
   by the sublayer's module (`model.layers.0.mlp`, BERT's `layer.0.output`); `targets` globs them.
   Tensors: `<sublayer>.adapter_down.<adapter>.{weight,bias}`,
   `<sublayer>.adapter_up.<adapter>.{weight,bias}`.
3. The adapter is not a weight update: `merge` leaves it in the graph and says so; checkpoints are
   peftc's (`peftc.save_adapter`: safetensors and the options as JSON; HF peft has no such method).
   Several active adapters at one site apply in name order, each to the previous one's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError, PassError
from peftc.sites import SublayerSite, sites_of, weight_site_at
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    positive,
    probability,
    register_technique,
)

__all__ = ["BottleneckOptions", "Bottleneck", "ACTIVATIONS", "PLACEMENTS"]

aten = torch.ops.aten

# placement: (sublayer kinds, activation, reduction factor, scaling, init), adapter-hub's configs
PLACEMENTS = {
    "houlsby": (("attention", "feed_forward"), "swish", 16, 1.0, "bert"),
    "pfeiffer": (("feed_forward",), "relu", 16, 1.0, "bert"),
    "parallel": (("feed_forward",), "relu", 2, 4.0, "zero_up"),
}
# adapter-hub resolves names through transformers' ACT2FN (lower-cased): the aten op of each
ACTIVATIONS = {
    "relu": (aten.relu.default, {}),
    "swish": (aten.silu.default, {}),
    "silu": (aten.silu.default, {}),
    "gelu": (aten.gelu.default, {}),
    "gelu_new": (aten.gelu.default, {"approximate": "tanh"}),
    "gelu_pytorch_tanh": (aten.gelu.default, {"approximate": "tanh"}),
    "tanh": (aten.tanh.default, {}),
    "sigmoid": (aten.sigmoid.default, {}),
    "leakyrelu": (aten.leaky_relu.default, {}),
    "mish": (aten.mish.default, {}),
    "linear": (None, {}),
}


def _activation(value: Any) -> str | None:
    return None if value.lower() in ACTIVATIONS else "one of " + ", ".join(ACTIVATIONS)


def _number(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (
        None
        if ok
        else "a number (adapter-hub's 'learned' and 'channel' scalings are not implemented)"
    )


@dataclass(frozen=True)
class BottleneckOptions(AdapterOptions):
    placement: Literal["houlsby", "pfeiffer", "parallel"] = option(
        "houlsby",
        doc="houlsby (after attention and feed-forward), pfeiffer (after feed-forward), parallel "
        "(beside it)",
    )
    reduction_factor: int | None = option(
        None,
        doc="bottleneck width d // reduction_factor (None: the placement's 16, 16, 2)",
        check=positive,
    )
    activation: str | None = option(
        None,
        doc="activation between the projections (None: the placement's swish, relu, relu)",
        check=_activation,
    )
    init: Literal["bert", "zero_up", "houlsby"] | None = option(
        None,
        doc="bert N(0, 0.02), zero_up (the identity at init), houlsby truncated N(0, 1e-2) (None: "
        "the placement's bert, bert, zero_up)",
    )
    scaling: float | str | None = option(
        None, doc="scale of the adapter's output (None: the placement's 1, 1, 4)", check=_number
    )
    dropout: float = option(0.0, doc="dropout after the scaled up projection", check=probability)

    @property
    def kinds(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement][0]

    def resolved(self) -> tuple[str, int, float, str]:
        """(activation, reduction factor, scaling, init) with the placement's defaults filled in."""
        _, activation, factor, scaling, init = PLACEMENTS[self.placement]
        return (
            (self.activation or activation).lower(),
            self.reduction_factor or factor,
            float(scaling if self.scaling is None else self.scaling),
            self.init or init,
        )


def _width(ctx: Context) -> int:
    val = ctx.site.node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise PassError(
            f"adapter: the residual add at {ctx.site.path!r} has no recorded shape; capture with "
            "peftc.capture"
        )
    return int(val.shape[-1])


def _bert(t: torch.Tensor) -> None:
    nn.init.normal_(t, 0.0, 0.02)


def _houlsby(t: torch.Tensor) -> None:
    nn.init.trunc_normal_(t, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


@register_technique
class Bottleneck(Technique):
    """Insert bottleneck adapters f(v) = scaling * up(act(down(v))) at the blocks' residual adds
    (adapter-hub's).

    1. `placement="houlsby"`: after attention and feed-forward, z -> z + f(h)
       (post-LN: LN(x + h + f(h))).
    2. `"pfeiffer"`: after feed-forward, z -> z + f(LN(z)) (pre-LN: x + h + f(x + h)).
    3. `"parallel"`: beside feed-forward, z -> z + f(x), scaling 4 and a zero up projection by
       default.
    """

    name = "adapter"
    # no peft counterpart: its tensors take the model's dtype
    half_precision = "base"
    options = BottleneckOptions
    peft_type = None
    site_kinds = ("attention", "feed_forward")
    stage = "output"
    preserves_outputs = False  # the "bert" and "houlsby" inits are not the identity
    mergeable = False

    def select(self, gm: fx.GraphModule, options: BottleneckOptions) -> list[tuple[Any, str]]:
        sites = sites_of(gm, options.kinds, options.targets)
        if not sites:
            where = " or ".join(options.kinds)
            raise PassError(
                f"adapter: no {where} sublayer found: {options.placement} adapters sit at the "
                "residual adds of repeated blocks (children of a ModuleList that add a linear "
                "sublayer's output to their input); this graph has none. Capture a transformer, or "
                "insert blocks with a custom pass"
            )
        return [(site, site.path) for site in sites]

    def check(self, gm: fx.GraphModule, site: SublayerSite, options: BottleneckOptions) -> None:
        _, factor, _, _ = options.resolved()
        width = _width(Context(gm, site, options))
        if width // factor < 1:
            raise OptionError(
                f"adapter: reduction_factor={factor} is larger than the hidden size {width} at "
                f"{site.path!r}, leaving no bottleneck; use a factor of at most {width}"
            )

    def params(self, ctx: Context) -> list[Param]:
        _, factor, _, init = ctx.options.resolved()
        d = _width(ctx)
        m = d // factor
        down = _kaiming if init == "zero_up" else _bert if init == "bert" else _houlsby
        up = None if init == "zero_up" else down
        return [
            Param("adapter_down", (m, d), down, suffix="weight", key="down"),
            Param("adapter_down", (m,), suffix="bias", key="down_bias"),
            Param("adapter_up", (d, m), up, suffix="weight", key="up"),
            Param("adapter_up", (d,), suffix="bias", key="up_bias"),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"adapter_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, z: fx.Node) -> fx.Node:
        site: SublayerSite = b.site
        activation, _, scaling, _ = b.options.resolved()
        placement = b.options.placement
        if placement == "houlsby":
            v = b.x
        elif placement == "parallel":
            v = site.residual
        elif site.norm is None:
            v = z
        else:
            v = _norm(b, site.norm, z)
        h = b.call(aten.linear.default, v, b.param("down"), b.param("down_bias"), role="down")
        op, kwargs = ACTIVATIONS[activation]
        if op is not None:
            h = b.call(op, h, role="activation", **kwargs)
        h = b.call(aten.linear.default, h, b.param("up"), b.param("up_bias"), role="up")
        if scaling != 1.0:
            h = b.call(aten.mul.Tensor, h, scaling, role="scale")
        if b.options.dropout:
            h = b.module("adapter_dropout", h, role="dropout")
        return b.call(aten.add.Tensor, z, h, role="output")

    def describe(self, options: BottleneckOptions, sites: list[Any]) -> str:
        activation, factor, scaling, init = options.resolved()
        kinds = sorted({s.kind for s in sites})
        return (
            f"{options.placement} adapter {options.adapter!r} at {len(sites)} "
            f"{' and '.join(kinds)} sublayers: width d/{factor}, {activation}, scaling "
            f"{scaling:g}, {init} init"
        )


def _norm(b: Builder, norm: fx.Node, z: fx.Node) -> fx.Node:
    """The block's own post-LN LayerNorm applied to z (Pfeiffer's adapter input), with its stored
    weights."""
    site = weight_site_at(b.gm, norm)
    # no affine weights: its other arguments are constants
    if site is None and norm.op == "call_function":
        return b.call(norm.target, z, *norm.args[1:], role="norm", **norm.kwargs)
    if site is None:
        raise PassError(
            f"adapter: pfeiffer reuses the post-LN LayerNorm {norm.target!r}, which has no weights "
            "to call it with; capture the model with peftc.capture (torch.export)"
        )
    weight = b.get(site.weight, "norm_weight")
    bias = b.get(site.bias, "norm_bias") if site.bias else None
    target, args = site.functional(z, weight, bias)
    return b.call(target, *args, role="norm")
