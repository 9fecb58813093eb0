"""LoHa: a Hadamard product of two low-rank matrices beside linear sites, as in HF peft.

    y = W x + b  ->  y = W x + b + dW x,   dW = s * (A1 B1) ⊙ (A2 B2),  s = alpha / r

peft builds dW (out x in) on every forward step. peftc does not when the factored form is
cheaper: with U = rows-Khatri-Rao(A1, A2) (out x r^2) and V = cols-Khatri-Rao(B1, B2)
(r^2 x in), dW = U V, so dW x = U (V x) costs r^2 (in + out) per token instead of in * out.

1. Factored (`r^2 (in + out) < in * out`): `linear(linear(x, V), U) * s`.
2. Dense otherwise: `linear(x, (A1 B1) ⊙ (A2 B2) * s)`.
Parameters: `<path>.hada_w1_a.<adapter>` (out, r), `hada_w1_b` (r, in), `hada_w2_a`, `hada_w2_b`;
w1_a, w1_b, w2_a Kaiming-uniform, w2_b zero (the update starts at zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.adapters import register_technique
from peftc.errors import OptionError
from peftc.sites import LinearSite
from peftc.technique import AdapterOptions, Builder, Context, Param, Technique, kaiming_uniform

__all__ = ["LohaOptions", "Loha"]

aten = torch.ops.aten
_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LohaOptions(AdapterOptions):
    r: int = 8
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise OptionError(f"loha: r must be a positive integer, got {self.r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _factored(site: LinearSite, r: int) -> bool:
    return r * r * (site.in_features + site.out_features) < site.in_features * site.out_features


@register_technique
class Loha(Technique):
    """Insert LoHa branches: `y = W x + b -> y = W x + b + s ((A1 B1) ⊙ (A2 B2)) x`."""

    name = "loha"
    options = LohaOptions
    peft_type = "LOHA"

    def params(self, ctx: Context) -> list[Param]:
        site, r = ctx.site, ctx.options.r
        shapes = [(site.out_features, r), (r, site.in_features)] * 2
        return [Param(attr, shape, init=None if attr == "hada_w2_b" else kaiming_uniform) for attr, shape in zip(_ROLES, shapes)]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, r = b.site, b.options.r
        w1a, w1b, w2a, w2b = (b.param(attr) for attr in _ROLES)
        if _factored(site, r):
            # U[o, i*r + j] = w1a[o, i] w2a[o, j];  V[i*r + j, n] = w1b[i, n] w2b[j, n]
            U = b.call(aten.mul.Tensor, b.call(aten.unsqueeze.default, w1a, 2, role="w1a_col"),
                       b.call(aten.unsqueeze.default, w2a, 1, role="w2a_row"), role="u_outer")
            U = b.call(aten.reshape.default, U, [site.out_features, r * r], role="u")
            V = b.call(aten.mul.Tensor, b.call(aten.unsqueeze.default, w1b, 1, role="w1b_col"),
                       b.call(aten.unsqueeze.default, w2b, 0, role="w2b_row"), role="v_outer")
            V = b.call(aten.reshape.default, V, [r * r, site.in_features], role="v")
            delta = b.call(aten.linear.default, b.call(aten.linear.default, x, V, role="v_out"), U, role="u_out")
            return b.call(aten.mul.Tensor, delta, b.options.scaling, role="scaled")
        w1 = b.call(aten.mm.default, w1a, w1b, role="w1")
        w2 = b.call(aten.mm.default, w2a, w2b, role="w2")
        weight = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, w1, w2, role="hadamard"), b.options.scaling,
                        role="delta_weight")
        return b.call(aten.linear.default, x, weight, role="delta_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (ctx.tensor(attr).float() for attr in _ROLES)
        return (w1a @ w1b) * (w2a @ w2b) * ctx.options.scaling

    def to_peft(self, options: LohaOptions, sites: list[Any]) -> dict[str, Any]:
        return {"r": options.r, "alpha": options.alpha, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}

    def from_peft(self, config: dict[str, Any]) -> dict[str, Any]:
        config.pop("init_weights", None)  # the weights come from the checkpoint
        return {"r": config.pop("r", 8), "alpha": float(config.pop("alpha", 8))}

    def describe(self, options: LohaOptions, sites: list[Any]) -> str:
        factored = sum(_factored(s, options.r) for s in sites)
        return f"LoHa r={options.r} on {len(sites)} sites ({factored} factored, {len(sites) - factored} dense)"
