"""LN tuning: a trainable copy of each targeted norm's weight and bias, as HF peft's LN tuning.

    y = layer_norm(x, W, b)  ->  y = layer_norm(x, W', b')      (W', b' start as copies of W, b)
    y = W * rms_normalised(x)  ->  y = W' * rms_normalised(x)   (RMSNorm: Llama, Mistral, Qwen2, T5)

1. Layer-norm sites (`aten.layer_norm`, `nn.LayerNorm` with an affine weight) and RMSNorm sites
   (the scale of an RMSNorm module) are rewritten to read `<path>.ln_tuning_layers.<adapter>.weight`
   (and `.bias` when the norm has one), peft's names for the tensors of its copied module; the
   original stays frozen.
2. A target that is no norm (a linear, a whole block) is a module site: peft trains a copy of any
   module it is pointed at, `<path>.ln_tuning_layers.<adapter>`, and the graph reads the copy
   (`peftc.technique.module_copy`).
3. One adapter at a site is active at a time (peft raises otherwise). Merging copies W', b' into
   the base; unmerging restores the originals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.ir.graph import get_tensor
from peftc.ir.targets import compile_pattern
from peftc.sites.selection import default_targets, sites_of
from peftc.technique import AdapterOptions, Builder, Context, Param, Technique, register_technique
from peftc.technique.module_copy import ModuleCopy

# what LN tuning makes of a target that is no norm
_COPY = ModuleCopy("ln_tuning_layers")

__all__ = ["LnTuningOptions", "LnTuning"]


@dataclass(frozen=True)
class LnTuningOptions(AdapterOptions):
    pass


@register_technique
class LnTuning(Technique):
    """Tune copies of layer-norm weights and biases: `layer_norm(x, W, b) -> layer_norm(x, W',
    b')`."""

    name = "ln_tuning"
    half_precision = "base"
    options = LnTuningOptions
    peft_type = "LN_TUNING"
    site_kinds = ("layer_norm", "rms_norm", "module")
    stage = "weight"
    # each adapter replaces the weight: two active copies have no meaning (peft refuses them too)
    exclusive = True

    def select(self, gm: fx.GraphModule, options: LnTuningOptions) -> list[tuple[Any, str]]:
        """The norms the targets select, and as module sites the selected modules holding none."""
        pattern = options.targets or default_targets(gm, self.name, self.targets_table)
        matches = compile_pattern(pattern)
        norms = [s for s in sites_of(gm, ("layer_norm", "rms_norm")) if matches(s.path)]
        taken = {s.path for s in norms}
        modules = [
            s
            for s in sites_of(gm, ("module",), pattern)
            if not any(p == s.path or p.startswith(s.path + ".") for p in taken)
        ]
        chosen = norms + [
            m for m in modules if not any(m.path.startswith(o.path + ".") for o in modules)
        ]
        return [(site, site.path) for site in chosen]

    def stage_at(self, site: Any, options: LnTuningOptions) -> str:
        return _COPY.stage if site.kind == "module" else self.stage

    def modules(self, ctx: Context) -> dict[str, Any]:
        return _COPY.modules(ctx) if ctx.site.kind == "module" else {}

    def params(self, ctx: Context) -> list[Param]:
        site = ctx.site
        if site.kind == "module":
            return []
        # copied as stored, dtype included, as peft's deepcopy
        weight = get_tensor(ctx.gm, site.weight)
        params = [
            Param(
                "ln_tuning_layers", value=weight, dtype=weight.dtype, suffix="weight", key="weight"
            )
        ]
        if site.bias:
            bias = get_tensor(ctx.gm, site.bias)
            params.append(
                Param("ln_tuning_layers", value=bias, dtype=bias.dtype, suffix="bias", key="bias")
            )
        return params

    def build(self, b: Builder, weight: fx.Node) -> fx.Node:
        if b.site.kind == "module":
            return _COPY.build(b, weight)
        if b.site.bias:
            b.bias = b.param("bias")
        return b.param("weight")

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tuned_bias = ctx.tensor("bias").to(bias.dtype) if bias is not None else None
        return ctx.tensor("weight").to(weight.dtype), tuned_bias

    def describe(self, options: LnTuningOptions, sites: list[Any]) -> str:
        return f"LN tuning on {len(sites)} layer norms, adapter {options.adapter!r}"
