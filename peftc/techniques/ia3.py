"""IA3: learned vectors that rescale a layer's output or, on feed-forward layers, its input, as in
HF peft.

    y = W x + b  ->  y = (W x + b) * l            (l: out_features; the bias is scaled too)
    y = W x + b  ->  y = W (x * l) + b            (feed-forward layers; l: in_features)
    y = conv(x)  ->  y = conv(x) * l  or  conv(x * l)      (l over the channel dimension)

1. Linear sites (`aten.linear`, `nn.Linear`, GPT-2's `Conv1D`, NF4 linears as peft's bitsandbytes
   `Linear4bit`) and 2d/3d convolution sites; peft refuses `nn.Conv1d` and embeddings, so does
   peftc.
2. A site is feed-forward when its path matches `feedforward_modules` as peft matches it: a list of
   suffixes (`path.endswith(entry)`, with no dot boundary, so BERT's `output.dense` also selects
   `attention.output.dense`), or one regex that must match the whole path. Unset, it is peft's table
   for the model family (llama: `down_proj`, bert: `output.dense`, gpt2: `mlp.c_proj`, ...).
3. The vector is `<path>.ia3_l.<adapter>`, in peft's shape: (out, 1) or (1, in) on linears,
   (1, C, 1, 1[, 1]) on convolutions; it starts at ones, so the model computes what it did.
4. Merging scales the rows of W and the bias (output) or the columns of W (input; for grouped
   convolutions each output channel's input slice). Output scaling composes with other adapters
   at the site as `(W x + b) * l + branch(x)`: additive adapters (LoRA) are not scaled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.sites.selection import family_entry, peft_table
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Stage,
    Technique,
    option,
    register_technique,
)

__all__ = ["Ia3Options", "Ia3"]

aten = torch.ops.aten


def _regex(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        re.compile(value)
    except re.error as e:
        return f"a regex matching whole paths, or a list of suffixes ({e})"
    return None


@dataclass(frozen=True)
class Ia3Options(AdapterOptions):
    feedforward_modules: tuple[str, ...] | str | None = option(
        None,
        doc="the feed-forward sites, whose input is scaled (the others' output): path suffixes (no "
        "dot boundary), or a regex matching whole paths; None: the family's table",
        check=_regex,
        peft="feedforward_modules",
    )


def _feedforward_modules(gm: fx.GraphModule, options: Ia3Options) -> tuple[str, ...] | str:
    if options.feedforward_modules is not None:
        return options.feedforward_modules
    entry = family_entry(gm, peft_table("IA3_FEEDFORWARD", "ia3"))
    if entry is None:
        raise OptionError(
            "ia3: no default feedforward_modules for this model (as in peft); pass "
            "feedforward_modules="
            '["suffix", ...] (layers whose input is scaled), a regex, or [] for none'
        )
    return tuple(entry)


def is_feedforward(gm: fx.GraphModule, path: str, options: Ia3Options) -> bool:
    """peft's `_check_target_module_feedforward`."""
    modules = _feedforward_modules(gm, options)
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(path.endswith(suffix) for suffix in modules)


@register_technique
class Ia3(Technique):
    """Insert IA3 vectors: `y -> y * l` (bias included), or `x -> x * l` on `feedforward_modules`.

    `feedforward_modules` follows peft: a list of path suffixes (no dot boundary) or one regex on
    whole paths; unset, peft's table for the model family. The vectors start at ones.
    """

    name = "ia3"
    half_precision = "float32"
    options = Ia3Options
    peft_type = "IA3"
    peft_fixed = {"init_ia3_weights": True}
    # the vectors' init; the layout is read from the graph
    peft_ignored = (
        "init_ia3_weights",
        "fan_in_fan_out",
    )
    site_kinds = ("linear", "conv")

    def stage_at(self, site: Any, options: Ia3Options) -> Stage:
        return (
            "input"
            if is_feedforward(site.node.graph.owning_module, site.path, options)
            else "output"
        )

    def check(self, gm: fx.GraphModule, site: Any, options: Ia3Options) -> None:
        _feedforward_modules(gm, options)
        if site.kind == "conv" and site.dims == 1:
            raise OptionError(
                f"ia3: {site.path!r} is a Conv1d, which peft's IA3 does not support (only Conv2d "
                "and Conv3d); exclude it from targets"
            )

    def params(self, ctx: Context) -> list[Param]:
        site = ctx.site
        feedforward = self.stage_at(site, ctx.options) == "input"
        if site.kind == "conv":
            channels = site.in_channels if feedforward else site.out_channels
            shape = (1, channels) + (1,) * site.dims
        else:
            shape = (1, site.in_features) if feedforward else (site.out_features, 1)
        return [Param("ia3_l", shape, init=nn.init.ones_)]

    def build(self, b: Builder, value: fx.Node) -> fx.Node:
        scale = b.param("ia3_l")
        # peft flattens the vector and broadcasts it over the last dimension
        if b.site.kind == "linear":
            scale = b.call(aten.reshape.default, scale, [-1], role="ia3_l_flat")
        scaled = b.call(aten.mul.Tensor, value, scale, role="scaled")
        if not b.ctx.upcast:
            return scaled
        # peft: the product in the adapter's float32, rounded back to the model's dtype
        return b.call(aten._to_copy.default, scaled, dtype=b.ctx.base_dtype, role="scaled_downcast")

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        site = ctx.site
        scale = ctx.tensor("ia3_l").to(weight.dtype).reshape(-1)
        ones = (1,) * (weight.dim() - 2)
        if self.stage_at(site, ctx.options) == "output":
            weight = weight * scale.reshape(-1, 1, *ones)
            return weight, None if bias is None else bias * scale
        groups = getattr(site, "groups", 1)
        if groups == 1:
            return weight * scale.reshape(1, -1, *ones), bias
        # a grouped convolution's output channel o reads the input channels of its group: scale them
        out, per_group = weight.shape[0], weight.shape[1]
        scale = (
            scale.reshape(groups, 1, per_group)
            .expand(groups, out // groups, per_group)
            .reshape(out, per_group, *ones)
        )
        return weight * scale, bias

    def to_peft(self, options: Ia3Options, sites: list[Any]) -> dict[str, Any]:
        feedforward = sorted(s.path for s in sites if self.stage_at(s, options) == "input")
        others = [s.path for s in sites if s.path not in feedforward]
        modules: list[str] | str = feedforward
        if any(path.endswith(suffix) for path in others for suffix in feedforward):
            # peft would read these as suffixes of the others too; a whole-path regex names them
            modules = "(?:" + "|".join(re.escape(path) for path in feedforward) + ")"
        return {
            "feedforward_modules": modules,
            "fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites),
        }

    def describe(self, options: Ia3Options, sites: list[Any]) -> str:
        inputs = sum(self.stage_at(s, options) == "input" for s in sites)
        return (
            f"IA3 on {len(sites)} sites ({inputs} feed-forward, input scaled; "
            f"{len(sites) - inputs} output scaled), adapter {options.adapter!r}"
        )
