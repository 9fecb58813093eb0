"""PSOFT: an r x r orthogonal map between frozen principal-subspace factors, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + s B ((R - I) (A dropout(x))),   s = alpha / r

1. A (r, in) and B (out, r) come from an SVD of W when the adapter is created and are frozen:
   `psoft_init` A = V_r^T, B = U_r diag(S_r / s); `pissa_init` splits sqrt(S_r / s) over both.
   `svd="lowrank"` is torch.svd_lowrank under a forked RNG seeded with `random_seed`. peft does
   not save them (it recomputes them from the base weight on load), so neither does peftc.
2. R = diag(m_b) C diag(m_a); with `orth`, C is the Cayley transform (I + Q)(I - Q)^-1 of the
   skew-symmetric Q whose upper triangle (row-major) is `psoft_R.<adapter>.weight`, or its
   Neumann series I + 2Q + ... + Q^(n-1) (`use_cayley_neumann`; Q first scaled into the
   Frobenius ball of radius `cayley_neumann_eps` when set); without `orth` C is the free (r, r)
   weight. m_b and m_a (`mag_b`, `mag_a`) are trainable vectors starting at 1.
3. The weight starts at zero (R = I, no change; without `orth` the identity);
   `init_weights=false` draws N(0, 0.1) (the identity plus that noise without `orth`).
4. Merging adds s B (R - I) A to W, computed in float32 on the CPU and in the weight's dtype
   elsewhere, as peft.
Dense nn.Linear sites only, as peft: GPT-2's Conv1D, nn.MultiheadAttention, quantized weights,
r above min(in, out) and float16/bfloat16 bases with autocast_adapter_dtype=false are refused.
Tensors: `<path>.psoft_R.<adapter>.weight`, `.vector_b`, `.vector_a`; `psoft_A`, `psoft_B`
(frozen, not saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.sites.formats import format_of
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    non_negative,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["PsoftOptions", "Psoft"]

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PsoftOptions(AdapterOptions):
    r: int = rank_option(32, "size of the r x r map R between A (r x in) and B (out x r)")
    alpha: float = option(32, doc="scaling alpha / r, as LoRA's alpha", peft="psoft_alpha")
    dropout: float = dropout_option("psoft_dropout")
    ab_svd_init: Literal["psoft_init", "pissa_init"] = option(
        "psoft_init",
        doc="A and B from the SVD: row-orthogonal A (psoft_init) or sqrt(S) on both (pissa_init)",
        peft="ab_svd_init",
    )
    svd: Literal["full", "lowrank"] = option(
        "full", doc="torch.linalg.svd (full) or torch.svd_lowrank", peft="psoft_svd"
    )
    svd_lowrank_niter: int = option(
        10,
        doc="power iterations of svd_lowrank",
        check=non_negative,
        peft="psoft_svd_lowrank_niter",
    )
    random_seed: int = option(0, doc="seed of svd_lowrank's random projection", peft="random_seed")
    orth: bool = option(
        True, doc="R orthogonal (a Cayley transform); false: a free matrix", peft="psoft_orth"
    )
    mag_b: bool = option(True, doc="a trainable scale on R's output side", peft="psoft_mag_b")
    mag_a: bool = option(True, doc="a trainable scale on R's input side", peft="psoft_mag_a")
    use_cayley_neumann: bool = option(
        False,
        doc="approximate the Cayley transform by a Neumann series",
        peft="use_cayley_neumann",
    )
    num_cayley_neumann_terms: int = option(
        5, doc="terms of that series", peft="num_cayley_neumann_terms"
    )
    cayley_neumann_eps: float | None = option(
        None,
        doc="scale Q into the Frobenius ball of this radius, in (0, 1), before the series",
        peft="cayley_neumann_eps",
    )
    init_weights: bool = option(
        True, doc="R starts at the identity (false: random)", peft="init_weights"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.use_cayley_neumann:
            return  # peft ignores both fields then
        if self.num_cayley_neumann_terms <= 0:
            raise OptionError(
                "psoft: num_cayley_neumann_terms must be a positive integer, got "
                f"{self.num_cayley_neumann_terms}"
            )
        eps = self.cayley_neumann_eps
        if eps is not None and not 0.0 < eps < 1.0:
            raise OptionError(f"psoft: cayley_neumann_eps must be in (0, 1) when set, got {eps}")


def _svd(W: torch.Tensor, o: PsoftOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """peft's `_compute_svd_factors`: (U_r, S_r, V_r^T) of the (out, in) float32 weight."""
    if o.svd == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, : o.r], S[: o.r], Vh[: o.r, :]
    on_cpu = W.device.type == "cpu"
    fork = {"devices": []} if on_cpu else {"devices": [W.device], "device_type": W.device.type}
    with torch.random.fork_rng(**fork):  # the global RNG stays untouched, as in peft
        torch.manual_seed(o.random_seed)
        U, S, V = torch.svd_lowrank(W, q=o.r, niter=o.svd_lowrank_niter)
    return U[:, : o.r], S[: o.r], V[:, : o.r].t()


def _factors(W: torch.Tensor, o: PsoftOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in peft's order of operations."""
    U, S, Vh = _svd(W, o)
    S = S / (o.alpha / o.r)
    if o.ab_svd_init == "psoft_init":
        return Vh, U @ torch.diag(S)
    root = torch.sqrt(S)
    return torch.diag(root) @ Vh, U @ torch.diag(root)


def _skew(call: Any, weight: Any, r: int) -> Any:
    """Q from its upper triangle, row-major as peft's triu_indices."""
    ones = call(aten.new_ones.default, weight, [r, r], role="ones")
    mask = call(aten.ne.Scalar, call(aten.triu.default, ones, 1, role="upper_ones"), 0, role="mask")
    zeros = call(aten.new_zeros.default, weight, [r, r], role="zeros")
    upper = call(aten.masked_scatter.default, zeros, mask, weight, role="upper")
    return call(aten.sub.Tensor, upper, call(aten.t.default, upper, role="upper_t"), role="skew")


def _project(call: Any, Q: Any, eps: float) -> Any:
    """peft's `_project_Q`: Q scaled by eps / |Q|_F where its finite norm exceeds eps."""
    norm = call(aten.linalg_vector_norm.default, Q, 2, [-2, -1], role="q_norm")
    # peft's `eps / (norm + 1e-12)`, which torch computes as a reciprocal times eps
    inverse = call(
        aten.reciprocal.default, call(aten.add.Tensor, norm, 1e-12, role="q_norm_eps"), role="inv"
    )
    scaled = call(
        aten.mul.Tensor, Q, call(aten.mul.Tensor, inverse, eps, role="factor"), role="q_scaled"
    )
    above = call(
        aten.logical_and.default,
        call(aten.isfinite.default, norm, role="finite"),
        call(aten.gt.Scalar, norm, eps, role="above"),
        role="project",
    )
    return call(aten.where.self, above, scaled, Q, role="q_projected")


def _cayley(call: Any, weight: Any, o: PsoftOptions) -> Any:
    """(I + Q)(I - Q)^-1, or its Neumann series, in peft's order of operations."""
    Q = _skew(call, weight, o.r)
    eye = call(
        aten.diag_embed.default, call(aten.new_ones.default, weight, [o.r], role="ones_r"), role="I"
    )
    if not o.use_cayley_neumann:
        left = call(aten.sub.Tensor, eye, Q, role="i_minus_q")
        right = call(aten.add.Tensor, eye, Q, role="i_plus_q")
        return call(aten.linalg_solve.default, left, right, left=False, role="cayley")
    if o.cayley_neumann_eps is not None:
        Q = _project(call, Q, o.cayley_neumann_eps)
    R, n = eye, o.num_cayley_neumann_terms
    if n > 1:
        R = call(aten.add.Tensor, R, Q, alpha=2.0, role="neumann")
    if n > 2:
        power = call(aten.mm.default, Q, Q, role="q_power")
        R = call(aten.add.Tensor, R, power, alpha=2.0, role="neumann")
        for _ in range(3, n - 1):
            power = call(aten.mm.default, power, Q, role="q_power")
            R = call(aten.add.Tensor, R, power, alpha=2.0, role="neumann")
        R = call(
            aten.add.Tensor, R, call(aten.mm.default, power, Q, role="q_power"), role="neumann"
        )
    return R


def _matrix(call: Any, tensor: Any, o: PsoftOptions) -> Any:
    """R = diag(m_b) C diag(m_a) (`tensor(key)` gives each tensor: `b.param` or `ctx.tensor`)."""
    R = _cayley(call, tensor("psoft_R"), o) if o.orth else tensor("psoft_R")
    if o.mag_b:
        column = call(aten.unsqueeze.default, tensor("vector_b"), 1, role="vector_b_column")
        R = call(aten.mul.Tensor, column, R, role="scaled_b")
    if o.mag_a:
        row = call(aten.unsqueeze.default, tensor("vector_a"), 0, role="vector_a_row")
        R = call(aten.mul.Tensor, R, row, role="scaled_a")
    return R


def _init_weight(o: PsoftOptions) -> Any:
    if o.orth:
        return None if o.init_weights else (lambda t: nn.init.normal_(t, mean=0.0, std=0.1))
    if o.init_weights:
        return nn.init.eye_
    return lambda t: nn.init.eye_(t).add_(torch.randn_like(t) * 0.1)


@register_technique
class Psoft(Technique):
    """Insert PSOFT branches: `y = W x + b -> y = W x + b + s B ((R - I) A dropout(x))`, A and B
    frozen from W's SVD, R an r x r orthogonal map with trainable scales."""

    name, options, peft_type = "psoft", PsoftOptions, "PSOFT"
    half_precision = "float32"  # peft upcasts R; A and B are float32 from the start
    # peft sets it false on nn.Linear, the only layer it adapts
    peft_fixed = {"fan_in_fan_out": False}
    peft_ignored = ("fan_in_fan_out",)
    preserves_outputs = False  # init_weights=false changes the model at init

    def check(self, gm: fx.GraphModule, site: Any, options: PsoftOptions) -> None:
        refusal = _refusal(gm, site, options)
        if refusal:
            raise OptionError(f"psoft: {site.path!r} {refusal}; exclude it from targets")

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        A, B = _factors(ctx.weight().float(), o)
        size = (o.r * (o.r - 1) // 2,) if o.orth else (o.r, o.r)
        params = [
            Param("psoft_A", value=A, trainable=False),
            Param("psoft_B", value=B, trainable=False),
            Param("psoft_R", size, init=_init_weight(o), suffix="weight"),
        ]
        for side, on in (("vector_b", o.mag_b), ("vector_a", o.mag_a)):
            if on:
                params.append(Param("psoft_R", (o.r,), nn.init.ones_, suffix=side, key=side))
        return params

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"psoft_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        if b.options.dropout:
            x = b.module("psoft_dropout", x, role="dropout")
        xa = b.call(aten.linear.default, x, b.param("psoft_A"), role="psoft_A_out")
        R = _matrix(b.call, b.param, b.options)
        xr = b.call(aten.linear.default, xa, R, role="psoft_R_out")
        moved = b.call(aten.sub.Tensor, xr, xa, role="rotated_minus_identity")
        h = b.call(aten.linear.default, moved, b.param("psoft_B"), role="psoft_B_out")
        return b.call(aten.mul.Tensor, h, b.options.alpha / b.options.r, role="scaled")

    def delta(self, ctx: Context) -> torch.Tensor:
        o, A = ctx.options, ctx.tensor("psoft_A")
        # peft merges in float32 on the CPU, in the weight's dtype elsewhere
        dtype = torch.float32 if A.device.type == "cpu" else ctx.base_dtype
        R = _matrix(eager, ctx.tensor, o).to(dtype)
        eye = torch.eye(o.r, device=A.device, dtype=dtype)
        delta = ctx.tensor("psoft_B").to(dtype) @ (R - eye) @ A.to(dtype)
        return delta * (o.alpha / o.r)

    def saved(self, options: PsoftOptions, attr: str) -> bool:
        return attr not in ("psoft_A", "psoft_B")  # peft recomputes them from the base weight

    def describe(self, options: PsoftOptions, sites: list[Any]) -> str:
        return f"PSOFT r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"


def _refusal(gm: fx.GraphModule, site: Any, o: PsoftOptions) -> str | None:
    """Why peft's PSOFT does not take this site as peftc computes it, or None."""
    if site.fan_in_fan_out:
        return "is a GPT-2 Conv1D, which peft's PSOFT does not support (nn.Linear only)"
    if multihead_attention(site):
        return "belongs to an nn.MultiheadAttention, which peft's PSOFT does not support"
    if site.storage != "dense":
        return (
            f"stores its weight as {site.storage!r}; peft's PSOFT takes the SVD of a dense "
            "float weight"
        )
    if o.r > min(site.in_features, site.out_features):
        return (
            f"is {site.in_features} -> {site.out_features}, narrower than r={o.r} "
            "(peft requires r <= min(in_features, out_features))"
        )
    if format_of(site).compute_dtype(gm, site) in HALF and not o.autocast_adapter_dtype:
        return (
            "is float16/bfloat16 with autocast_adapter_dtype=false, where peft still computes "
            "A and B in float32 and R in the base dtype, which peftc does not implement; keep "
            "autocast_adapter_dtype=true"
        )
    return None
