"""NF4: store selected linear weights as 4-bit NormalFloat buffers (QLoRA's base format).

    y = linear(x, W, b)
      ->  y = peftc::nf4_linear(x, W_nf4, absmax, absmax_scale, offset, b, out, in, blocksize)

1. Linear sites matching `targets` (default: every linear site but the LM head, as QLoRA) are
   quantized block-wise, byte-identical to bitsandbytes' `quantize_4bit(..., quant_type="nf4")`;
   `double_quant` quantizes the block scales too (about 4.127 bits a weight at blocksize 64).
2. GPT-2 `Conv1D` weights (stored transposed) are quantized in (out, in) layout.
3. The full-precision weight is removed from the module: buffers `<path>.weight_nf4`,
   `<path>.weight_absmax` (and `<path>.weight_absmax_scale`, `<path>.weight_absmax_offset`) replace
   it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor, peftc_meta, qualify, set_tensor, tag
from peftc.ir.options import Options, option, pattern
from peftc.ir.registry import PassResult, register_pass
from peftc.quant import ops  # noqa: F401  (registers peftc::nf4_linear)
from peftc.quant.format import DTYPES
from peftc.quant.nf4 import QuantizationError, check_blocksize, quantize_nf4
from peftc.sites.selection import resolve_sites
from peftc.technique.adapters import adapters

__all__ = ["Nf4Options", "nf4"]


def _blocksize(value: int) -> str | None:
    try:
        check_blocksize(value)
    except QuantizationError:
        return "a power of two from 32 to 4096 (64 is NF4's default)"
    return None


@dataclass(frozen=True)
class Nf4Options(Options):
    blocksize: int = option(64, doc="weights per absmax scale", check=_blocksize)
    double_quant: bool = option(True, doc="quantize the absmax scales too (8-bit, QLoRA's)")
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = option(
        None, doc="dtype the weight is decoded to and multiplied in (None: the weight's)"
    )
    targets: str | None = option(
        None, doc="linear sites to quantize (None: every one but the LM head)", check=pattern
    )


@register_pass("nf4", options=Nf4Options)
def nf4(gm: fx.GraphModule, options: Nf4Options) -> PassResult:
    """Quantize linear weights to NF4: `linear(x, W, b) -> peftc::nf4_linear(x, W_nf4, ..., b)`."""
    sites = resolve_sites(gm, options.targets or "all-linear", "nf4")
    already = [s.path for s in sites if s.storage == "nf4"]
    if already:
        raise OptionError(
            f"nf4: {', '.join(already[:4])} {'is' if len(already) == 1 else 'are'} already NF4; "
            "quantize each weight once (drop the second nf4 or narrow its targets)"
        )
    adapted = sorted(
        {s.path for s in sites for r in adapters(gm).values() if (s.path, s.kind) in r.sites}
    )
    if adapted:
        raise OptionError(
            f"nf4: {', '.join(adapted[:4])} already carr{'ies' if len(adapted) == 1 else 'y'} "
            "adapters; quantize the base first (nf4, freeze, lora(...)), or narrow nf4's targets"
        )
    quantized: dict[str, int] = peftc_meta(gm).setdefault("quantized", {})
    # Sites were found before any rewrite: a site fed by an earlier site (chained linears) still
    # names that site's erased node as its input, so inputs are looked up here.
    replaced: dict[fx.Node, fx.Node] = {}
    # weight -> its NF4 buffers: a module called twice is quantized once
    buffers: dict[str, dict[str, str]] = {}
    for site in sites:
        names = buffers.get(site.weight)
        if names is None:
            names = buffers[site.weight] = _quantize_weight(gm, site, options)
            quantized[site.path] = site.out_features * site.in_features
        replaced[site.node] = _swap_linear(
            gm, site, names, replaced.get(site.input, site.input), options
        )
    report = (
        f"NF4 blocksize {options.blocksize}{' double-quant' if options.double_quant else ''} on "
        f"{len(buffers)} linears"
    )
    experts = _expert_parameters(gm)
    if experts:
        note = (
            f"{len(experts)} mixture-of-experts weight stacks ({sum(experts.values()):,} "
            "parameters, e.g. "
            f"{next(iter(experts))}) stay in their float dtype: nf4 quantizes linear weights only"
        )
        warnings.warn(f"nf4: {note}", stacklevel=2)
        report += f"; {note}"
    return PassResult(gm, modified=bool(sites), sites=tuple(s.path for s in sites), report=report)


def _expert_parameters(gm: fx.GraphModule) -> dict[str, int]:
    """The 3-D weight stacks of experts modules (transformers 5's fused MoE experts), by name."""
    types = peftc_meta(gm).get("module_types", {})
    return {
        name: p.numel()
        for name, p in gm.named_parameters()
        if p.dim() == 3 and types.get(name.rpartition(".")[0], "").endswith("Experts")
    }


def _swap_linear(
    gm: fx.GraphModule, site: Any, names: dict[str, str], x: fx.Node, options: Nf4Options
) -> fx.Node:
    """`linear(x, W, b)` -> `peftc::nf4_linear(x, W_nf4, ..., b)`; W leaves the model."""
    graph = gm.graph
    with graph.inserting_before(site.node):
        args = [
            graph.get_attr(names[k]) if k in names else None
            for k in ("packed", "absmax", "absmax_scale", "offset")
        ]
        bias = graph.get_attr(site.bias) if site.bias else None
        source = x
        if options.compute_dtype:
            x = graph.call_function(
                torch.ops.aten._to_copy.default, (x,), {"dtype": DTYPES[options.compute_dtype]}
            )
        node = graph.call_function(
            torch.ops.peftc.nf4_linear.default,
            (x, *args, bias, site.out_features, site.in_features, options.blocksize),
        )
    for state_node in [a for a in args if a is not None] + ([bias] if bias is not None else []):
        tag(state_node, pass_name="nf4", role="nf4_state", path=site.path)
    if x is not source:
        tag(x, pass_name="nf4", role="cast", path=site.path)
    # Untagged: the quantized linear is a base op, so later passes find it as a linear site.
    node.meta.update(module_path=site.path, module_type=site.node.meta.get("module_type", ""))
    site.node.replace_all_uses_with(node)
    graph.erase_node(site.node)
    for reader in [
        n for n in graph.nodes if n.op == "get_attr" and n.target in (site.weight, site.bias)
    ]:
        if not reader.users:
            graph.erase_node(reader)
    _drop_parameter(gm, site.weight)
    return node


def _quantize_weight(gm: fx.GraphModule, site, options: Nf4Options) -> dict[str, str]:
    """Register the NF4 buffers of `site`'s weight; returns their names by field of `Nf4State`."""
    weight = get_tensor(gm, site.weight)
    if not weight.is_floating_point():
        raise OptionError(
            f"nf4: weight of {site.path!r} is {weight.dtype}, not floating point; exclude it from "
            "targets"
        )
    matrix = weight.T.contiguous() if site.fan_in_fan_out else weight
    if options.compute_dtype:
        matrix = matrix.to(DTYPES[options.compute_dtype])
    state = quantize_nf4(matrix.detach(), options.blocksize, options.double_quant)
    names = {
        "packed": qualify(site.path, "weight_nf4"),
        "absmax": qualify(site.path, "weight_absmax"),
    }
    if options.double_quant:
        names.update(
            absmax_scale=qualify(site.path, "weight_absmax_scale"),
            offset=qualify(site.path, "weight_absmax_offset"),
        )
    for field, name in names.items():
        set_tensor(gm, name, getattr(state, field), buffer=True)
    return names


def _drop_parameter(gm: fx.GraphModule, qualname: str) -> None:
    owner, _, attr = qualname.rpartition(".")
    module = gm.get_submodule(owner)
    module._parameters.pop(attr, None)
    module._buffers.pop(attr, None)
