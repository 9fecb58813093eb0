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

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from peftc.adapters import (
    BranchBuilder,
    adapters,
    additive_technique,
    check_new_adapter,
    new_parameter,
    param_like,
    register_technique,
    resolve_sites,
)
from peftc.errors import OptionError
from peftc.graph import get_tensor, qualify
from peftc.passes.lora import check_adapter_name
from peftc.registry import PassResult, register_pass
from peftc.sites import LinearSite

__all__ = ["LohaOptions", "loha"]

aten = torch.ops.aten
_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LohaOptions:
    r: int = 8
    alpha: float = 8.0
    targets: str | None = None
    adapter: str = "default"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise OptionError(f"loha: r must be a positive integer, got {self.r}")
        check_adapter_name(self.adapter, "loha")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@register_pass("loha", options=LohaOptions, preserves_outputs=True)
def loha(gm: fx.GraphModule, options: LohaOptions) -> PassResult:
    """Insert LoHa branches: `y = W x + b -> y = W x + b + s ((A1 B1) ⊙ (A2 B2)) x`."""
    check_new_adapter(gm, options.adapter, "loha")
    sites = resolve_sites(gm, options.targets, "loha")
    factored = 0
    for site in sites:
        like = param_like(gm, site)
        shapes = [(site.out_features, options.r), (options.r, site.in_features)] * 2
        for role, shape in zip(_ROLES, shapes):
            value = torch.empty(shape, **like)
            if value.device.type != "meta":
                if role == "hada_w2_b":
                    nn.init.zeros_(value)
                else:
                    nn.init.kaiming_uniform_(value, a=math.sqrt(5))
            new_parameter(gm, qualify(site.path, role, options.adapter), value)
        factored += _factored(site, options.r)
        LOHA.insert(gm, site, options.adapter, options)
    adapters(gm)[options.adapter] = {"technique": "loha", "options": options, "active": True, "merged": False,
                                     "sites": [(s.path, "linear") for s in sites]}
    return PassResult(gm, modified=True, sites=tuple(s.path for s in sites),
                      report=f"LoHa r={options.r} on {len(sites)} sites ({factored} factored, {len(sites) - factored} dense)")


def _factored(site: LinearSite, r: int) -> bool:
    return r * r * (site.in_features + site.out_features) < site.in_features * site.out_features


def _insert(gm: fx.GraphModule, site: LinearSite, adapter: str, options: LohaOptions) -> None:
    b = BranchBuilder(gm, site.node, pass_name="loha", adapter=adapter, path=site.path)
    w1a, w1b, w2a, w2b = (b.get(qualify(site.path, role, adapter), role) for role in _ROLES)
    r = options.r
    if _factored(site, r):
        # U[o, i*r + j] = w1a[o, i] w2a[o, j];  V[i*r + j, n] = w1b[i, n] w2b[j, n]
        U = b.call(aten.mul.Tensor, b.call(aten.unsqueeze.default, w1a, 2, role="w1a_col"),
                   b.call(aten.unsqueeze.default, w2a, 1, role="w2a_row"), role="u_outer")
        U = b.call(aten.reshape.default, U, [site.out_features, r * r], role="u")
        V = b.call(aten.mul.Tensor, b.call(aten.unsqueeze.default, w1b, 1, role="w1b_col"),
                   b.call(aten.unsqueeze.default, w2b, 0, role="w2b_row"), role="v_outer")
        V = b.call(aten.reshape.default, V, [r * r, site.in_features], role="v")
        delta = b.call(aten.linear.default, b.call(aten.linear.default, site.input, V, role="v_out"), U, role="u_out")
        b.finish(site.node, b.call(aten.mul.Tensor, delta, options.scaling, role="scaled"))
        return
    w1 = b.call(aten.mm.default, w1a, w1b, role="w1")
    w2 = b.call(aten.mm.default, w2a, w2b, role="w2")
    weight = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, w1, w2, role="hadamard"), options.scaling, role="delta_weight")
    b.finish(site.node, b.call(aten.linear.default, site.input, weight, role="delta_out"))


def _param_names(gm: fx.GraphModule, site: LinearSite, adapter: str, options: LohaOptions) -> list[str]:
    return [qualify(site.path, role, adapter) for role in _ROLES]


def delta_weight(gm: fx.GraphModule, site: LinearSite, adapter: str, options: LohaOptions) -> torch.Tensor:
    w1a, w1b, w2a, w2b = (get_tensor(gm, n) for n in _param_names(gm, site, adapter, options))
    return (w1a @ w1b) * (w2a @ w2b) * options.scaling


LOHA = register_technique(additive_technique("loha", _insert, _param_names, delta_weight))
