"""PEANuT: a small network of the weight itself gives the update, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + x (s * net(W^T)),   net(M) = B(f_dec(f_enc(act(M A^T))))

1. W^T (in, out) goes through A (out -> r) and `act_fn`; then `depth` encoders (r -> r, each
   followed by act_fn), then `depth` decoders (act_fn after each, then the residual of the matching
   encoder's input added, innermost first); B (r -> out) gives the (in, out) matrix, times
   `scaling`. So dW = (s * net(W^T))^T, one update per row of W^T, conditioned on the weight.
2. A, the encoders and decoders are Kaiming-uniform (nn.Linear's); B starts at zero, so the adapter
   starts as a no-op (`init_weights=false`: Kaiming-uniform too).
3. Merging adds dW, computed from the weight before any merge, as peft does; the bias is unchanged.
4. Over a float16/bfloat16 base the tensors are float32 (peft's autocast_adapter_dtype): W and x are
   cast to float32 and the term rounded to the base's dtype before it is added, as peft sums it.
5. `act_fn`: the transformers ACT2FN keys written here in aten ops; the others are refused by name.
Dense nn.Linear sites only, as peft: GPT-2's Conv1D, nn.MultiheadAttention and quantized weights
(peft reads the packed 4-bit weight as if it were dense) are refused.
Tensors: `<path>.peanut_A.<adapter>.weight` (r, out), `peanut_B` (out, r),
`<path>.peanut_encoders.<adapter>.<i>.weight` (r, r) and `peanut_decoders`; saved as peft's
`<path>.peanut_A.weight`, `<path>.peanut_encoders.<i>.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    kaiming_uniform,
    non_negative,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["PeanutOptions", "Peanut"]

aten = torch.ops.aten

# transformers' ACT2FN keys (peft's `act_fn`): the aten op of each; None is the identity
ACTIVATIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "relu": (aten.relu.default, {}),
    "gelu": (aten.gelu.default, {}),
    "gelu_new": (aten.gelu.default, {"approximate": "tanh"}),
    "gelu_pytorch_tanh": (aten.gelu.default, {"approximate": "tanh"}),
    "silu": (aten.silu.default, {}),
    "swish": (aten.silu.default, {}),
    "tanh": (aten.tanh.default, {}),
    "sigmoid": (aten.sigmoid.default, {}),
    "leaky_relu": (aten.leaky_relu.default, {}),
    "mish": (aten.mish.default, {}),
    "linear": (None, {}),
}


def _activation(value: Any) -> str | None:
    if value in ACTIVATIONS:
        return None
    return "one of " + ", ".join(ACTIVATIONS) + " (peftc does not implement the other ACT2FN keys)"


@dataclass(frozen=True)
class PeanutOptions(AdapterOptions):
    r: int = rank_option(32, "width of the network: A (r x out), B (out x r), r x r layers")
    depth: int = option(
        0,
        doc="encoder and decoder layers (r x r) between A and B, with residuals",
        check=non_negative,
        peft="depth",
    )
    act_fn: str = option(
        "relu", doc="activation after A and each hidden layer", check=_activation, peft="act_fn"
    )
    scaling: float = option(1.0, doc="the factor on the update", peft="scaling")
    init_weights: bool = option(
        True, doc="B starts at zero (false: Kaiming-uniform, as the others)", peft="init_weights"
    )


def _network(call: Any, weight_t: Any, tensors: dict[str, Any], o: PeanutOptions) -> Any:
    """s * net(W^T), (in, out), in peft's order of operations (`call`: `Builder.call` in the
    graph, `eager` for merging); `tensors` by key."""
    op, kwargs = ACTIVATIONS[o.act_fn]

    def act(h: Any, role: str) -> Any:
        return h if op is None else call(op, h, role=f"{role}_act", **kwargs)

    h = act(call(aten.linear.default, weight_t, tensors["peanut_A"], role="A_out"), "A")
    residuals = []
    for i in range(o.depth):
        residuals.append(h)
        h = call(aten.linear.default, h, tensors[f"peanut_encoders.{i}"], role=f"encoder_{i}")
        h = act(h, f"encoder_{i}")
    for i in range(o.depth):
        h = call(aten.linear.default, h, tensors[f"peanut_decoders.{i}"], role=f"decoder_{i}")
        h = act(h, f"decoder_{i}")
        h = call(aten.add.Tensor, h, residuals[-1 - i], role=f"residual_{i}")
    h = call(aten.linear.default, h, tensors["peanut_B"], role="B_out")
    return call(aten.mul.Tensor, h, o.scaling, role="scaled")


def _keys(o: PeanutOptions) -> list[str]:
    hidden = [f"peanut_{side}.{i}" for side in ("encoders", "decoders") for i in range(o.depth)]
    return ["peanut_A", "peanut_B", *hidden]


@register_technique
class Peanut(Technique):
    """Insert PEANuT: `y = W x + b -> y = W x + b + x (s * net(W^T))`, the update a small
    network of the base weight."""

    name, options, peft_type = "peanut", PeanutOptions, "PEANUT"
    half_precision = "float32"  # peft upcasts its tensors and W, and casts the term back
    preserves_outputs = False  # init_weights=false draws B at random

    def check(self, gm: fx.GraphModule, site: Any, options: PeanutOptions) -> None:
        if site.fan_in_fan_out or multihead_attention(site):
            what = "GPT-2's Conv1D" if site.fan_in_fan_out else "an nn.MultiheadAttention"
            raise OptionError(
                f"peanut: {site.path!r} is {what}, and peft's PEANuT adapts nn.Linear layers "
                "only; exclude it from targets"
            )
        if site.storage != "dense":
            raise OptionError(
                f"peanut: {site.path!r} stores its weight as {site.storage!r}; peft's PEANuT "
                "reads a dense nn.Linear weight (it misreads bitsandbytes' packed 4-bit one); keep "
                "the site dense or exclude it"
            )

    def params(self, ctx: Context) -> list[Param]:
        o, out = ctx.options, ctx.site.out_features
        hidden = [  # peft's ModuleList: `<attr>.<adapter>.<i>.weight`
            Param(attr, (o.r, o.r), kaiming_uniform, suffix=f"{i}.weight", key=f"{attr}.{i}")
            for attr in ("peanut_encoders", "peanut_decoders")
            for i in range(o.depth)
        ]
        init_b = None if o.init_weights else kaiming_uniform
        return [
            Param("peanut_A", (o.r, out), kaiming_uniform, suffix="weight"),
            Param("peanut_B", (out, o.r), init_b, suffix="weight"),
            *hidden,
        ]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        weight_t = b.call(aten.t.default, b.weight(), role="weight_t")
        tensors = {key: b.param(key) for key in _keys(b.options)}
        update = _network(b.call, weight_t, tensors, b.options)
        return b.call(aten.matmul.default, x, update, role="peanut")

    def delta(self, ctx: Context) -> torch.Tensor:
        tensors = {key: ctx.tensor(key).float() for key in _keys(ctx.options)}
        return _network(eager, ctx.weight().float().t(), tensors, ctx.options).t()

    def describe(self, options: PeanutOptions, sites: list[Any]) -> str:
        return (
            f"PEANuT r={options.r} depth={options.depth} {options.act_fn} on {len(sites)} sites, "
            f"adapter {options.adapter!r}"
        )
