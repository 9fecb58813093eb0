"""HRA: a product of Householder reflections applied to the weight, as in HF peft 0.21.

    y = W x + b   ->  y = (W H) x + b,   H = (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T)  (linear)
    y = conv(x)   ->  y = conv(x, (W_flat H)_view)                         (2-d convolution)

1. u_i is column i of `hra_u.<adapter>` (d, r) divided by its norm; d = in_features, or
   in_channels k k for a k x k convolution (W_flat: (out, in k k)).
2. `apply_GS=true` orthonormalises the columns first (classical Gram-Schmidt, in column order) and
   uses H = I - 2 U U^T.
3. Merging: W' = W H; the bias is unchanged.
For an even r peft's init repeats each Kaiming-uniform column twice, so H = I at init; an odd r
(or `init_weights=false`) draws every column, and the adapter changes the model from the start.
GPT-2's Conv1D, grouped, dilated or non-square convolutions and `bias` other than "none" are
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    kaiming_uniform,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.boft import weight_shape
from peftc.techniques.oft import check_weight_rotation_site, eager, rotated_dim

__all__ = ["HraOptions", "Hra"]

aten = torch.ops.aten


@dataclass(frozen=True)
class HraOptions(AdapterOptions):
    r: int = rank_option(8, "number of Householder reflections")
    apply_GS: bool = option(
        False, doc="orthonormalise the reflection vectors first (Gram-Schmidt)", peft="apply_GS"
    )
    init_weights: bool = option(
        True, doc="peft's init: repeated columns, so H = I for an even r", peft="init_weights"
    )


def _symmetric_init(tensor: torch.Tensor) -> None:
    """peft's identity init: r/2 Kaiming-uniform columns, each repeated twice (the reflections
    cancel)."""
    half = torch.zeros(tensor.shape[0], tensor.shape[1] // 2)
    kaiming_uniform(half)
    tensor.copy_(torch.repeat_interleave(half, 2, dim=1))


def householder(call: Any, u: Any, d: int, r: int, apply_GS: bool) -> Any:
    """H (d x d) from `hra_u`, in peft's order of operations (`call`: see
    `peftc.techniques.oft.cayley`)."""
    eye = call(
        aten.diag_embed.default, call(aten.new_ones.default, u, [d], role="diag_ones"), role="eye"
    )
    if apply_GS:
        U = _gram_schmidt(call, u, r)
        UUt = call(
            aten.mm.default,
            call(aten.mul.Tensor, U, 2, role="twice"),
            call(aten.t.default, U, role="basis_t"),
            role="projector",
        )
        return call(aten.sub.Tensor, eye, UUt, role="householder")
    norms = call(aten.linalg_vector_norm.default, u, 2, [0], role="norms")
    units = call(aten.div.Tensor, u, norms, role="units")
    H = eye
    for i in range(r):
        ui = _column(call, units, i)
        step = call(
            aten.mm.default,
            call(aten.mm.default, call(aten.mul.Tensor, H, 2, role="twice"), ui, role="hu"),
            call(aten.t.default, ui, role="unit_t"),
            role="huu",
        )
        H = call(aten.sub.Tensor, H, step, role="householder")
    return H


def _gram_schmidt(call: Any, u: Any, r: int) -> Any:
    """The r columns of `u` made orthonormal, one after another (peft's `apply_GS`)."""

    def unit(v: Any) -> Any:
        return call(
            aten.div.Tensor, v, call(aten.linalg_vector_norm.default, v, role="norm"), role="unit"
        )

    basis = [unit(_column(call, u, 0))]
    for i in range(1, r):
        ui = _column(call, u, i)
        for w in basis:
            projection = call(
                aten.mm.default, call(aten.t.default, w, role="basis_t"), ui, role="projection"
            )
            component = call(aten.mul.Tensor, projection, w, role="component")
            ui = call(aten.sub.Tensor, ui, component, role="orthogonal")
        basis.append(unit(ui))
    return call(aten.cat.default, basis, 1, role="basis")


def _column(call: Any, t: Any, i: int) -> Any:
    return call(aten.slice.Tensor, t, 1, i, i + 1, role="column")


@register_technique
class Hra(Technique):
    """Insert HRA: multiply the weight of the selected linear and 2-d convolution sites by r
    Householder reflections on the input side, `W -> W H`."""

    name = "hra"
    half_precision = "float32"  # peft computes the whole op in float32 then
    options = HraOptions
    peft_type = "HRA"
    peft_fixed = {"bias": "none"}
    site_kinds = ("linear", "conv")
    stage = "weight"

    def check(self, gm: fx.GraphModule, site: Any, options: HraOptions) -> None:
        check_weight_rotation_site("hra", site)

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        symmetric = o.init_weights and o.r % 2 == 0
        return [
            Param(
                "hra_u",
                (rotated_dim(ctx.site), o.r),
                init=_symmetric_init if symmetric else kaiming_uniform,
            )
        ]

    def build(self, b: Builder, W: fx.Node) -> fx.Node:
        return self._apply(b.call, W, weight_shape(b.site), b.param("hra_u"), b.site, b.options)

    @staticmethod
    def _apply(call: Any, W: Any, size: list[int], u: Any, site: Any, o: HraOptions) -> Any:
        H = householder(call, u, rotated_dim(site), o.r, o.apply_GS)
        flat = call(aten.reshape.default, W, [size[0], -1], role="weight_flat")
        return call(
            aten.reshape.default,
            call(aten.mm.default, flat, H, role="reflected"),
            size,
            role="hra_weight",
        )

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._apply(
            eager, weight, list(weight.shape), ctx.tensor("hra_u").float(), ctx.site, ctx.options
        ), bias

    def describe(self, options: HraOptions, sites: list[Any]) -> str:
        gs = " with Gram-Schmidt" if options.apply_GS else ""
        return f"HRA r={options.r}{gs} on {len(sites)} sites, adapter {options.adapter!r}"
