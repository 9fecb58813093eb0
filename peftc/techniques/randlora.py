"""RandLoRA: trainable diagonal scalings of one pair of frozen random bases, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + s * U_2 (U_1 dropout(x)),   s = alpha / r

1. One adapter shares frozen `randlora_A` (r, 1, d_min) and `randlora_B` (d_max, n, r) across its
   sites: d_max and d_min are the larger and smaller of (max out, max in) over the sites it
   targets, n = ceil(d_min / r). peft draws them on the CPU from one generator seeded with
   `projection_prng_key`: Kaiming-uniform in bfloat16 (A, then B one basis at a time), or ternary
   -1 / 0 / 1 from uniform draws (`sparse`: probability 1/6 each for -1 and 1; `very_sparse`:
   1 / (2 sqrt(d_min)) each); each divided by its standard deviation.
2. A site with (out, in) = (large, small) in some order reads n_s = ceil(small / r) bases and
   trains `randlora_lambda` (r, n_s) and `randlora_gamma` (n_s, small):
   `S = (lambda[:, :, None] * A[:, :, :small] * gamma[None]).flatten(0, 1)` (r n_s, small) and
   `Bf = B[:large, :n_s].flatten(1)` (large, n_s r); U_1, U_2 = S, Bf where small = in, else
   Bf^T, S^T. peft's init (`init_weights=true`): lambda = 0, gamma = 1 / max(n_s, small), so the
   module computes what it did; `init_weights=false`: lambda ~ N(0, 1), gamma = 1 / large.
3. Linear sites only (nn.Linear, NF4, GPT-2 Conv1D), as in peft; merge adds `s U_2 U_1` to W.
4. Over a float16/bfloat16 model the bases are rounded to its dtype first, as peft casts them;
   with `autocast_adapter_dtype=false` the term is computed in the model's dtype, as peft does on
   an accelerator (peft on the CPU computes it in float32 then, one bfloat16 step apart).
Parameters: `<path>.randlora_lambda.<adapter>`, `<path>.randlora_gamma.<adapter>`; the shared
buffers are saved as `base_model.randlora_A` / `base_model.randlora_B` and, as peft's layers hold
them too, once more under every site (`base_model.model.<path>.randlora_A`), with
`save_projection=true`; else regenerated from the key on load. Each adapter draws its own bases,
sized by its own targets. `bias` other than "none" is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.ir.graph import get_tensor
from peftc.sites.formats import format_of
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.oft import eager

__all__ = ["RandLoraOptions", "RandLora", "bases"]

aten = torch.ops.aten
SHARED = ("randlora_A", "randlora_B")


@dataclass(frozen=True)
class RandLoraOptions(AdapterOptions):
    r: int = rank_option(32, "rank of each random basis (more bases, so more parameters, if lower)")
    alpha: float = option(640.0, doc="the update's scale: s = alpha / r", peft="randlora_alpha")
    dropout: float = dropout_option("randlora_dropout")
    projection_prng_key: int = option(
        0, doc="seed of the shared bases (peft's generator)", peft="projection_prng_key"
    )
    save_projection: bool = option(
        True,
        doc="save the bases in the checkpoint (else regenerated from the key)",
        peft="save_projection",
    )
    sparse: bool = option(
        False, doc="ternary bases, -1 and 1 with probability 1/6 each", peft="sparse"
    )
    very_sparse: bool = option(
        False,
        doc="ternary bases, -1 and 1 with probability 1 / (2 sqrt(d_min)) each (over sparse)",
        peft="very_sparse",
    )
    init_weights: bool = option(
        True,
        doc="lambda = 0, gamma = 1 / max(n, d) (the identity at init); false: lambda ~ N(0, 1)",
        peft="init_weights",
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _count(dim: int, r: int) -> int:
    """peft's number of bases for full rank: ceil(dim / r)."""
    return -(-dim // r)


def _dense_dtype() -> torch.dtype:
    # peft draws in bfloat16 where accelerate's is_bf16_available says so, else float16
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=_dense_dtype())
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _ternary(draws: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = torch.zeros(draws.shape)
    out[draws < 1 / (2 * sparsity)] = -1
    out[draws > 1 - 1 / (2 * sparsity)] = 1
    return out / out.std()


def bases(o: RandLoraOptions, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's shared (randlora_A, randlora_B), drawn on the CPU from one seeded generator."""
    small, large = min(max_out, max_in), max(max_out, max_in)
    n = _count(small, o.r)
    generator = torch.Generator(device="cpu").manual_seed(o.projection_prng_key)
    if o.sparse or o.very_sparse:
        sparsity = math.sqrt(small) if o.very_sparse else 3
        a = torch.rand((o.r, 1, small), generator=generator)
        b = torch.rand((large, n, o.r), generator=generator)
        return _ternary(a, sparsity), _ternary(b, sparsity)
    a = _kaiming((o.r, 1, small), generator)
    b = torch.cat([_kaiming((large, 1, o.r), generator) for _ in range(n)], dim=1)
    return a / a.std(), b / b.std()


def _stored_dtype(gm: fx.GraphModule, site: Any) -> torch.dtype | None:
    weight = get_tensor(gm, format_of(site).storage(gm, site)[0])
    return weight.dtype if weight.is_floating_point() else None


def _updates(call: Any, A: Any, B: Any, lam: Any, gamma: Any, site: Any, r: int) -> tuple:
    """(U_1, U_2) in peft's order of operations (`call`: `Builder.call`, or `eager` to merge)."""
    small, large = sorted((site.in_features, site.out_features))
    n = _count(small, r)
    # A's second dim is 1: peft's slice [:, :n] leaves it whole
    A = call(aten.slice.Tensor, A, 2, 0, small, role="randlora_A_sliced")
    B = call(aten.slice.Tensor, B, 0, 0, large, role="randlora_B_rows")
    B = call(aten.slice.Tensor, B, 1, 0, n, role="randlora_B_sliced")
    scaled = call(
        aten.mul.Tensor,
        call(aten.mul.Tensor, call(aten.unsqueeze.default, lam, 2, role="lambda"), A, role="lA"),
        call(aten.unsqueeze.default, gamma, 0, role="gamma"),
        role="scaled_A",
    )
    update_a = call(aten.flatten.using_ints, scaled, 0, 1, role="update_A")
    update_b = call(aten.flatten.using_ints, B, 1, 2, role="update_B")
    if small == site.in_features:
        return update_a, update_b
    return (
        call(aten.t.default, update_b, role="update_B_t"),
        call(aten.t.default, update_a, role="update_A_t"),
    )


@register_technique
class RandLora(Technique):
    """Insert RandLoRA branches: `y = W x + b -> y = W x + b + s U_2 U_1 dropout(x)`, scaled
    random bases shared and frozen."""

    name = "randlora"
    half_precision = "float32"
    options = RandLoraOptions
    peft_type = "RANDLORA"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: RandLoraOptions
    ) -> list[Param]:
        max_out = max(s.out_features for s in sites)
        max_in = max(s.in_features for s in sites)
        tensors = bases(options, max_out, max_in)
        # peft casts them to each adapted layer's floating dtype in turn before any upcast
        for dtype in filter(None, (_stored_dtype(gm, s) for s in sites)):
            tensors = tuple(t.to(dtype) for t in tensors)
        return [Param(a, value=t, trainable=False) for a, t in zip(SHARED, tensors, strict=True)]

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        small, large = sorted((ctx.site.in_features, ctx.site.out_features))
        n = _count(small, o.r)
        if o.init_weights:
            return [
                Param("randlora_lambda", (o.r, n)),
                Param("randlora_gamma", (n, small), init=lambda t: t.fill_(1 / max(n, small))),
            ]
        return [
            Param("randlora_lambda", (o.r, n), init=nn.init.normal_),
            Param("randlora_gamma", (n, small), init=lambda t: t.fill_(1 / large)),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"randlora_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        if b.options.dropout:
            x = b.module("randlora_dropout", x, role="dropout")
        first, second = _updates(
            b.call,
            b.param("randlora_A"),
            b.param("randlora_B"),
            b.param("randlora_lambda"),
            b.param("randlora_gamma"),
            b.site,
            b.options.r,
        )
        h = b.call(aten.linear.default, x, first, role="randlora_first")
        h = b.call(aten.linear.default, h, second, role="randlora_second")
        return b.call(aten.mul.Tensor, h, b.options.scaling, role="randlora")

    def delta(self, ctx: Context) -> torch.Tensor:
        first, second = _updates(
            eager,
            *(ctx.tensor(a).float() for a in (*SHARED, "randlora_lambda", "randlora_gamma")),
            ctx.site,
            ctx.options.r,
        )
        return (second @ first) * ctx.options.scaling

    def saved(self, options: RandLoraOptions, attr: str) -> bool:
        return options.save_projection or attr not in SHARED

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # peft's layers hold the shared bases too, so its file repeats them under every site
        copies = {
            f"base_model.model.{path}.{attr}": tensors[f"base_model.{attr}"].clone()
            for path, kind in ctx.sites
            if kind in self.site_kinds
            for attr in SHARED
            if f"base_model.{attr}" in tensors
        }
        return {**tensors, **copies}

    def to_peft(self, options: RandLoraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: RandLoraOptions, sites: list[Any]) -> str:
        return f"RandLoRA r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"
