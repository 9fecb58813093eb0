"""LoKr: a Kronecker product update beside linear and convolution sites, as in HF peft.

    y = W x + b  ->  y = W x + b + s (W1 ⊗ W2) x,   s = alpha / r

out = a * b and in = c * d are factored as peft's `factorization` does; W1 is (a, c), W2 is
(b, d), each full or a rank-r product (W2 = W2a W2b when r < max(b, d) / 2; W1 = W1a W1b with
`decompose_both` when r < max(a, c) / 2). peft builds the (out x in) update every step;
peftc never does, using the Kronecker identity (LyCORIS' "bypass" form):

    (W1 ⊗ W2) x = vec(W1 X W2^T),   X = x reshaped to (c, d)

On Conv1d / Conv2d sites (in = in_channels / groups) peftc computes dW as peft does and
convolves with it (the base's stride, padding, dilation, groups; no bias):

1. W2 full: `lokr_w2` (b, d, kh, kw) (Conv1d: (b, d, k), where torch.kron pads W1 to
   (1, a, c) and the raw reshape to (out, in, k) scrambles the layout: peft's, reproduced).
2. `use_effective_conv2d` (kernel not 1): W2 = einsum(t2, W2a, W2b) with the Tucker core
   `lokr_t2` (r, r, kh, kw) (Conv1d: (r, r, k, 1)), W2a (r, b), W2b (r, d).
3. Otherwise W2 = W2a W2b, (b, r) @ (r, d * kernel).
dW = kron(W1 (unsqueezed to 4-D when W2 is), W2) * s, reshaped to the kernel's shape. Conv3d,
GPT-2's Conv1D and nn.MultiheadAttention are refused, as peft refuses them.

Parameters: `<path>.lokr_w1.<adapter>` (or `lokr_w1_a`, `lokr_w1_b`) and `lokr_w2` (or
`lokr_w2_a`, `lokr_w2_b`); W1 (or W1a) starts at zero, so the update starts at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor
from peftc.technique import (
    Builder,
    Context,
    Param,
    PatternOptions,
    Technique,
    dropout_option,
    kaiming_uniform,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.loha import (
    LYCORIS_FIXED,
    LYCORIS_IGNORED,
    conv_with,
    dropped,
    effective,
    lycoris_dropout,
    refuse_lycoris,
    weight_shape,
)

__all__ = ["LokrOptions", "Lokr", "factorization"]

aten = torch.ops.aten


def _factor(value: int) -> str | None:
    return None if value == -1 or value > 0 else "-1 (factors near sqrt(dim)) or a positive factor"


@dataclass(frozen=True)
class LokrOptions(PatternOptions):
    r: int = rank_option(8, "rank of w2 (or of w1 and w2 with decompose_both) where it is factored")
    alpha: float = option(8.0, doc="the update's scale: s = alpha / r", peft="alpha")
    decompose_both: bool = option(
        False, doc="factor w1 into w1_a w1_b as well", peft="decompose_both"
    )
    decompose_factor: int = option(
        -1,
        doc="the factor dims are split by (-1: near the square root)",
        check=_factor,
        peft="decompose_factor",
    )
    use_effective_conv2d: bool = option(
        False,
        doc="peft's CP decomposition of convolution kernels larger than 1",
        peft="use_effective_conv2d",
    )
    rank_dropout: float = dropout_option(
        "rank_dropout", "in training, drop each output row of the update"
    )
    rank_dropout_scale: bool = option(
        False, doc="divide the kept rows by their mean", peft="rank_dropout_scale"
    )
    module_dropout: float = dropout_option(
        "module_dropout", "in training, drop the whole update for a step with this probability"
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """`dimension = m * n` with m <= n, m as close to `factor` (default sqrt) as divisors allow
    (peft's rule)."""
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
    kernel: tuple[int, ...] = ()  # convolutions
    effective: bool = False  # W2 from the Tucker core lokr_t2

    def shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        w1 = (
            {"lokr_w1": (self.a, self.c)}
            if self.full_w1
            else {"lokr_w1_a": (self.a, r), "lokr_w1_b": (r, self.c)}
        )
        if self.full_w2:
            w2 = {"lokr_w2": (self.b, self.d, *self.kernel)}
        elif self.effective:
            w2 = {
                "lokr_t2": (r, r, *self.kernel, 1)[:4],
                "lokr_w2_a": (r, self.b),
                "lokr_w2_b": (r, self.d),
            }
        else:
            w2 = {"lokr_w2_a": (self.b, r), "lokr_w2_b": (r, self.d * math.prod(self.kernel))}
        return {**w1, **w2}


def _layout(site: Any, options: LokrOptions) -> _Layout:
    conv = site.kind == "conv"
    c, d = factorization(
        site.in_channels // site.groups if conv else site.in_features, options.decompose_factor
    )
    a, b = factorization(site.out_channels if conv else site.out_features, options.decompose_factor)
    full_w1 = not (options.decompose_both and options.r < max(a, c) / 2)
    full_w2 = not (options.r < max(b, d) / 2)
    return _Layout(
        a, b, c, d, full_w1, full_w2, site.kernel_size if conv else (), effective(site, options)
    )


@register_technique
class Lokr(Technique):
    """Insert LoKr branches: `y = W x + b -> y = W x + b + s (W1 ⊗ W2) x`, never building W1 ⊗
    W2."""

    name = "lokr"
    options = LokrOptions
    peft_type = "LOKR"
    peft_fixed, peft_ignored = LYCORIS_FIXED, LYCORIS_IGNORED
    site_kinds = ("linear", "conv")
    half_precision = "float32"

    def check(self, gm: fx.GraphModule, site: Any, options: LokrOptions) -> None:
        refuse_lycoris("lokr", site)
        layout = _layout(site, options) if site.kind == "conv" else None
        if layout and site.dims == 1 and layout.effective and not layout.full_w2 and options.r == 1:
            raise OptionError(
                f"lokr: peft fails on Conv1d {site.path!r} with use_effective_conv2d and r=1 "
                "(inside torch.kron); use r >= 2 or use_effective_conv2d=false"
            )

    def params(self, ctx: Context) -> list[Param]:
        shapes = _layout(ctx.site, ctx.options).shapes(ctx.options.r)
        return [
            Param(attr, shape, init=None if attr in ("lokr_w1", "lokr_w1_a") else kaiming_uniform)
            for attr, shape in shapes.items()
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return lycoris_dropout(ctx, rescale=ctx.options.rank_dropout_scale)

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        return dropped(b, self._update(b, x))

    def _update(self, b: Builder, x: fx.Node) -> fx.Node:
        """dW x, in peft's order of operations."""
        layout = _layout(b.site, b.options)
        p = {attr: b.param(attr) for attr in layout.shapes(b.options.r)}
        if b.site.kind == "conv":  # peft's make_kron, then the base's convolution with it
            w1 = p.get("lokr_w1") or b.call(
                aten.mm.default, p["lokr_w1_a"], p["lokr_w1_b"], role="w1"
            )
            if "lokr_w2" in p:
                w2 = p["lokr_w2"]
            elif layout.effective:
                w2 = b.call(
                    aten.einsum.default,
                    "ijkl,ip,jr->prkl",
                    [p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]],
                    role="w2",
                )
            else:
                w2 = b.call(aten.mm.default, p["lokr_w2_a"], p["lokr_w2_b"], role="w2")
            if len(layout.kernel) == 2 if layout.full_w2 else layout.effective:  # W2 is 4-D
                w1 = b.call(
                    aten.unsqueeze.default,
                    b.call(aten.unsqueeze.default, w1, 2, role="w1_3d"),
                    2,
                    role="w1_4d",
                )
            kron = b.call(
                aten.kron.default,
                w1,
                b.call(aten.contiguous.default, w2, role="w2_contiguous"),
                role="kron",
            )
            weight = b.call(aten.mul.Tensor, kron, b.options.scaling, role="delta_weight_kron")
            return conv_with(
                b, x, b.call(aten.reshape.default, weight, weight_shape(b), role="delta_weight")
            )
        return _kron_product(b, x, p, layout)

    def delta(self, ctx: Context) -> torch.Tensor:
        names = _layout(ctx.site, ctx.options).shapes(ctx.options.r)
        t = {attr: ctx.tensor(attr).float() for attr in names}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum(
                "i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
            )
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        weight = torch.kron(w1, w2.contiguous()) * ctx.options.scaling
        return (
            weight.reshape(get_tensor(ctx.gm, ctx.site.weight).shape)
            if ctx.site.kind == "conv"
            else weight
        )

    def describe(self, options: LokrOptions, sites: list[Any]) -> str:
        return f"LoKr r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"


def _kron_product(b: Builder, x: fx.Node, p: dict[str, fx.Node], layout: Any) -> fx.Node:
    """s (W1 ⊗ W2) x at a linear site, never forming the Kronecker product."""
    w1 = p.get("lokr_w1") or b.call(aten.mm.default, p["lokr_w1_a"], p["lokr_w1_b"], role="w1")
    w2 = p.get("lokr_w2") or b.call(aten.mm.default, p["lokr_w2_a"], p["lokr_w2_b"], role="w2")
    # X: (N, c, d)
    blocks = b.call(aten.reshape.default, x, [-1, layout.c, layout.d], role="x_blocks")
    # (N, c, b)
    xw2 = b.call(aten.matmul.default, blocks, b.call(aten.t.default, w2, role="w2_t"), role="x_w2t")
    y = b.call(aten.matmul.default, w1, xw2, role="w1_x_w2t")  # (N, a, b)
    y = b.call(aten.reshape_as.default, y, b.base, role="delta_out")
    return b.call(aten.mul.Tensor, y, b.options.scaling, role="scaled")
