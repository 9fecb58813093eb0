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
4. Mixture-of-experts weight stacks (transformers 5's 3-D `experts.gate_up_proj`, ...) are
   quantized one expert slice at a time (each slice's bytes are bitsandbytes' for it) into
   `<name>_nf4`, `<name>_absmax`, ... with a leading expert dimension; every read of the stack
   becomes `peftc::nf4_dequantize_experts`, so the experts' matmul and LoRA on the stack
   (`target_parameters`) see the decoded weight.
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
from peftc.ir.targets import compile_pattern
from peftc.quant import ops  # noqa: F401  (registers peftc::nf4_linear)
from peftc.quant.format import DTYPES, EXPERT_SUFFIXES, NF4_EXPERTS
from peftc.quant.nf4 import QuantizationError, check_blocksize, quantize_nf4
from peftc.sites.modules import captured_target
from peftc.sites.selection import resolve_sites
from peftc.sites.weight import linear_sites
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
        None,
        doc="linear sites (and expert stacks, by parameter name) to quantize (None: every linear "
        "but those transformers keeps in full precision: the LM or task head, tied weights; and "
        "every expert stack)",
        check=pattern,
    )
    experts: bool = option(
        True, doc="quantize mixture-of-experts weight stacks too, one expert slice at a time"
    )


@register_pass("nf4", options=Nf4Options)
def nf4(gm: fx.GraphModule, options: Nf4Options) -> PassResult:
    """Quantize linear weights to NF4: `linear(x, W, b) -> peftc::nf4_linear(x, W_nf4, ..., b)`."""
    stacks = _expert_stacks(gm, options)
    sites = [] if stacks and _only_stacks(gm, options) else _linear_sites(gm, options)
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
    for name, readers in stacks.items():
        quantized[name] = _quantize_stack(gm, name, readers, options)
    report = (
        f"NF4 blocksize {options.blocksize}{' double-quant' if options.double_quant else ''} on "
        f"{len(buffers)} linears"
    )
    if stacks:
        report += (
            f" and {len(stacks)} expert stacks ({sum(quantized[n] for n in stacks):,} weights)"
        )
    left = [n for n in _expert_parameters(gm) if n not in stacks] if options.targets is None else []
    if left:
        note = f"{len(left)} mixture-of-experts weight stacks (e.g. {left[0]}) stay in float"
        warnings.warn(f"nf4: {note}", stacklevel=2)
        report += f"; {note}"
    touched = tuple(s.path for s in sites) + tuple(stacks)
    return PassResult(gm, modified=bool(touched), sites=touched, report=report)


def _linear_sites(gm: fx.GraphModule, options: Nf4Options) -> list:
    sites = resolve_sites(gm, options.targets or "all-linear", "nf4")
    if options.targets is None:  # as transformers loads a model in 4 bits
        kept = tuple(peftc_meta(gm).get("full_precision", ()))
        sites = [s for s in sites if not any(_within(s.path, k) for k in kept)]
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
    return sites


def _within(path: str, module: str) -> bool:
    """transformers' match of a module to keep: the path, a module inside it, or a path's end."""
    return path == module or path.startswith(module + ".") or path.endswith("." + module)


def _expert_parameters(gm: fx.GraphModule) -> dict[str, int]:
    """The 3-D weight stacks of experts modules (transformers 5's fused MoE experts), by name."""
    types = peftc_meta(gm).get("module_types", {})
    return {
        name: p.numel()
        for name, p in gm.named_parameters()
        if p.dim() == 3 and types.get(name.rpartition(".")[0], "").endswith("Experts")
    }


def _expert_stacks(gm: fx.GraphModule, options: Nf4Options) -> dict[str, list[fx.Node]]:
    """The expert stacks to quantize (`targets` matches their names), each with its reads."""
    if not options.experts:
        return {}
    chosen = _expert_parameters(gm)
    if options.targets is not None:
        matches = compile_pattern(options.targets)
        chosen = {name: n for name, n in chosen.items() if matches(name)}
    readers: dict[str, list[fx.Node]] = {name: [] for name in chosen}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and captured_target(node) in readers:
            readers[captured_target(node)].append(node)
    sites = {path for record in adapters(gm).values() for path, _ in record.sites}
    adapted = sorted(name for name in readers if name in sites)
    if adapted:
        raise OptionError(
            f"nf4: {adapted[0]} already carries adapters; quantize the base first "
            "(nf4, freeze, lora(...)), or set experts=false"
        )
    return {name: nodes for name, nodes in readers.items() if nodes}


def _only_stacks(gm: fx.GraphModule, options: Nf4Options) -> bool:
    """Whether `targets` names expert stacks and no linear site (then no linear is required)."""
    if options.targets is None:
        return False
    matches = compile_pattern(options.targets)
    return not any(matches(s.path) for s in linear_sites(gm))


def _quantize_stack(
    gm: fx.GraphModule, name: str, readers: list[fx.Node], options: Nf4Options
) -> int:
    """Quantize stack `name` per expert slice; its reads decode it. Returns its weight count."""
    weight = get_tensor(gm, name).detach()
    module = name.rpartition(".")[0]
    peftc_meta(gm).setdefault("parameter_order", {}).setdefault(
        module, [n for n, _ in gm.get_submodule(module).named_parameters(recurse=False)]
    )
    dtype = DTYPES[options.compute_dtype] if options.compute_dtype else weight.dtype
    slices = [quantize_nf4(w.to(dtype), options.blocksize, options.double_quant) for w in weight]
    names = {}
    for field, suffix in EXPERT_SUFFIXES.items():
        if getattr(slices[0], field) is not None:
            names[field] = name + suffix
            set_tensor(
                gm, names[field], torch.stack([getattr(s, field) for s in slices]), buffer=True
            )
    graph = gm.graph
    for reader in readers:
        with graph.inserting_before(reader):
            args = [graph.get_attr(names[f]) if f in names else None for f in EXPERT_SUFFIXES]
            node = graph.call_function(
                NF4_EXPERTS, (*args, list(weight.shape), options.blocksize, dtype)
            )
        for state in filter(None, args):
            tag(state, pass_name="nf4", role="nf4_state", path=name)
        node.meta.update(
            {k: v for k, v in reader.meta.items() if k in ("module_path", "module_type")},
            val=torch.empty(weight.shape, dtype=dtype, device="meta"),
        )
        reader.replace_all_uses_with(node)
        graph.erase_node(reader)
    _drop_parameter(gm, name)
    return weight.numel()


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
