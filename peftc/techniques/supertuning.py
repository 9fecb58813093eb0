"""SuperTuning: train a sparse support of a linear weight chosen by magnitude, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + dW x + (alpha / r) B A dropout(x)      (the B A term: r set)

1. Each site trains `supertuning_values` (n,), n = int(out * in * (1 - sparsity)), the values of
   dW at the n largest |W| entries (`select_top=false`: the smallest), peft's `torch.topk` over
   the flattened weight in its own dtype. The flat positions are a frozen int32 buffer
   `<path>.supertuning_indices.<adapter>`, saved as peft's `<path>.supertuning_indices` and read
   back from a checkpoint, whose own positions win; `save_precomputed_indices=false` leaves them
   out of the checkpoint, and loading picks them again from the base weight, as peft does.
2. With `r` set (peft's "Supra"), a LoRA A (r, in) Kaiming-uniform and B (out, r) at zero adds
   `(alpha / r) B A dropout(x)`; alpha defaults to 2 r, as in peft. `init_weights=true` starts the
   values and B at zero (the identity); false draws the values N(0, 1) and B Kaiming-uniform.
3. Merging adds dW (scattered) and (alpha / r) B A to W.
peft scatters dW into W and computes `linear(x, W + dW, b)`; peftc adds `linear(x, dW)` to the
op's output: the same sum in another order. nn.Linear sites with a dense float32 weight only:
GPT-2's Conv1D, nn.MultiheadAttention's projections, quantized or weight-normed storage, float16 /
bfloat16 bases (peft scatters in the base dtype and adds the LoRA term from float32, which peftc
does not implement) and `layers_to_transform` (no field of peft's config) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    kaiming_uniform,
    option,
    positive,
    probability,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["SupertuningOptions", "Supertuning"]

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SupertuningOptions(AdapterOptions):
    sparsity: float = option(
        0.99,
        doc="fraction of each weight left frozen: 0.99 trains 1% of its entries",
        check=probability,
        peft="sparsity",
    )
    select_top: bool = option(
        True,
        doc="train the largest-magnitude entries (false: the smallest)",
        peft="select_top",
    )
    r: int | None = option(
        None, doc="rank of the added LoRA (None: the sparse values alone)", check=positive, peft="r"
    )
    lora_alpha: float | None = option(
        None, doc="the LoRA's scale is lora_alpha / r (None: 2 r)", peft="lora_alpha"
    )
    dropout: float = dropout_option("lora_dropout", "dropout on the LoRA's input (r set)")
    init_weights: bool = option(
        True,
        doc="start the values and B at zero (false: N(0, 1) and Kaiming-uniform, as peft)",
        peft="init_weights",
    )
    save_precomputed_indices: bool = option(
        True,
        doc="save the positions in the checkpoint (false: picked again from W at load)",
        peft="save_precomputed_indices",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is None and self.lora_alpha is not None:
            raise OptionError(
                f"supertuning: lora_alpha={self.lora_alpha} needs r (the LoRA's rank), as peft "
                "requires; set r or drop lora_alpha"
            )
        if self.layers_to_transform not in (None, ()):
            raise OptionError(
                "supertuning: layers_to_transform is no field of peft's SupertuningConfig, so a "
                "checkpoint could not say it; choose the layers with targets instead"
            )

    @property
    def scaling(self) -> float:
        alpha = 2 * self.r if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.r


def _count(site: Any, sparsity: float) -> int:
    """peft's `_num_trainable`: the number of trained entries."""
    return int(site.out_features * site.in_features * (1 - sparsity))


def _problem(gm: fx.GraphModule, site: Any, o: SupertuningOptions) -> str | None:
    """What peft refuses at this site, or peftc does not implement, else None."""
    if site.fan_in_fan_out:
        return "is a GPT-2 Conv1D, which peft's SuperTuning does not support (nn.Linear only)"
    if mha := multihead_attention(site):
        return (
            f"is a projection of nn.MultiheadAttention {mha[1]!r}, which reads its weight without "
            "calling it; peft's SuperTuning never takes effect there"
        )
    if site.storage != "dense":
        return (
            f"stores its weight as {site.storage!r}; peft's SuperTuning scatters into a dense "
            "nn.Linear weight"
        )
    if format_of(site).compute_dtype(gm, site) in HALF:
        return (
            "computes in half precision, where peft scatters the values in the base dtype and "
            "adds the LoRA term from float32, which peftc does not implement (load it in float32)"
        )
    if _count(site, o.sparsity) < 1:
        return (
            f"has {site.out_features * site.in_features} entries, and sparsity={o.sparsity} "
            "leaves none to train; lower sparsity"
        )
    return None


@register_technique
class Supertuning(Technique):
    """Insert SuperTuning: `y = W x + b -> y = W x + b + dW x (+ (alpha / r) B A x)`, dW trained
    at the entries of W of largest (or smallest) magnitude."""

    name = "supertuning"
    options = SupertuningOptions
    peft_type = "SUPERTUNING"
    preserves_outputs = False  # init_weights=false changes the model at init

    def check(self, gm: fx.GraphModule, site: Any, options: SupertuningOptions) -> None:
        problem = _problem(gm, site, options)
        if problem:
            raise OptionError(f"supertuning: {site.path!r} {problem}; exclude it from targets")

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        scores = ctx.weight().to(ctx.base_dtype).abs().flatten()  # peft ranks W in its own dtype
        n = _count(site, o.sparsity)
        indices = torch.topk(scores, n, largest=o.select_top).indices.to(torch.int32)
        params = [
            Param("supertuning_values", (n,), init=None if o.init_weights else nn.init.normal_),
            Param("supertuning_indices", value=indices, trainable=False, dtype=torch.int32),
        ]
        if o.r is None:
            return params
        A = Param("supertuning_lora_A", (o.r, site.in_features), kaiming_uniform, suffix="weight")
        B_init = None if o.init_weights else kaiming_uniform
        B = Param("supertuning_lora_B", (site.out_features, o.r), B_init, suffix="weight")
        return [*params, A, B]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        o = ctx.options
        used = o.r is not None and o.dropout > 0  # peft's dropout acts on the LoRA only
        return {"supertuning_lora_dropout": nn.Dropout(o.dropout)} if used else {}

    def saved(self, options: SupertuningOptions, attr: str) -> bool:
        return attr != "supertuning_indices" or options.save_precomputed_indices

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, o = b.site, b.options
        values = b.param("supertuning_values")
        indices = b.call(
            aten._to_copy.default, b.param("supertuning_indices"), dtype=torch.int64, role="index"
        )
        size = site.out_features * site.in_features
        zeros = b.call(aten.new_zeros.default, values, [size], role="zeros")
        flat = b.call(aten.scatter_add.default, zeros, 0, indices, values, role="flat_delta")
        delta = b.call(
            aten.reshape.default, flat, [site.out_features, site.in_features], role="delta_weight"
        )
        out = b.call(aten.linear.default, x, delta, role="sparse_out")
        if o.r is None:
            return out
        if o.dropout > 0:
            x = b.module("supertuning_lora_dropout", x, role="dropout")
        h = b.call(aten.linear.default, x, b.param("supertuning_lora_A"), role="lora_A_out")
        h = b.call(aten.linear.default, h, b.param("supertuning_lora_B"), role="lora_B_out")
        h = b.call(aten.mul.Tensor, h, o.scaling, role="lora_scaled")
        return b.call(aten.add.Tensor, out, h, role="supertuning")

    def delta(self, ctx: Context) -> torch.Tensor:
        site, o = ctx.site, ctx.options
        values = ctx.tensor("supertuning_values").float()
        indices = ctx.tensor("supertuning_indices").long()
        flat = values.new_zeros(site.out_features * site.in_features)
        dense = flat.scatter_add(0, indices, values).view(site.out_features, site.in_features)
        if o.r is None:
            return dense
        B, A = ctx.tensor("supertuning_lora_B").float(), ctx.tensor("supertuning_lora_A").float()
        return dense + o.scaling * (B @ A)

    def describe(self, options: SupertuningOptions, sites: list[Any]) -> str:
        lora = f" + LoRA r={options.r}" if options.r is not None else ""
        return (
            f"SuperTuning sparsity={options.sparsity}{lora} on {len(sites)} sites, adapter "
            f"{options.adapter!r}"
        )
