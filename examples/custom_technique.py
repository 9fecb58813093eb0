"""Write a technique from scratch: a learned per-channel scale of a linear's output, (IA)^3 style.

    y = W x + b  ->  y = (W x + b) * l,   l = 1 at init;  merged: W' = diag(l) W, b' = l * b

It is a declaration: its tensor, its stage (`output`), its rewrite and its fold. The core gives it
everything else: the pass `channel_scale(...)` in pipelines, tags, switching, merge and unmerge,
and correct composition with other techniques on the same layers (LoRA's update is added after
the scale, not scaled by it). Trained here on Tiny Shakespeare next to a LoRA adapter.

    python examples/custom_technique.py [--steps 30]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftc.technique.adapters import register_technique
from peftc.technique import AdapterOptions, Param, Technique
from shakespeare import adapt_train_merge, steps_from


@dataclass(frozen=True)
class ChannelScaleOptions(AdapterOptions):
    pass  # targets, adapter and freeze_base come from AdapterOptions


@register_technique
class ChannelScale(Technique):
    """Scale each output channel of the targeted linears: `y -> y * l`, l starting at one."""

    name = "channel_scale"
    options = ChannelScaleOptions
    stage = "output"

    def params(self, ctx):
        return [Param("channel_scale", (ctx.site.out_features,), init=nn.init.ones_)]

    def build(self, b, y):
        return b.call(torch.ops.aten.mul.Tensor, y, b.param("channel_scale"), role="scaled")

    def fold(self, ctx, weight, bias):
        scale = ctx.tensor("channel_scale").float()
        return weight * scale[:, None], None if bias is None else bias * scale


def main(argv: list[str] | None = None) -> dict:
    pipeline = "channel_scale(targets='*.v_proj|*.down_proj'), lora(r=4, alpha=8, targets='*.v_proj', adapter='lora')"
    return adapt_train_merge(pipeline, steps_from(argv, __doc__))


if __name__ == "__main__":
    main()
