"""GraLoRA: granular low-rank adaptation beside linear sites, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + s * dW dropout(x),   s = alpha / (r + hybrid_r)

1. W's input and output are split into k blocks each (k = `gralora_k`, I = in/k, O = out/k).
   Input block n has its own A_n (I x r); its r outputs split into k groups of r/k, and group j
   feeds output block j through B_j (r x O), which reads the k groups that come to it, in n order.
   So dW's block (j, n) is B_j[n-th r/k rows]^T A_n[:, j-th r/k columns]^T: k^2 rank-r/k blocks
   from the parameter count of one rank-r LoRA.
2. `hybrid_r > 0` adds a plain LoRA of that rank beside it (peft's Hybrid GraLoRA), with the same
   scale; its input goes through the dropout once more (a second draw, as in peft).
3. Merge adds s * dW (plus s B_general A_general) to W. Over a float16/bfloat16 base the tensors are
   float32 and each term is cast to the base dtype before scaling, as peft's forward does; with
   hybrid_r the two terms are summed before y is added (peft adds them to y one at a time), which
   may round one half-precision step apart.
4. Linear sites only (nn.Linear, GPT-2's Conv1D, NF4), as peft; in and out features must be
   divisible by k, and r too. nn.MultiheadAttention and `bias` other than "none" are refused.
Parameters: `<path>.gralora_A.<adapter>` (k, I, r), `<path>.gralora_B.<adapter>` (k, r, O),
`<path>.gralora_A_general.<adapter>.weight` (hybrid_r, in), `gralora_B_general` (out, hybrid_r);
B starts at zero (`init_weights=false`: Kaiming-uniform as A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    kaiming_uniform,
    non_negative,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["GraloraOptions", "Gralora"]

aten = torch.ops.aten


@dataclass(frozen=True)
class GraloraOptions(AdapterOptions):
    r: int = rank_option(32, "GraLoRA rank of each input block's A (divisible by gralora_k)")
    hybrid_r: int = option(
        0,
        doc="rank of the plain LoRA beside it (Hybrid GraLoRA)",
        check=non_negative,
        peft="hybrid_r",
    )
    alpha: float = option(64.0, doc="the update's scale: s = alpha / (r + hybrid_r)", peft="alpha")
    dropout: float = dropout_option("gralora_dropout")
    gralora_k: int = option(
        2, doc="number of blocks each of in and out is split into", check=positive, peft="gralora_k"
    )
    init_weights: bool = option(
        True, doc="B starts at zero (false: Kaiming-uniform, as A)", peft="init_weights"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r % self.gralora_k:
            raise OptionError(
                f"gralora: r must be divisible by gralora_k, as peft requires; got r={self.r}, "
                f"gralora_k={self.gralora_k}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


def _blockwise_kaiming(tensor: torch.Tensor) -> None:
    # peft draws each block as an nn.Linear weight (fan_in: dim 1 here), then stacks them
    bound = 1 / math.sqrt(tensor.shape[1])
    tensor.uniform_(-bound, bound)


@register_technique
class Gralora(Technique):
    """Insert GraLoRA branches: `y = W x + b -> y = W x + b + s * dW x`, dW k x k low-rank
    blocks (plus a plain LoRA with hybrid_r)."""

    name = "gralora"
    options = GraloraOptions
    peft_type = "GRALORA"
    half_precision = "float32"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph

    def check(self, gm: fx.GraphModule, site: Any, options: GraloraOptions) -> None:
        if mha := multihead_attention(site):
            raise OptionError(
                f"gralora: peft does not support nn.MultiheadAttention ({mha[1]!r}); exclude it "
                "from targets"
            )
        k = options.gralora_k
        for what in ("in_features", "out_features"):
            if getattr(site, what) % k:
                raise OptionError(
                    f"gralora: {what}={getattr(site, what)} of {site.path!r} is not divisible by "
                    f"gralora_k={k}, as peft requires; choose another gralora_k or exclude it"
                )

    def params(self, ctx: Context) -> list[Param]:
        o, site = ctx.options, ctx.site
        k, hybrid = o.gralora_k, o.hybrid_r
        init_b = None if o.init_weights else _blockwise_kaiming
        params = [
            Param("gralora_A", (k, site.in_features // k, o.r), init=_blockwise_kaiming),
            Param("gralora_B", (k, o.r, site.out_features // k), init=init_b),
        ]
        if hybrid:
            init_general = None if o.init_weights else kaiming_uniform
            params += [
                Param(
                    "gralora_A_general",
                    (hybrid, site.in_features),
                    kaiming_uniform,
                    suffix="weight",
                ),
                Param(
                    "gralora_B_general", (site.out_features, hybrid), init_general, suffix="weight"
                ),
            ]
        return params

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"gralora_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        term = self._scaled(b, self._granular(b, self._dropped(b, x)), "gralora")
        if not b.options.hybrid_r:
            return term
        hidden = b.call(
            aten.linear.default, self._dropped(b, x), b.param("gralora_A_general"), role="hybrid_A"
        )
        hybrid = b.call(aten.linear.default, hidden, b.param("gralora_B_general"), role="hybrid_B")
        return b.call(aten.add.Tensor, term, self._scaled(b, hybrid, "hybrid"), role="gralora_sum")

    @staticmethod
    def _dropped(b: Builder, x: fx.Node) -> fx.Node:
        return b.module("gralora_dropout", x, role="dropout") if b.options.dropout else x

    @staticmethod
    def _granular(b: Builder, x: fx.Node) -> fx.Node:
        """dW x without forming dW: each input block through its A_n, group j of every block's
        r outputs through B_j."""
        o, site = b.options, b.site
        k, group = o.gralora_k, o.r // o.gralora_k
        blocks = b.call(aten.unflatten.int, x, -1, [k, site.in_features // k], role="x_blocks")
        hidden = b.call(
            aten.einsum.default, "...ni,nir->...nr", [blocks, b.param("gralora_A")], role="A_out"
        )
        groups = b.call(aten.unflatten.int, hidden, -1, [k, group], role="A_groups")
        # B_j's rows: n-major, r/k per input block
        B = b.call(
            aten.view.default,
            b.param("gralora_B"),
            [k, k, group, site.out_features // k],
            role="B_groups",
        )
        out = b.call(aten.einsum.default, "...njt,jnto->...jo", [groups, B], role="B_out")
        return b.call(aten.flatten.using_ints, out, -2, -1, role="gralora_out")

    @staticmethod
    def _scaled(b: Builder, term: fx.Node, role: str) -> fx.Node:
        if b.ctx.upcast:  # peft: scaling * output.to(result dtype)
            term = b.call(aten._to_copy.default, term, dtype=b.ctx.base_dtype, role=f"{role}_cast")
        return b.call(aten.mul.Tensor, term, b.options.scaling, role=f"{role}_scaled")

    def delta(self, ctx: Context) -> torch.Tensor:
        o, site = ctx.options, ctx.site
        k, group = o.gralora_k, o.r // o.gralora_k
        A = ctx.tensor("gralora_A").float().view(k, site.in_features // k, k, group)
        B = ctx.tensor("gralora_B").float().view(k, k, group, site.out_features // k)
        # block (j, n): B_j[group n]^T A_n[:, group j]^T
        dW = torch.einsum("nijt,jnto->joni", A, B).reshape(site.out_features, site.in_features)
        if o.hybrid_r:
            A_general, B_general = (ctx.tensor(f"gralora_{m}_general").float() for m in "AB")
            dW = dW + B_general @ A_general
        return dW * o.scaling

    def to_peft(self, options: GraloraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: GraloraOptions, sites: list[Any]) -> str:
        hybrid = f" + hybrid r={options.hybrid_r}" if options.hybrid_r else ""
        return (
            f"GraLoRA r={options.r} k={options.gralora_k}{hybrid} on {len(sites)} sites, "
            f"adapter {options.adapter!r}"
        )
