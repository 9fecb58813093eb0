"""PVeRA: VeRA whose down-projection gives a mean and a log-variance, sampled in training, as in
HF peft 0.21.

    y = W x + b  ->  y = W x + b + λ_b ⊙ (B_s z),   (μ, log σ²) = chunk(λ_d ⊙ (A_s dropout(x)), 2)
    training (or `sample_at_inference`):  z = μ + ε ⊙ exp(log σ² / 2),  ε ~ N(0, I)
    eval:                                 z = μ

1. One adapter shares frozen `pvera_A` (2r, max_in) and `pvera_B` (max_out, r) across its sites;
   (max_out, max_in) is the largest (out, in) among the sites it targets, and each site reads
   `A_s = A[:, :in]`, `B_s = B[:out, :]`. peft draws them with `kaiming_uniform_` from one CPU
   generator seeded with `projection_prng_key`, A first.
2. Each site trains `λ_d` (2r,) and `λ_b` (out,); `init_weights=true`: λ_b = 0, λ_d = d_initial
   (the identity at init); `init_weights=false`: λ_b = 1, λ_d ~ N(0, 1).
3. ε is drawn from torch's global generator, or, with `generator_seed`, from a CPU generator of
   each site's own seeded once (peft's layers each hold one), as peft draws it.
4. Linear sites only (nn.Linear, NF4, GPT-2 Conv1D), as in peft; merge adds the mean's update
   `(λ_b B_s)(λ_d[:r] A_s[:r])` to W, refused with `sample_at_inference` (the graph samples then,
   so no weight computes what it does).
Parameters: `<path>.pvera_lambda_b.<adapter>`, `<path>.pvera_lambda_d.<adapter>`; the shared
buffers `pvera_A.<adapter>`, `pvera_B.<adapter>` are saved as peft's `base_model.pvera_A` and
`base_model.pvera_B` with `save_projection=true`, else regenerated from the key on load. Each
adapter draws its own projections, sized by its own targets. `bias` other than "none" is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import NotMergeable
from peftc.technique import (
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.vera import VeraOptions

__all__ = ["PveraOptions", "Pvera", "PveraSample"]

aten = torch.ops.aten


@dataclass(frozen=True)
class PveraOptions(VeraOptions):
    r: int = rank_option(256, "rank: the mean and the log-variance have r entries each")
    dropout: float = dropout_option("pvera_dropout")
    sample_at_inference: bool = option(
        False,
        doc="sample in eval mode too (else the mean); such an adapter does not merge",
        peft="sample_at_inference",
    )
    generator_seed: int | None = option(
        None,
        doc="seed of each site's own noise generator (None: torch's global one)",
        peft="generator_seed",
    )


class PveraSample(nn.Module):
    """peft's `_reparametrize`: μ + ε exp(log σ² / 2) in training or with `always`, else μ; ε
    from `generator` (on the CPU, as peft's) when there is one, else from torch's."""

    def __init__(self, always: bool, seed: int | None) -> None:
        super().__init__()
        self.always = always
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.always):
            return mu
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, dtype=std.dtype, generator=self.generator)
            eps = eps.to(std.device)
        return mu + eps * std


def projections(r: int, max_out: int, max_in: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's shared (pvera_A (2r, max_in), pvera_B (max_out, r)): fp32 on the CPU, A then B."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    pvera_a = nn.init.kaiming_uniform_(torch.empty(2 * r, max_in), generator=generator)
    return pvera_a, nn.init.kaiming_uniform_(torch.empty(max_out, r), generator=generator)


@register_technique
class Pvera(Technique):
    """Insert PVeRA branches: `y = W x + b -> y = W x + b + λ_b ⊙ B_s z`, z sampled around the mean
    half of `λ_d ⊙ A_s dropout(x)` in training; A and B shared and frozen."""

    name = "pvera"
    half_precision = "float32"
    options = PveraOptions
    peft_type = "PVERA"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: PveraOptions
    ) -> list[Param]:
        max_out = max(s.out_features for s in sites)
        max_in = max(s.in_features for s in sites)
        pvera_a, pvera_b = projections(options.r, max_out, max_in, options.projection_prng_key)
        return [
            Param("pvera_A", value=pvera_a, trainable=False),
            Param("pvera_B", value=pvera_b, trainable=False),
        ]

    def params(self, ctx: Context) -> list[Param]:
        o, out = ctx.options, ctx.site.out_features
        if o.init_weights:
            return [
                Param("pvera_lambda_b", (out,)),
                Param("pvera_lambda_d", (2 * o.r,), init=lambda t: t.fill_(o.d_initial)),
            ]
        return [
            Param("pvera_lambda_b", (out,), init=nn.init.ones_),
            Param("pvera_lambda_d", (2 * o.r,), init=nn.init.normal_),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        o = ctx.options
        sample = {"pvera_sample": PveraSample(o.sample_at_inference, o.generator_seed)}
        return {"pvera_dropout": nn.Dropout(o.dropout), **sample} if o.dropout > 0 else sample

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, r = b.site, b.options.r
        if b.options.dropout > 0:
            x = b.module("pvera_dropout", x, role="dropout")
        sliced_a = b.call(
            aten.slice.Tensor, b.param("pvera_A"), 1, 0, site.in_features, role="pvera_A_sliced"
        )
        sliced_b = b.call(
            aten.slice.Tensor, b.param("pvera_B"), 0, 0, site.out_features, role="pvera_B_sliced"
        )
        h = b.call(
            aten.mul.Tensor,
            b.param("pvera_lambda_d"),
            b.call(aten.linear.default, x, sliced_a, role="pvera_A_out"),
            role="lambda_d_out",
        )
        # peft's chunk(2, dim=-1): the mean, then the log-variance
        mu = b.call(aten.slice.Tensor, h, -1, 0, r, role="mu")
        logvar = b.call(aten.slice.Tensor, h, -1, r, 2 * r, role="logvar")
        z = b.module("pvera_sample", mu, logvar, role="sample")
        h = b.call(aten.linear.default, z, sliced_b, role="pvera_B_out")
        return b.call(aten.mul.Tensor, b.param("pvera_lambda_b"), h, role="lambda_b_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        o, site = ctx.options, ctx.site
        if o.sample_at_inference:
            raise NotMergeable(
                "pvera with sample_at_inference=true samples in eval mode, so no merged weight "
                "computes what it does; keep it unmerged or set sample_at_inference=false"
            )
        sliced_a = ctx.tensor("pvera_A").float()[: o.r, : site.in_features]
        sliced_b = ctx.tensor("pvera_B").float()[: site.out_features, :]
        lambda_b = ctx.tensor("pvera_lambda_b").float()
        lambda_d = ctx.tensor("pvera_lambda_d").float()[: o.r]
        return (lambda_b.unsqueeze(-1) * sliced_b) @ (lambda_d.unsqueeze(-1) * sliced_a)

    def saved(self, options: PveraOptions, attr: str) -> bool:
        return options.save_projection or attr not in ("pvera_A", "pvera_B")

    def to_peft(self, options: PveraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: PveraOptions, sites: list[Any]) -> str:
        return f"PVeRA r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"
