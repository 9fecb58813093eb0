"""VeRA: trainable scaling vectors around one pair of frozen random projections, as in HF peft.

    y = W x + b  ->  y = W x + b + λ_b ⊙ (B_s (λ_d ⊙ (A_s dropout(x))))

1. One adapter shares frozen `vera_A` (r, max_in) and `vera_B` (max_out, r) across all its
   sites; (max_out, max_in) is the largest (out, in) among the sites it targets, and each site
   reads the slices `A_s = A[:, :in]`, `B_s = B[:out, :]`. They are drawn as peft draws them:
   Kaiming-uniform from a dedicated CPU generator seeded with `projection_prng_key`, A first.
2. Each site trains `λ_d` (r,) and `λ_b` (out,); `λ_b = 0`, `λ_d = d_initial` (peft's
   `init_weights=True`), so at init the module computes what it did; `init_weights=false`
   gives λ_b = 1, λ_d ~ N(0, 1) as in peft.
3. Linear sites only (nn.Linear, NF4, GPT-2 Conv1D), as in peft; merge adds
   `(λ_b B_s)(λ_d A_s)` to W.
Parameters: `<path>.vera_lambda_b.<adapter>`, `<path>.vera_lambda_d.<adapter>`; the shared
buffers `vera_A.<adapter>`, `vera_B.<adapter>` are shared tensors, saved as peft's
`base_model.vera_A` and `base_model.vera_B` with `save_projection=true` (the core's rule for shared
tensors), else regenerated from the key on load.
Each adapter draws its own projections, sized by its own targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

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

__all__ = ["VeraOptions", "Vera", "projections"]

aten = torch.ops.aten


@dataclass(frozen=True)
class VeraOptions(AdapterOptions):
    r: int = rank_option(256, "rank of the shared frozen projections")
    dropout: float = dropout_option("vera_dropout")
    d_initial: float = option(0.1, doc="initial value of λ_d", peft="d_initial")
    projection_prng_key: int = option(
        0, doc="seed of the shared projections (peft's generator)", peft="projection_prng_key"
    )
    save_projection: bool = option(
        True,
        doc="save the projections in the checkpoint (else regenerated from the key)",
        peft="save_projection",
    )
    init_weights: bool = option(
        True,
        doc="λ_b = 0, λ_d = d_initial (the identity at init); false: λ_b = 1, λ_d ~ N(0, 1)",
        peft="init_weights",
    )


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # peft's _kaiming_init: fan_in, gain sqrt(2)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, max_out: int, max_in: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's shared (vera_A, vera_B): drawn in fp32 on the CPU, A then B, from one seeded
    generator."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = _kaiming_uniform((r, max_in), generator)
    return vera_a, _kaiming_uniform((max_out, r), generator)


@register_technique
class Vera(Technique):
    """Insert VeRA branches: `y = W x + b -> y = W x + b + λ_b ⊙ B_s(λ_d ⊙ A_s dropout(x))`, A and B
    shared and frozen."""

    name = "vera"
    half_precision = "float32"
    options = VeraOptions
    peft_type = "VERA"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: VeraOptions
    ) -> list[Param]:
        max_out = max(s.out_features for s in sites)
        max_in = max(s.in_features for s in sites)
        vera_a, vera_b = projections(options.r, max_out, max_in, options.projection_prng_key)
        return [
            Param("vera_A", value=vera_a, trainable=False),
            Param("vera_B", value=vera_b, trainable=False),
        ]

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        if o.init_weights:
            return [
                Param("vera_lambda_b", (ctx.site.out_features,)),
                Param("vera_lambda_d", (o.r,), init=lambda t: t.fill_(o.d_initial)),
            ]
        return [
            Param("vera_lambda_b", (ctx.site.out_features,), init=nn.init.ones_),
            Param("vera_lambda_d", (o.r,), init=nn.init.normal_),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"vera_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout > 0 else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site = b.site
        if b.options.dropout > 0:
            x = b.module("vera_dropout", x, role="dropout")
        sliced_a = b.call(
            aten.slice.Tensor, b.param("vera_A"), 1, 0, site.in_features, role="vera_A_sliced"
        )
        sliced_b = b.call(
            aten.slice.Tensor, b.param("vera_B"), 0, 0, site.out_features, role="vera_B_sliced"
        )
        # peft's order: lambda_b * linear(lambda_d * linear(x, A_s), B_s)
        h = b.call(
            aten.mul.Tensor,
            b.param("vera_lambda_d"),
            b.call(aten.linear.default, x, sliced_a, role="vera_A_out"),
            role="lambda_d_out",
        )
        h = b.call(aten.linear.default, h, sliced_b, role="vera_B_out")
        return b.call(aten.mul.Tensor, b.param("vera_lambda_b"), h, role="lambda_b_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        site = ctx.site
        sliced_a = ctx.tensor("vera_A").float()[:, : site.in_features]
        sliced_b = ctx.tensor("vera_B").float()[: site.out_features, :]
        lambda_b, lambda_d = (
            ctx.tensor("vera_lambda_b").float(),
            ctx.tensor("vera_lambda_d").float(),
        )
        return (lambda_b.unsqueeze(-1) * sliced_b) @ (lambda_d.unsqueeze(-1) * sliced_a)

    def saved(self, options: VeraOptions, attr: str) -> bool:
        return options.save_projection or attr not in ("vera_A", "vera_B")

    def to_peft(self, options: VeraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: VeraOptions, sites: list[Any]) -> str:
        return f"VeRA r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"
