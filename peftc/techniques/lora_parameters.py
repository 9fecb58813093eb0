"""LoRA on a parameter wherever the graph reads it: peft's `target_parameters` (its `ParamWrapper`).

    W -> W + s * B A                                     (2-D parameter, (out, in) = W.shape)
    W[e] -> W[e] + s * B_e A_e                           (3-D experts, (E, out, in))
    W[e] -> W[e] + s * (B_e A_e)^T                       (3-D experts stored (E, in, out))

1. A 3-D parameter holds one matrix per expert; A is (r * E, in) with expert e's rows at
   `A.view(E, r, in)[e]`, B is (out, r * E) with its columns at `B.view(out, r, E)[..., e]`, as
   peft lays them out. transformers' experts that declare `is_transposed` store (E, in, out).
2. Several parameters of one module nest as peft's wrappers do: the one registered last is
   outermost (`<module>.lora_A`), the others one `base_layer` deeper each.
3. peft refuses dropout, lora_bias, DoRA and the other variants here (a parametrization cannot
   reach x); so does peftc, by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.sites.parameters import ParameterSite, parameter_sites
from peftc.technique import Builder, Context, Param, kaiming_uniform

__all__ = ["parameter_placements", "parameter_params", "on_parameter", "parameter_delta"]

aten = torch.ops.aten


def parameter_placements(gm: fx.GraphModule, names: list[str]) -> list[tuple[ParameterSite, str]]:
    """The parameter sites `names` select (a whole path or its end, as peft matches), each with the
    module path its tensors take (case 2)."""
    sites = [
        s
        for s in parameter_sites(gm)
        if any(s.path == t or s.path.endswith(f".{t}") for t in names)
    ]
    if not sites:
        raise OptionError(
            f"lora: target_parameters={names} matches no parameter the graph reads; name a "
            "parameter by its path or its end (e.g. 'experts.gate_up_proj'). A module called whole "
            "(symbolic capture) reads its parameters inside: capture with example inputs"
        )
    by_module: dict[str, list[ParameterSite]] = {}
    for site in sites:
        by_module.setdefault(site.module, []).append(site)
    placed = []
    for module, found in by_module.items():
        if not module:
            raise OptionError(
                f"lora: {found[0].path!r} belongs to the model itself, which peft cannot wrap; "
                "target parameters of submodules"
            )
        # as the module registered them (a quantized stack left the module's parameters)
        order = peftc_meta(gm).get("parameter_order", {}).get(module) or [
            n for n, _ in gm.get_submodule(module).named_parameters(recurse=False)
        ]
        found.sort(key=lambda s: order.index(s.path.rpartition(".")[2]))
        for depth, site in enumerate(reversed(found)):
            placed.append((site, module + ".base_layer" * depth))
    return placed


def check_parameter(site: ParameterSite, options: Any) -> None:
    where = f"lora: target_parameters at {site.path!r}"
    refused = [
        name
        for name, on in (
            ("dropout", options.dropout > 0),
            ("lora_bias", options.lora_bias),
            ("dora", options.dora),
            ("BD-LoRA", options.block_diagonal),
        )
        if on
    ]
    if refused:
        raise OptionError(f"{where}: peft does not support {refused[0]} on parameters; unset it")
    if len(site.shape) not in (2, 3):
        raise OptionError(
            f"{where}: a {len(site.shape)}-D parameter; peft adapts 2-D and 3-D (experts) ones only"
        )
    if site.reads > 1:
        raise OptionError(
            f"{where}: the graph reads it {site.reads} times; capture with torch.export, which "
            "reads each parameter once"
        )


def parameter_params(site: ParameterSite, options: Any, init: Any) -> list[Param]:
    experts, fan_in, fan_out = site.experts_in_out
    return [
        Param(
            "lora_A", (options.r * experts, fan_in), init=init or kaiming_uniform, suffix="weight"
        ),
        Param("lora_B", (fan_out, options.r * experts), suffix="weight"),
    ]


def on_parameter(b: Builder, W: fx.Node) -> fx.Node:
    """W + s dW in the parameter's layout, as peft's parametrization computes it."""
    site, s = b.site, b.options.scaling
    A, B = b.param("lora_A"), b.param("lora_B")
    if len(site.shape) == 2:
        delta = b.call(aten.mm.default, B, A, role="lora_weight")
        scaled = b.call(aten.mul.Tensor, delta, s, role="scaled_weight")
        if b.ctx.upcast:  # peft: the delta in the parameter's dtype
            scaled = _downcast(b, scaled, "scaled_weight")
        return b.call(aten.add.Tensor, W, scaled, role="adapted_parameter")
    experts, fan_in, fan_out = site.experts_in_out
    r = b.options.r
    A3 = b.call(aten.view.default, A, [experts, r, fan_in], role="lora_A_experts")
    B3 = b.call(
        aten.permute.default,
        b.call(aten.view.default, B, [fan_out, r, experts], role="lora_B_split"),
        [2, 0, 1],
        role="lora_B_experts",
    )
    lhs, rhs = B3, A3
    if site.transposed:  # peft's factors for (E, in, out): A^T and B^T
        lhs = b.call(aten.transpose.int, A3, -2, -1, role="lora_A_experts_t")
        rhs = b.call(aten.transpose.int, B3, -2, -1, role="lora_B_experts_t")
    if b.ctx.upcast:  # peft: the factors in the parameter's dtype
        lhs, rhs = _downcast(b, lhs, "lhs"), _downcast(b, rhs, "rhs")
    return b.call(aten.baddbmm.default, W, lhs, rhs, alpha=s, role="adapted_parameter")


def _downcast(b: Builder, value: fx.Node, role: str) -> fx.Node:
    return b.call(aten._to_copy.default, value, dtype=b.ctx.base_dtype, role=f"{role}_downcast")


def parameter_delta(ctx: Context) -> torch.Tensor:
    site, s, r = ctx.site, ctx.options.scaling, ctx.options.r
    A, B = ctx.tensor("lora_A").float(), ctx.tensor("lora_B").float()
    if len(site.shape) == 2:
        return (B @ A) * s
    experts, fan_in, fan_out = site.experts_in_out
    delta = torch.einsum("ore,eri->eoi", B.view(fan_out, r, experts), A.view(experts, r, fan_in))
    return (delta.transpose(-2, -1) if site.transposed else delta) * s
