"""BEFT: a learned bias vector added to a linear layer's output, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + beft_bias

1. The vector is `<path>.beft_bias.<adapter>`, in peft's shape (1, out_features), flattened and
   broadcast over the output's last dim. It starts at zeros, so the model computes what it did;
   `init_weights=false` draws it from N(0, 1) as peft.
2. Over a float16/bfloat16 base the vector stays float32 (peft's autocast_adapter_dtype): the
   output is added in float32 and cast back to the base dtype, as peft's forward.
3. Merging adds the vector to the layer's bias. A layer without a bias is refused there, by name,
   as peft's merge refuses it.
Linear sites only (nn.Linear and NF4 linears, which peft wraps as nn.Linear subclasses). GPT-2's
Conv1D and nn.MultiheadAttention are refused: peft rejects the first and silently has no effect
on the second (its forward reads out_proj's tensors directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    NotMergeable,
    Param,
    Technique,
    option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["BeftOptions", "Beft"]

aten = torch.ops.aten


@dataclass(frozen=True)
class BeftOptions(AdapterOptions):
    init_weights: bool = option(
        True,
        doc="start the bias at zeros (the identity); false: draw it from N(0, 1)",
        peft="init_weights",
    )


@register_technique
class Beft(Technique):
    """Insert BEFT: `y -> y + beft_bias`, a trainable bias on a linear layer's output."""

    name = "beft"
    half_precision = "float32"  # peft keeps the vector in float32 and adds in it
    options = BeftOptions
    peft_type = "BEFT"
    stage = "output"

    def check(self, gm: fx.GraphModule, site: Any, options: BeftOptions) -> None:
        mha = multihead_attention(site)
        if getattr(site, "fan_in_fan_out", False) or mha:
            what = f"nn.MultiheadAttention {mha[1]!r}" if mha else f"GPT-2's Conv1D {site.path!r}"
            raise OptionError(
                f"beft: peft adapts nn.Linear layers only, not {what}; exclude it from targets"
            )

    def params(self, ctx: Context) -> list[Param]:
        init = None if ctx.options.init_weights else nn.init.normal_
        return [Param("beft_bias", (1, ctx.site.out_features), init=init)]

    def build(self, b: Builder, y: fx.Node) -> fx.Node:
        bias = b.call(aten.reshape.default, b.param("beft_bias"), [-1], role="beft_bias_flat")
        if not b.ctx.upcast:
            return b.call(aten.add.Tensor, y, bias, role="beft")
        # peft: the output promoted to the vector's float32, the sum cast back
        y = b.as_adapter(y, "beft_input_upcast")
        out = b.call(aten.add.Tensor, y, bias, role="beft")
        return b.call(aten._to_copy.default, out, dtype=b.ctx.base_dtype, role="beft_downcast")

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if bias is None:
            raise NotMergeable(
                f"beft: {ctx.site.path!r} has no bias to merge beft_bias into (peft cannot "
                "either); keep the adapter unmerged"
            )
        return weight, bias + ctx.tensor("beft_bias").to(bias.dtype).reshape(-1)
