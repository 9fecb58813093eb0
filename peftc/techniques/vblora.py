"""VB-LoRA: low-rank factors assembled from one shared vector bank by top-k mixtures, as in HF
peft 0.21.

    y = W x + b  ->  y = W x + b + B (A dropout(x))

1. One adapter shares a trainable `vblora_vector_bank` (num_vectors, vector_length) across its
   sites, drawn uniform in ±init_vector_bank_bound.
2. Each site trains `vblora_logits_A` (r, in / L, num_vectors) and `vblora_logits_B`
   (out / L, r, num_vectors), L = vector_length, drawn N(0, init_logits_std). Each length-L
   sub-vector of A and B is the softmax-weighted sum of the bank vectors its top-k logits pick:
   `A = mix(logits_A).reshape(r, in)`, `B = mix(logits_B).transpose(1, 2).reshape(out, r)`.
3. Linear sites only (nn.Linear, GPT-2 Conv1D), as in peft, with in and out multiples of
   vector_length; merge adds `B A` to W.
Checkpoint keys are peft's: `base_model.model.<path>.vblora_logits_A` / `_B` and
`base_model.vblora_vector_bank`. peft's `save_only_topk_weights=true` is refused: its files hold
top-k indices and weights in place of the logits, and loading them back needs a conversion the core
does not offer. NF4 bases are refused too (peft's VB-LoRA has no quantized layers).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["VbloraOptions", "Vblora"]

aten = torch.ops.aten
BANK = "vblora_vector_bank"


@dataclass(frozen=True)
class VbloraOptions(AdapterOptions):
    r: int = rank_option(4, "rank of the update B A")
    num_vectors: int = option(
        256, doc="vectors in the shared bank", check=positive, peft="num_vectors"
    )
    vector_length: int = option(
        256,
        doc="length of each bank vector; every site's in and out must be multiples of it",
        check=positive,
        peft="vector_length",
    )
    topk: int = option(
        2, doc="bank vectors mixed into each sub-vector of A and B", check=positive, peft="topk"
    )
    dropout: float = dropout_option("vblora_dropout")
    init_vector_bank_bound: float = option(
        0.02, doc="the bank is drawn uniform in ±this", peft="init_vector_bank_bound"
    )
    init_logits_std: float = option(
        0.1, doc="standard deviation of the logits' normal init", peft="init_logits_std"
    )


def _mix(call: Any, logits: Any, bank: Any, topk: int, name: str) -> Any:
    """peft's `_get_low_rank_matrix`: (..., num_vectors) logits -> (..., vector_length)."""
    top = call(aten.topk.default, logits, topk, -1, role=f"{name}_topk")
    values = call(operator.getitem, top, 0, role=f"{name}_topk_logits")
    indices = call(operator.getitem, top, 1, role=f"{name}_topk_indices")
    weights = call(aten._softmax.default, values, -1, False, role=f"{name}_topk_weights")
    weights = call(aten.unsqueeze.default, weights, -1, role=f"{name}_weights")
    vectors = call(aten.index.Tensor, bank, [indices], role=f"{name}_vectors")
    mixed = call(aten.mul.Tensor, weights, vectors, role=f"{name}_weighted")
    return call(aten.sum.dim_IntList, mixed, [-2], role=f"{name}_mixed")


def _factors(call: Any, logits_a: Any, logits_b: Any, bank: Any, o: VbloraOptions) -> tuple:
    """(A (r, in), B (out, r)) in peft's order of operations (`call`: `Builder.call`, or `eager`
    to merge)."""
    a = call(aten.reshape.default, _mix(call, logits_a, bank, o.topk, "A"), [o.r, -1], role="A")
    b = call(aten.transpose.int, _mix(call, logits_b, bank, o.topk, "B"), 1, 2, role="B_t")
    return a, call(aten.reshape.default, b, [-1, o.r], role="B")


@register_technique
class Vblora(Technique):
    """Insert VB-LoRA branches: `y = W x + b -> y = W x + b + B A dropout(x)`, A and B mixed from a
    shared trainable vector bank by each site's top-k logits."""

    name = "vblora"
    half_precision = "float32"  # peft upcasts the logits and the bank, and x to the bank's dtype
    options = VbloraOptions
    peft_type = "VBLORA"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph

    def check(self, gm: fx.GraphModule, site: Any, options: VbloraOptions) -> None:
        mha = multihead_attention(site)
        if mha or getattr(site, "storage", None) == "nf4":
            what = f"nn.MultiheadAttention {mha[1]!r}" if mha else f"the NF4 linear {site.path!r}"
            raise OptionError(
                f"vblora: peft adapts nn.Linear and Conv1D layers only, not {what}; exclude it "
                "from targets"
            )
        for side in ("in_features", "out_features"):
            if getattr(site, side) % options.vector_length:
                raise OptionError(
                    f"vblora: {site.path!r} has {side}={getattr(site, side)}, not a multiple of "
                    f"vector_length={options.vector_length}; choose a divisor"
                )

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: VbloraOptions
    ) -> list[Param]:
        bound = options.init_vector_bank_bound
        # at peft's in-memory name: its layers share the bank, so it is named under the first one
        # the model defines (OPT defines k_proj, v_proj, q_proj, and calls q_proj first)
        order = {path: i for i, path in enumerate(peftc_meta(gm).get("module_types", {}))}
        first = min((s.path for s in sites), key=lambda p: order.get(p, len(order)))
        return [
            Param(
                f"{first}.{BANK}" if first else BANK,
                (options.num_vectors, options.vector_length),
                init=lambda t: nn.init.uniform_(t, -bound, bound),
                key=BANK,
            )
        ]

    def params(self, ctx: Context) -> list[Param]:
        o, site = ctx.options, ctx.site
        length = o.vector_length
        init = lambda t: nn.init.normal_(t, 0, o.init_logits_std)  # noqa: E731
        return [
            Param("vblora_logits_A", (o.r, site.in_features // length, o.num_vectors), init=init),
            Param("vblora_logits_B", (site.out_features // length, o.r, o.num_vectors), init=init),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"vblora_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        if b.options.dropout:
            x = b.module("vblora_dropout", x, role="dropout")
        a, b_ = _factors(
            b.call,
            b.param("vblora_logits_A"),
            b.param("vblora_logits_B"),
            b.param(BANK),
            b.options,
        )
        h = b.call(aten.linear.default, x, a, role="vblora_A_out")
        return b.call(aten.linear.default, h, b_, role="vblora")

    def delta(self, ctx: Context) -> torch.Tensor:
        a, b = _factors(
            eager,
            *(ctx.tensor(attr).float() for attr in ("vblora_logits_A", "vblora_logits_B", BANK)),
            ctx.options,
        )
        return b @ a

    def checkpoint_key(self, key: str) -> str:
        # peft saves the bank once, as base_model.vblora_vector_bank
        return f"base_model.{BANK}" if key.endswith(f".{BANK}") else key

    def to_peft(self, options: VbloraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: VbloraOptions, sites: list[Any]) -> str:
        return (
            f"VB-LoRA r={options.r}, {options.num_vectors} vectors of {options.vector_length}, "
            f"top-{options.topk} on {len(sites)} sites, adapter {options.adapter!r}"
        )
