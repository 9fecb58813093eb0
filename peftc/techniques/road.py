"""RoAd: 2-d rotations with learned scales of a linear layer's output, as in HF peft 0.21.

    y = W x + b  ->  y' = y * c1 + rotate_half(y) * c2       (elementwise, over the last dim)

1. The output is split into groups of `group_size`; in each group element i pairs with element
   i + group_size/2, and rotate_half maps the pair (y_i, y_j) to (-y_j, y_i). So each pair is
   turned by angle θ and scaled by α: c1 = α cos θ, c2 = α sin θ.
2. `road_theta` and `road_alpha` (per site) hold θ and α: `road_1` out/2 of each (one angle and
   scale per pair), `road_2` out (one per element), `road_4` 2 out (per group, the first
   group_size for c1's cos and α, the next for c2's sin and α). They start at θ = 0, α = 1 (the
   identity); `init_weights=false` draws θ ~ N(0, 0.5), α ~ N(1, 0.5) as peft.
3. Merging: W' = R W, b' = R b, R the rotation above as a matrix.
Linear sites only (nn.Linear and NF4 linears, as peft's bitsandbytes layers); out_features must be
a multiple of group_size. GPT-2's Conv1D and nn.MultiheadAttention are refused, as peft refuses
them (it silently skips a MultiheadAttention's out_proj).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["RoadOptions", "Road"]

aten = torch.ops.aten


def _even(value: Any) -> str | None:
    ok = isinstance(value, int) and value > 0 and value % 2 == 0
    return None if ok else "a positive even integer"


@dataclass(frozen=True)
class RoadOptions(AdapterOptions):
    variant: Literal["road_1", "road_2", "road_4"] = option(
        "road_1",
        doc="road_1: one angle and scale per pair; road_2: per element; road_4: two per element",
        peft="variant",
    )
    group_size: int = option(
        64,
        doc="elements paired within groups of this size (i with i + group_size/2)",
        check=_even,
        peft="group_size",
    )
    init_weights: bool = option(
        True,
        doc="start at the identity (θ = 0, α = 1); false: θ ~ N(0, .5), α ~ N(1, .5)",
        peft="init_weights",
    )


def _columns(call: Any, theta: Any, alpha: Any, variant: str, g: int) -> tuple[Any, Any]:
    """peft's `_prepare_cols`: (c1, c2), each (out,), in its order of operations (`call`:
    `Builder.call` in the graph, `eager` for merging)."""
    if variant == "road_1":  # each half-group's values serve both halves
        theta, alpha = (
            _both_halves(call, t, g, name) for t, name in ((theta, "theta"), (alpha, "alpha"))
        )
    if variant == "road_4":  # per group: [c1's g values, c2's g values]
        theta, alpha = (
            call(aten.unflatten.int, t, 0, [-1, 2, g], role=f"{name}_groups")
            for t, name in ((theta, "theta"), (alpha, "alpha"))
        )
        cos = _flat(call, call(aten.cos.default, _half(call, theta, 0), role="cos"), "cos_flat")
        sin = _flat(call, call(aten.sin.default, _half(call, theta, 1), role="sin"), "sin_flat")
        alpha1 = _flat(call, _half(call, alpha, 0), "alpha_1")
        alpha2 = _flat(call, _half(call, alpha, 1), "alpha_2")
        first = call(aten.mul.Tensor, alpha1, cos, role="road_c1")
        return first, call(aten.mul.Tensor, alpha2, sin, role="road_c2")
    cos = call(aten.cos.default, theta, role="cos")
    sin = call(aten.sin.default, theta, role="sin")
    first = call(aten.mul.Tensor, alpha, cos, role="road_c1")
    return first, call(aten.mul.Tensor, alpha, sin, role="road_c2")


def _both_halves(call: Any, t: Any, g: int, name: str) -> Any:
    """(out/2,) -> (out,): each group's g/2 values repeated for its second half."""
    halves = call(aten.unflatten.int, t, 0, [-1, 1, g // 2], role=f"{name}_halves")
    both = call(aten.expand.default, halves, [-1, 2, g // 2], role=f"{name}_both")
    return _flat(call, both, f"{name}_repeated")


def _half(call: Any, t: Any, i: int) -> Any:
    return call(aten.select.int, t, 1, i, role="half")


def _flat(call: Any, t: Any, role: str) -> Any:
    return call(aten.reshape.default, t, [-1], role=role)


def _rotate(call: Any, y: Any, first: Any, second: Any, g: int) -> Any:
    """peft's `_apply_road` over y's last dim: y * c1 + rotate_half(y) * c2."""
    pairs = call(aten.unflatten.int, y, -1, [-1, 2, g // 2], role="pairs")
    x1 = call(aten.select.int, pairs, -2, 0, role="first_half")
    x2 = call(aten.select.int, pairs, -2, 1, role="second_half")
    minus_x2 = call(aten.neg.default, x2, role="second_half_neg")
    swapped = call(aten.stack.default, [minus_x2, x1], -2, role="swapped")
    rotated_half = call(aten.flatten.using_ints, swapped, -3, -1, role="rotate_half")
    scaled = call(aten.mul.Tensor, y, first, role="y_c1")
    turned = call(aten.mul.Tensor, rotated_half, second, role="rotate_half_c2")
    return call(aten.add.Tensor, scaled, turned, role="road")


def _normal(mean: float) -> Any:
    return lambda t: nn.init.normal_(t, mean=mean, std=0.5)


@register_technique
class Road(Technique):
    """Insert RoAd: rotate and scale pairs of a linear layer's outputs (bias included),
    `y -> y * α cos θ + rotate_half(y) * α sin θ`."""

    name = "road"
    half_precision = "float32"  # peft rotates the output in the adapter's float32
    options = RoadOptions
    peft_type = "ROAD"
    stage = "output"

    def check(self, gm: fx.GraphModule, site: Any, options: RoadOptions) -> None:
        mha = multihead_attention(site)
        if getattr(site, "fan_in_fan_out", False) or mha:
            what = f"nn.MultiheadAttention {mha[1]!r}" if mha else f"GPT-2's Conv1D {site.path!r}"
            raise OptionError(
                f"road: peft adapts nn.Linear layers only, not {what}; exclude it from targets"
            )
        if site.out_features % options.group_size:
            raise OptionError(
                f"road: {site.path!r} has out_features={site.out_features}, not a multiple of "
                f"group_size={options.group_size}; lower group_size"
            )

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        out = ctx.site.out_features
        size = {"road_1": out // 2, "road_2": out, "road_4": 2 * out}[o.variant]
        theta, alpha = (None, nn.init.ones_) if o.init_weights else (_normal(0.0), _normal(1.0))
        return [Param("road_theta", (size,), init=theta), Param("road_alpha", (size,), init=alpha)]

    def build(self, b: Builder, y: fx.Node) -> fx.Node:
        o = b.options
        if b.ctx.upcast:  # peft: the output cast to the adapter's dtype, the result back
            y = b.as_adapter(y, "road_input_upcast")
        first, second = _columns(
            b.call, b.param("road_theta"), b.param("road_alpha"), o.variant, o.group_size
        )
        out = _rotate(b.call, y, first, second, o.group_size)
        if not b.ctx.upcast:
            return out
        return b.call(aten._to_copy.default, out, dtype=b.ctx.base_dtype, role="road_downcast")

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        o = ctx.options
        theta, alpha = (ctx.tensor(a).float() for a in ("road_theta", "road_alpha"))
        first, second = _columns(eager, theta, alpha, o.variant, o.group_size)
        # R acts on the output dim: R W rotates W's columns as outputs, R b rotates b
        rotated = _rotate(eager, weight.t(), first, second, o.group_size).t()
        if bias is None:
            return rotated, None
        return rotated, _rotate(eager, bias, first, second, o.group_size)

    def describe(self, options: RoadOptions, sites: list[Any]) -> str:
        return (
            f"RoAd {options.variant} group_size={options.group_size} on {len(sites)} sites, "
            f"adapter {options.adapter!r}"
        )
