"""SHiRA: a sparse high-rank update at fixed random positions of the weight, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + dW x,   dW (out x in) zero but at n = r (in + out) positions

1. Each site trains `shira_weight` (n,), the values of dW at its positions. The positions are
   peft's `random_mask`: the first n of `randperm(out * in)` drawn from a fresh
   `torch.Generator()` (seeded with `random_seed` when it is set, else at its fixed default seed),
   read off the mask row by row as peft's `torch.where` does: (row, col) = (i // in, i % in) in
   increasing i. Sites of one shape get the same positions.
2. The positions are a frozen int32 buffer `<path>.shira_indices.<adapter>` (2, n), saved under
   peft's key `base_model.model.<path>.shira_indices` and read back from a checkpoint, whose own
   positions win, as in peft.
3. `init_weights=true` (peft's default) starts the values at zero, false at N(0, 1). peft's scale
   is 1 (changed only at inference, by `set_scale`), so it is no option.
4. nn.Linear sites (NF4 bases too, as peft's 4-bit layers); GPT-2's Conv1D and
   nn.MultiheadAttention's projections are refused, as peft does not adapt them, and so is an r
   with r (in + out) > in * out. Merge adds dW to W.
peft computes `linear(x, W + dW, b)`; peftc adds `linear(x, dW)` to the op's output: the same sum
in another order. A custom `mask_fn` is Python code no config holds: any `mask_type` but
"random" is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["ShiraOptions", "Shira", "random_indices"]

aten = torch.ops.aten


def _mask_type(value: Any) -> str:
    if value != "random":
        raise OptionError(
            f"mask_type={value!r}: peft's custom mask_fn is Python code that no config holds; "
            "peftc implements mask_type='random'"
        )
    return value


@dataclass(frozen=True)
class ShiraOptions(AdapterOptions):
    r: int = rank_option(32, "sets the trained entries per site: r (in + out), as LoRA's count")
    mask_type: Literal["random"] = option(
        "random", doc="how the positions are chosen", peft="mask_type", decode=_mask_type
    )
    random_seed: int | None = option(
        None,
        doc="seed of the positions' generator (None: torch.Generator's default seed, as peft)",
        peft="random_seed",
    )
    init_weights: bool = option(
        True, doc="start the entries at zero (false: N(0, 1), as peft)", peft="init_weights"
    )


def random_indices(out_features: int, in_features: int, n: int, seed: int | None) -> torch.Tensor:
    """peft's random mask as (2, n) int32 (row, col) positions, row-major as `torch.where` reads
    them."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


def _count(site: Any, r: int) -> int:
    return r * (site.in_features + site.out_features)


@register_technique
class Shira(Technique):
    """Insert SHiRA branches: `y = W x + b -> y = W x + b + dW x`, dW sparse at fixed random
    positions and trained there."""

    name = "shira"
    half_precision = "float32"
    options = ShiraOptions
    peft_type = "SHIRA"
    # peft sets it false on every nn.Linear and refuses Conv1D; the layout is read from the graph
    peft_fixed = {"fan_in_fan_out": False}
    peft_ignored = ("fan_in_fan_out",)

    def check(self, gm: fx.GraphModule, site: Any, options: ShiraOptions) -> None:
        if getattr(site, "fan_in_fan_out", False):
            raise OptionError(
                f"shira: peft does not support GPT-2's Conv1D ({site.path!r}); exclude it from "
                "targets"
            )
        if mha := multihead_attention(site):
            raise OptionError(
                f"shira: peft does not adapt nn.MultiheadAttention's projections ({mha[1]!r} reads "
                "their weights without calling them); exclude it from targets"
            )
        n, size = _count(site, options.r), site.out_features * site.in_features
        if n > size:
            raise OptionError(
                f"shira: r={options.r} gives r (in + out) = {n} entries, more than the "
                f"{site.out_features} x {site.in_features} = {size} of {site.path!r}; lower r"
            )

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        n = _count(site, o.r)
        indices = random_indices(site.out_features, site.in_features, n, o.random_seed)
        return [
            Param("shira_weight", (n,), init=None if o.init_weights else nn.init.normal_),
            Param("shira_indices", value=indices, trainable=False, dtype=torch.int32),
        ]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, values = b.site, b.param("shira_weight")
        # int64 for the scatter: ONNX's ScatterND takes no int32 indices (peft stores int32)
        indices = b.call(
            aten._to_copy.default, b.param("shira_indices"), dtype=torch.long, role="indices"
        )
        rows = b.call(aten.select.int, indices, 0, 0, role="rows")
        cols = b.call(aten.select.int, indices, 0, 1, role="cols")
        zeros = b.call(
            aten.new_zeros.default, values, [site.out_features, site.in_features], role="zeros"
        )
        # accumulate: repeated positions sum, as in peft's sparse COO tensor
        delta = b.call(
            aten.index_put.default, zeros, [rows, cols], values, True, role="delta_weight"
        )
        return b.call(aten.linear.default, x, delta, role="shira_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        site, values = ctx.site, ctx.tensor("shira_weight").float()
        rows, cols = ctx.tensor("shira_indices").long()
        dense = values.new_zeros(site.out_features, site.in_features)
        return dense.index_put((rows, cols), values, accumulate=True)

    def describe(self, options: ShiraOptions, sites: list[Any]) -> str:
        return f"SHiRA r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"
