"""LoKr: a Kronecker product update beside linear sites, as in HF peft.

    y = W x + b  ->  y = W x + b + s (W1 ⊗ W2) x,   s = alpha / r

out = a * b and in = c * d are factored as peft's `factorization` does; W1 is (a, c), W2 is
(b, d), each full or a rank-r product (W2 = W2a W2b when r < max(b, d) / 2; W1 = W1a W1b with
`decompose_both` when r < max(a, c) / 2). peft builds the (out x in) update every step;
peftc never does, using the Kronecker identity (LyCORIS' "bypass" form):

    (W1 ⊗ W2) x = vec(W1 X W2^T),   X = x reshaped to (c, d)

Parameters: `<path>.lokr_w1.<adapter>` (or `lokr_w1_a`, `lokr_w1_b`) and `lokr_w2` (or
`lokr_w2_a`, `lokr_w2_b`); W1 (or W1a) starts at zero, so the update starts at zero.
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

__all__ = ["LokrOptions", "lokr", "factorization"]

aten = torch.ops.aten


@dataclass(frozen=True)
class LokrOptions:
    r: int = 8
    alpha: float = 8.0
    targets: str | None = None
    decompose_both: bool = False
    decompose_factor: int = -1
    adapter: str = "default"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise OptionError(f"lokr: r must be a positive integer, got {self.r}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise OptionError(f"lokr: decompose_factor must be -1 (near sqrt) or positive, got {self.decompose_factor}")
        check_adapter_name(self.adapter, "lokr")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """`dimension = m * n` with m <= n, m as close to `factor` (default sqrt) as divisors allow (peft's rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class _Layout:
    a: int  # out = a * b
    b: int
    c: int  # in = c * d
    d: int
    full_w1: bool
    full_w2: bool

    def shapes(self, r: int) -> dict[str, tuple[int, int]]:
        w1 = {"lokr_w1": (self.a, self.c)} if self.full_w1 else {"lokr_w1_a": (self.a, r), "lokr_w1_b": (r, self.c)}
        w2 = {"lokr_w2": (self.b, self.d)} if self.full_w2 else {"lokr_w2_a": (self.b, r), "lokr_w2_b": (r, self.d)}
        return {**w1, **w2}


def _layout(site: LinearSite, options: LokrOptions) -> _Layout:
    c, d = factorization(site.in_features, options.decompose_factor)
    a, b = factorization(site.out_features, options.decompose_factor)
    full_w1 = not (options.decompose_both and options.r < max(a, c) / 2)
    full_w2 = not (options.r < max(b, d) / 2)
    return _Layout(a, b, c, d, full_w1, full_w2)


@register_pass("lokr", options=LokrOptions, preserves_outputs=True)
def lokr(gm: fx.GraphModule, options: LokrOptions) -> PassResult:
    """Insert LoKr branches: `y = W x + b -> y = W x + b + s (W1 ⊗ W2) x`, never building W1 ⊗ W2."""
    check_new_adapter(gm, options.adapter, "lokr")
    sites = resolve_sites(gm, options.targets, "lokr")
    for site in sites:
        like = param_like(gm, site)
        for role, shape in _layout(site, options).shapes(options.r).items():
            value = torch.empty(shape, **like)
            if value.device.type != "meta":
                if role in ("lokr_w1", "lokr_w1_a"):
                    nn.init.zeros_(value)
                else:
                    nn.init.kaiming_uniform_(value, a=math.sqrt(5))
            new_parameter(gm, qualify(site.path, role, options.adapter), value)
        LOKR.insert(gm, site, options.adapter, options)
    adapters(gm)[options.adapter] = {"technique": "lokr", "options": options, "active": True, "merged": False,
                                     "sites": [(s.path, "linear") for s in sites]}
    return PassResult(gm, modified=True, sites=tuple(s.path for s in sites),
                      report=f"LoKr r={options.r} on {len(sites)} sites")


def _insert(gm: fx.GraphModule, site: LinearSite, adapter: str, options: LokrOptions) -> None:
    layout = _layout(site, options)
    b = BranchBuilder(gm, site.node, pass_name="lokr", adapter=adapter, path=site.path)
    params = {role: b.get(qualify(site.path, role, adapter), role) for role in layout.shapes(options.r)}
    w1 = params.get("lokr_w1") or b.call(aten.mm.default, params["lokr_w1_a"], params["lokr_w1_b"], role="w1")
    w2 = params.get("lokr_w2") or b.call(aten.mm.default, params["lokr_w2_a"], params["lokr_w2_b"], role="w2")
    x = b.call(aten.reshape.default, site.input, [-1, layout.c, layout.d], role="x_blocks")  # X: (N, c, d)
    xw2 = b.call(aten.matmul.default, x, b.call(aten.t.default, w2, role="w2_t"), role="x_w2t")  # (N, c, b)
    y = b.call(aten.matmul.default, w1, xw2, role="w1_x_w2t")  # (N, a, b)
    y = b.call(aten.reshape_as.default, y, site.node, role="delta_out")
    b.finish(site.node, b.call(aten.mul.Tensor, y, options.scaling, role="scaled"))


def _param_names(gm: fx.GraphModule, site: LinearSite, adapter: str, options: LokrOptions) -> list[str]:
    return [qualify(site.path, role, adapter) for role in _layout(site, options).shapes(options.r)]


def delta_weight(gm: fx.GraphModule, site: LinearSite, adapter: str, options: LokrOptions) -> torch.Tensor:
    t = {name.rsplit(".", 2)[-2]: get_tensor(gm, name) for name in _param_names(gm, site, adapter, options)}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(w1, w2) * options.scaling


LOKR = register_technique(additive_technique("lokr", _insert, _param_names, delta_weight))
