"""LoHa: a Hadamard product of two low-rank matrices beside linear and convolution sites, as in HF
peft.

    y = W x + b  ->  y = W x + b + dW x,   dW = s * (A1 B1) ⊙ (A2 B2),  s = alpha / r

peft builds dW (out x in) on every forward step. On linear sites peftc does not when the
factored form is cheaper: with U = rows-Khatri-Rao(A1, A2) (out x r^2) and V =
cols-Khatri-Rao(B1, B2) (r^2 x in), dW = U V, so dW x = U (V x) costs r^2 (in + out) per
token instead of in * out.

1. Linear, factored (`r^2 (in + out) < in * out`): `linear(linear(x, V), U) * s`.
2. Linear, dense otherwise: `linear(x, (A1 B1) ⊙ (A2 B2) * s)`.
3. Conv1d / Conv2d: as peft, dW reshaped to the kernel's shape, then the base's convolution
   (stride, padding, dilation, groups) with dW and no bias. B1, B2 span in/groups x kernel.
4. Conv with `use_effective_conv2d` (kernel not 1): peft's CP form, dW = s * R1 ⊙ R2 with
   Ri[p, r, k, l] = sum_ij ti[i, j, k, l] Bi[j, r] Ai[i, p]; the gradients of A1 and A2 are
   peft's (its HadaWeightCP backward pairs each A with the other factor's core).
Conv3d and GPT-2's Conv1D are refused, as peft refuses them, and so is nn.MultiheadAttention.
Parameters: `<path>.hada_w1_a.<adapter>` (out, r) (effective: (r, out)), `hada_w1_b` (r, in),
`hada_w2_a`, `hada_w2_b`, `hada_t1`, `hada_t2` (r, r, kh, kw); w2_b starts at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor
from peftc.sites.weight import LinearSite
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
from peftc.techniques.lora import multihead_attention, refuse_convolution

__all__ = ["LohaOptions", "Loha"]

aten = torch.ops.aten
_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LohaOptions(PatternOptions):
    r: int = rank_option(8, "rank of each of the two low-rank factors")
    alpha: float = option(8.0, doc="the update's scale: s = alpha / r", peft="alpha")
    use_effective_conv2d: bool = option(
        False,
        doc="peft's CP decomposition of convolution kernels larger than 1",
        peft="use_effective_conv2d",
    )
    rank_dropout: float = dropout_option(
        "rank_dropout", "in training, drop each output row of the update (kept rows rescaled)"
    )
    module_dropout: float = dropout_option(
        "module_dropout", "in training, drop the whole update for a step with this probability"
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _factored_product(
    b: Builder, x: fx.Node, w1a: fx.Node, w1b: fx.Node, w2a: fx.Node, w2b: fx.Node
) -> fx.Node:
    """s * U (V x), never forming dW: U[o, i*r + j] = w1a[o, i] w2a[o, j] and
    V[i*r + j, n] = w1b[i, n] w2b[j, n]."""
    site, r = b.site, b.options.r
    U = b.call(
        aten.mul.Tensor,
        b.call(aten.unsqueeze.default, w1a, 2, role="w1a_col"),
        b.call(aten.unsqueeze.default, w2a, 1, role="w2a_row"),
        role="u_outer",
    )
    U = b.call(aten.reshape.default, U, [site.out_features, r * r], role="u")
    V = b.call(
        aten.mul.Tensor,
        b.call(aten.unsqueeze.default, w1b, 1, role="w1b_col"),
        b.call(aten.unsqueeze.default, w2b, 0, role="w2b_row"),
        role="v_outer",
    )
    V = b.call(aten.reshape.default, V, [r * r, site.in_features], role="v")
    v_out = b.call(aten.linear.default, x, V, role="v_out")
    delta = b.call(aten.linear.default, v_out, U, role="u_out")
    return b.call(aten.mul.Tensor, delta, b.options.scaling, role="scaled")


def _factored(site: LinearSite, r: int) -> bool:
    return r * r * (site.in_features + site.out_features) < site.in_features * site.out_features


def effective(site: Any, options: Any) -> bool:
    """peft's `use_effective_conv2d` holds at a convolution whose kernel is not all ones."""
    return site.kind == "conv" and options.use_effective_conv2d and math.prod(site.kernel_size) != 1


def refuse_lycoris(name: str, site: Any) -> None:
    """The sites peft's LyCORIS methods (LoHa, LoKr) refuse: they take nn.Linear, nn.Conv1d and
    nn.Conv2d only."""
    if site.kind == "conv":
        if site.dims == 3:
            raise OptionError(
                f"{name}: peft does not support Conv3d ({site.path!r}); exclude it from targets"
            )
        refuse_convolution(name, site)
    elif getattr(site, "fan_in_fan_out", False):
        raise OptionError(
            f"{name}: peft does not support GPT-2's Conv1D ({site.path!r}); exclude it from targets"
        )
    elif mha := multihead_attention(site):
        raise OptionError(
            f"{name}: peft does not support nn.MultiheadAttention ({mha[1]!r}); exclude it from "
            "targets"
        )


def weight_shape(b: Builder) -> list[int]:
    return list(get_tensor(b.gm, b.site.weight).shape)


# peft's LyCORIS fields (LoHa, LoKr): a checkpoint brings its weights
LYCORIS_FIXED = {"init_weights": True}
LYCORIS_IGNORED = ("init_weights",)


class LycorisDropout(nn.Module):
    """peft's LyCORIS dropouts on an update's output `term`, in training only and in peft's order of
    random draws: the whole update is dropped for the step with probability `module_p` (the adapter
    then gets no gradient, as in peft, which skips it); else each output channel is dropped with
    probability `rank_p`, the kept ones divided by their mean where `rescale` (peft drops rows of
    dW; row o of dW makes channel o)."""

    def __init__(self, module_p: float, rank_p: float, rescale: bool, channel_dim: int):
        super().__init__()
        self.module_p, self.rank_p = module_p, rank_p
        self.rescale, self.channel_dim = rescale, channel_dim

    def forward(self, term: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return term
        if not torch.rand(1) > self.module_p:
            return torch.zeros_like(term)
        if not self.rank_p:
            return term
        channels = term.shape[self.channel_dim]
        drop = (torch.rand(channels) > self.rank_p).to(term.dtype)
        if self.rescale:
            drop /= drop.mean()
        shape = [channels] + [1] * (term.dim() - self.channel_dim % term.dim() - 1)
        return term * drop.to(term.device).view(shape)


def lycoris_dropout(ctx: Context, rescale: bool) -> dict[str, nn.Module]:
    """The dropout module of a LoHa or LoKr site, if its options drop anything."""
    o = ctx.options
    if not (o.rank_dropout or o.module_dropout):
        return {}
    channel_dim = 1 if ctx.site.kind == "conv" else -1
    return {"dropout": LycorisDropout(o.module_dropout, o.rank_dropout, rescale, channel_dim)}


def dropped(b: Builder, term: fx.Node) -> fx.Node:
    """`term` through the site's LyCORIS dropout, where it has one."""
    return b.module("dropout", term, role="dropout") if "dropout" in b.ctx.modules else term


def conv_with(b: Builder, x: fx.Node, weight: fx.Node) -> fx.Node:
    """The site's convolution of `x` with `weight` and no bias, as peft's
    `_get_delta_activations`."""
    target, args = b.site.functional(x, weight, None)
    return b.call(target, *args, role="delta_out")


@register_technique
class Loha(Technique):
    """Insert LoHa branches: `y = W x + b -> y = W x + b + s ((A1 B1) ⊙ (A2 B2)) x`."""

    name = "loha"
    options = LohaOptions
    peft_type = "LOHA"
    peft_fixed, peft_ignored = LYCORIS_FIXED, LYCORIS_IGNORED
    site_kinds = ("linear", "conv")
    half_precision = "float32"

    def check(self, gm: fx.GraphModule, site: Any, options: LohaOptions) -> None:
        refuse_lycoris("loha", site)

    def params(self, ctx: Context) -> list[Param]:
        site, r = ctx.site, ctx.options.r
        if site.kind == "linear":
            out, inner = site.out_features, site.in_features
        else:
            out, inner = site.out_channels, site.in_channels // site.groups
        if effective(site, ctx.options):
            core = (r, r, *site.kernel_size, 1)[:4]  # Conv1d's core has a trailing 1
            return [
                Param("hada_w1_a", (r, out), init=kaiming_uniform),
                Param("hada_w1_b", (r, inner), init=kaiming_uniform),
                Param("hada_w2_a", (r, out), init=kaiming_uniform),
                Param("hada_w2_b", (r, inner)),
                Param("hada_t1", core, init=kaiming_uniform),
                Param("hada_t2", core, init=kaiming_uniform),
            ]
        if site.kind == "conv":
            inner *= math.prod(site.kernel_size)
        shapes = [(out, r), (r, inner)] * 2
        return [
            Param(attr, shape, init=None if attr == "hada_w2_b" else kaiming_uniform)
            for attr, shape in zip(_ROLES, shapes, strict=True)
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return lycoris_dropout(ctx, rescale=True)

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        return dropped(b, self._update(b, x))

    def _update(self, b: Builder, x: fx.Node) -> fx.Node:
        """dW x, in peft's order of operations."""
        site, r = b.site, b.options.r
        w1a, w1b, w2a, w2b = (b.param(attr) for attr in _ROLES)
        if site.kind == "conv":
            if effective(site, b.options):
                weight = self._cp_weight(b, w1a, w1b, w2a, w2b)
            else:
                hadamard = b.call(
                    aten.mul.Tensor,
                    b.call(aten.mm.default, w1a, w1b, role="w1"),
                    b.call(aten.mm.default, w2a, w2b, role="w2"),
                    role="hadamard",
                )
                weight = b.call(
                    aten.mul.Tensor, hadamard, b.options.scaling, role="delta_weight_2d"
                )
            return conv_with(
                b, x, b.call(aten.reshape.default, weight, weight_shape(b), role="delta_weight")
            )
        if _factored(site, r):
            return _factored_product(b, x, w1a, w1b, w2a, w2b)
        w1 = b.call(aten.mm.default, w1a, w1b, role="w1")
        w2 = b.call(aten.mm.default, w2a, w2b, role="w2")
        weight = b.call(
            aten.mul.Tensor,
            b.call(aten.mul.Tensor, w1, w2, role="hadamard"),
            b.options.scaling,
            role="delta_weight",
        )
        return b.call(aten.linear.default, x, weight, role="delta_out")

    def _cp_weight(
        self, b: Builder, w1a: fx.Node, w1b: fx.Node, w2a: fx.Node, w2b: fx.Node
    ) -> fx.Node:
        """peft's HadaWeightCP: values R1 ⊙ R2 * s; A1's gradient contracts with t2 B2 and A2's with
        t1 B1 (peft's backward), so each A enters its R twice: detached with its own core, and
        through the other core as `g - g.detach()`."""

        def einsum(eq: str, *ts: fx.Node, role: str) -> fx.Node:
            return b.call(aten.einsum.default, eq, list(ts), role=role)

        detach = lambda t, role: b.call(aten.detach.default, t, role=role)  # noqa: E731
        core1 = einsum("ijkl,jr->irkl", b.param("hada_t1"), w1b, role="t1_w1b")
        core2 = einsum("ijkl,jr->irkl", b.param("hada_t2"), w2b, role="t2_w2b")
        rebuilt = []
        for i, (core, other, a) in enumerate(((core1, core2, w1a), (core2, core1, w2a)), 1):
            value = einsum(
                "irkl,ip->prkl", core, detach(a, role=f"w{i}a_detached"), role=f"rebuild{i}_value"
            )
            grad = einsum(
                "irkl,ip->prkl", detach(other, role=f"other_core{i}"), a, role=f"rebuild{i}_grad"
            )
            zero = b.call(
                aten.sub.Tensor,
                grad,
                detach(grad, role=f"rebuild{i}_grad_detached"),
                role=f"rebuild{i}_zero",
            )
            rebuilt.append(b.call(aten.add.Tensor, value, zero, role=f"rebuild{i}"))
        product = b.call(aten.mul.Tensor, rebuilt[0], rebuilt[1], role="hadamard")
        return b.call(aten.mul.Tensor, product, b.options.scaling, role="delta_weight_cp")

    def delta(self, ctx: Context) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (ctx.tensor(attr).float() for attr in _ROLES)
        s = ctx.options.scaling
        if effective(ctx.site, ctx.options):
            t1, t2 = ctx.tensor("hada_t1").float(), ctx.tensor("hada_t2").float()
            rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
            weight = rebuild1 * rebuild2 * s
        else:
            weight = (w1a @ w1b) * (w2a @ w2b) * s
        return (
            weight.reshape(get_tensor(ctx.gm, ctx.site.weight).shape)
            if ctx.site.kind == "conv"
            else weight
        )

    def describe(self, options: LohaOptions, sites: list[Any]) -> str:
        factored = sum(_factored(s, options.r) for s in sites if s.kind == "linear")
        return (
            f"LoHa r={options.r} on {len(sites)} sites ({factored} factored, "
            f"{len(sites) - factored} dense)"
        )
