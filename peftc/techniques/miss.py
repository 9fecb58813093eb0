"""MiSS: one trainable block shared by every chunk of the weight, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + (sum_k x_k) M                 (init_weights=true or false)
    y = W x + b  ->  y = W x + b + (sum_k x_k) tile(M)           (init_weights="mini")
    y = W x + b  ->  y = (W + W_blocks M + M) x + b              (init_weights="bat")

1. x is zero-padded to a multiple of r and cut into chunks x_k of r features, which are summed;
   `miss_block` M (r, out) maps the sum to the output: dW[o, i] = M[i mod r, o].
2. "mini": M is (r, mini_r), repeated out / mini_r times along the outputs (peft's `repeat`).
3. "bat": M is (out / r, r, r); W is cut into r x r blocks W[a, c] and each becomes
   W[a, c] + W[a, c] M[a] + M[a] (a weight update that reads W); peft applies no dropout there,
   nor does peftc. Both r x r cuts must divide the weight.
4. peft's `init_weights=true` starts M at zero (the identity); `false` draws it Kaiming-uniform, as
   nn.Linear. Merging adds dW (or the bat update) to W. Linear sites only (nn.Linear, NF4), as in
   peft: GPT-2's Conv1D and `bias` other than "none" are refused, and so are NF4 sites over a
   float16/bfloat16 base with the adapter in float32 (peft adds the term in float32 there, where
   peftc's NF4 format adds it in the base dtype).
Parameters: `<path>.miss_block.<adapter>`, saved as peft's `<path>.miss_block`.
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
    Stage,
    Technique,
    dropout_option,
    kaiming_uniform,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.techniques.oft import eager

__all__ = ["MissOptions", "Miss"]

aten = torch.ops.aten


@dataclass(frozen=True)
class MissOptions(AdapterOptions):
    r: int = rank_option(64, "chunk size along in_features (bat: the r x r block size)")
    dropout: float = dropout_option("miss_dropout")
    mini_r: int = option(
        1, doc='columns of the block for init_weights="mini"', check=positive, peft="mini_r"
    )
    init_weights: bool | Literal["bat", "mini"] = option(
        True,
        doc='true: the block at zero; false: Kaiming-uniform; "bat": r x r blocks that read W; '
        '"mini": an (r, mini_r) block tiled along the outputs',
        peft="init_weights",
    )


def _shape(site: Any, o: MissOptions) -> tuple[int, ...]:
    """peft's shape of `miss_block` for the variant."""
    if o.init_weights == "bat":
        return (site.out_features // o.r, o.r, o.r)
    return (o.r, o.mini_r if o.init_weights == "mini" else site.out_features)


def _bat(call: Any, W: Any, block: Any, out: int, inp: int, r: int) -> Any:
    """W + (W_blocks M + M) in peft's order of operations (`call`: `Builder.call` or `eager`)."""
    blocks = call(aten.reshape.default, W, [out // r, r, inp // r, r], role="weight_blocks")
    blocks = call(aten.permute.default, blocks, [2, 0, 1, 3], role="weight_blocks_t")
    update = call(aten.matmul.default, blocks, block, role="blocks_times_miss")
    update = call(aten.add.Tensor, update, block, role="blocks_update")
    update = call(aten.permute.default, update, [1, 2, 0, 3], role="update_t")
    update = call(aten.reshape.default, update, [out, inp], role="update")
    return call(aten.add.Tensor, W, update, role="bat_weight")


@register_technique
class Miss(Technique):
    """Insert MiSS: `y -> y + (sum of x's r-chunks) M`, or with `init_weights="bat"` the weight
    `W -> W + W_blocks M + M`."""

    name = "miss"
    half_precision = "float32"
    options = MissOptions
    peft_type = "MISS"
    peft_fixed = {"bias": "none"}
    preserves_outputs = False  # init_weights=false draws the block at random

    def stage_at(self, site: Any, options: MissOptions) -> Stage:
        return "weight" if options.init_weights == "bat" else "add"

    def check(self, gm: fx.GraphModule, site: Any, options: MissOptions) -> None:
        problem = _problem(gm, site, options)
        if problem:
            raise OptionError(f"miss: {site.path!r} {problem}")

    def params(self, ctx: Context) -> list[Param]:
        init = kaiming_uniform if ctx.options.init_weights is False else None
        return [Param("miss_block", _shape(ctx.site, ctx.options), init=init)]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        o = ctx.options
        used = o.dropout > 0 and o.init_weights != "bat"  # peft's bat path has no dropout
        return {"miss_dropout": nn.Dropout(o.dropout)} if used else {}

    def build(self, b: Builder, value: fx.Node) -> fx.Node:
        o, site = b.options, b.site
        block = b.param("miss_block")
        if o.init_weights == "bat":
            return _bat(b.call, value, block, site.out_features, site.in_features, o.r)
        if o.init_weights == "mini":
            repeats = [1, site.out_features // o.mini_r]
            block = b.call(aten.repeat.default, block, repeats, role="miss_tiled")
        pad = -site.in_features % o.r
        x = value  # peft's order: pad, dropout, sum the chunks, multiply
        if pad:
            x = b.call(aten.constant_pad_nd.default, x, [0, pad], 0.0, role="padded")
        if o.dropout > 0:
            x = b.module("miss_dropout", x, role="dropout")
        chunks = (site.in_features + pad) // o.r
        x = b.call(aten.unflatten.int, x, -1, [chunks, o.r], role="chunks")
        x = b.call(aten.sum.dim_IntList, x, [-2], role="chunk_sum")
        return b.call(aten.matmul.default, x, block, role="miss")

    def delta(self, ctx: Context) -> torch.Tensor:
        o, site = ctx.options, ctx.site
        block = ctx.tensor("miss_block").float()
        if o.init_weights == "mini":
            block = block.repeat(1, site.out_features // o.mini_r)
        # dW[o, i] = M[i mod r, o]
        return block.t().repeat(1, -(-site.in_features // o.r))[:, : site.in_features]

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        o, site = ctx.options, ctx.site
        if o.init_weights != "bat":
            return super().fold(ctx, weight, bias)
        block = ctx.tensor("miss_block").to(weight.dtype)
        return _bat(eager, weight, block, site.out_features, site.in_features, o.r), bias

    def describe(self, options: MissOptions, sites: list[Any]) -> str:
        variant = {True: "", False: " random init"}.get(
            options.init_weights, f" {options.init_weights}"
        )
        return f"MiSS{variant} r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"


def _problem(gm: fx.GraphModule, site: Any, o: MissOptions) -> str | None:
    """What peft refuses at this site (or peftc cannot match), else None."""
    if getattr(site, "fan_in_fan_out", False):
        return "is a GPT-2 Conv1D, which peft's MiSS does not support; exclude it from targets"
    out, inp = site.out_features, site.in_features
    if o.r > inp:
        return f"has in_features={inp} < r={o.r}; lower r, as peft requires"
    if o.init_weights == "bat" and (inp % o.r or out % o.r):
        return (
            f'is {out} x {inp}, which r={o.r} does not cut into r x r blocks (init_weights="bat")'
        )
    if o.init_weights == "mini" and out % o.mini_r:
        return f'has out_features={out}, not a multiple of mini_r={o.mini_r} (init_weights="mini")'
    fmt = format_of(site)
    half = fmt.compute_dtype(gm, site) in (torch.float16, torch.bfloat16)
    if (
        half
        and o.autocast_adapter_dtype
        and not fmt.adds_in_adapter_dtype
        and o.init_weights != "bat"
    ):
        return (
            f"stores its weight as {fmt.name} over a half-precision base, where peft adds MiSS's "
            "float32 term before casting back, which peftc does not implement; pass "
            "autocast_adapter_dtype=false or exclude it from targets"
        )
    return None
