"""Write a technique from scratch: HiRA, one of HF peft's methods, in a declaration of 32 lines.

    y = W x + b  ->  y = W x + b + (W ⊙ B A) dropout(x)    A (r x in) Kaiming, B (out x r) zero
    merged:          W' = W + W ⊙ B A                      unchanged at init

It states its options (each field with peft's name), its tensors, its rewrite and its update. The
core gives it the rest: the pass `hira(...)` in pipelines, tags, switching, merge and unmerge (its
update checked against its rewrite at the first merge), NF4 bases, composition with other techniques
on the same layers, and peft's checkpoint format both ways (`tests/test_technique_examples.py`
checks outputs, every gradient, merge and checkpoints against peft's own HiRA in one line). Trained
here on Tiny Shakespeare next to a LoRA adapter.

    python examples/custom_technique.py [--steps 30]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftc.technique import (
    AdapterOptions,
    Param,
    Technique,
    dropout_option,
    kaiming_uniform,
    rank_option,
    register_technique,
)

from shakespeare import adapt_train_merge, steps_from

aten = torch.ops.aten


@dataclass(frozen=True)
class HiraOptions(AdapterOptions):  # targets, adapter and freeze_base come from AdapterOptions
    r: int = rank_option(32, "rank of A (r x in) and B (out x r)")  # peft's `r`
    dropout: float = dropout_option("hira_dropout")  # peft's name of the field


@register_technique(replace=True)  # in place of peftc's built-in HiRA (conv, embedding too)
class Hira(Technique):
    """HiRA: `y = W x + b + (W ⊙ B A) dropout(x)`, a high-rank update shaped by W itself."""

    name, options, peft_type = "hira", HiraOptions, "HIRA"
    # what peftc writes; a checkpoint brings its own weights, so any init loads
    peft_fixed = {"init_weights": True}
    peft_ignored = ("init_weights", "fan_in_fan_out")  # the weight's layout is read from the graph

    def params(self, ctx):  # at <path>.hira_A.<adapter>, peft's names
        o, site = ctx.options, ctx.site
        A = Param("hira_A", (o.r, site.in_features), init=kaiming_uniform)
        return [A, Param("hira_B", (site.out_features, o.r))]

    def modules(self, ctx):
        return {"hira_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b, x):  # stage "add": the term added to the op's output
        if b.options.dropout:
            x = b.module("hira_dropout", x, role="dropout")
        product = b.call(aten.mm.default, b.param("hira_B"), b.param("hira_A"), role="BA")
        update = b.call(aten.mul.Tensor, b.weight(), product, role="update")
        return b.call(aten.linear.default, x, update, role="hira")

    def delta(self, ctx):  # what merge adds to W
        return ctx.weight() * (ctx.tensor("hira_B") @ ctx.tensor("hira_A")).float()


def main(argv: list[str] | None = None) -> dict:
    pipeline = (
        "hira(r=8, targets='*.v_proj|*.down_proj'), lora(r=4, alpha=8, targets='*.v_proj', "
        "adapter='lora')"
    )
    return adapt_train_merge(pipeline, steps_from(argv, __doc__))


if __name__ == "__main__":
    main()
