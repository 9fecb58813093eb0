"""NF4 as a weight format: what the technique layer sees of an `nf4_linear` site.

A `peftc::nf4_linear(x, packed, absmax, absmax_scale, offset, bias, out, in, blocksize)` node
is a linear site with `storage="nf4"`; its weight reads as a dequantized float32 copy, appears
in the graph through `peftc::nf4_dequantize`, and folds back by requantizing or by turning the
site into a dense linear (`fold_into_nf4`). The `nf4` pass that makes such sites is
`peftc.quant.passes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import (
    get_attr_path,
    get_tensor,
    module_path,
    peftc_meta,
    qualify,
    set_tensor,
    tag,
)
from peftc.quant import ops  # noqa: F401  (registers the peftc:: ops)
from peftc.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from peftc.sites.formats import register_format
from peftc.sites.weight import LinearSite

__all__ = [
    "NF4Format",
    "NF4ExpertsFormat",
    "nf4_state",
    "fold_into_nf4",
    "DTYPES",
    "EXPERT_SUFFIXES",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# NF4Weight field -> suffix of the buffer holding it (after a stack's name; the fields are the op's
# storage arguments, in order)
EXPERT_SUFFIXES = {
    "packed": "_nf4",
    "absmax": "_absmax",
    "absmax_scale": "_absmax_scale",
    "offset": "_absmax_offset",
}


def _dtype_name(dtype: torch.dtype) -> str:
    """The merge dtype matching the model's own (float32 for a float32 model)."""
    return next((name for name, d in DTYPES.items() if d == dtype), "float32")


def nf4_state(gm: fx.GraphModule, node: fx.Node) -> NF4Weight:
    """The NF4Weight a `peftc::nf4_linear` node reads, from its buffers."""
    _, packed, absmax, scale, offset, _, out_features, in_features, blocksize = node.args

    def read(n: fx.Node | None) -> torch.Tensor | None:
        return None if n is None else get_tensor(gm, get_attr_path(n))

    return NF4Weight(
        read(packed),
        read(absmax),
        torch.Size((out_features, in_features)),
        torch.float32,
        blocksize,
        scale is not None,
        read(scale),
        read(offset),
    )


class NF4Format:
    name = "nf4"
    adds_in_adapter_dtype = False  # peft's bitsandbytes layers cast the term to the output dtype

    def round_trip(
        self, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
    ) -> torch.Tensor:
        return dequantize_nf4(quantize_nf4(weight, blocksize, double_quant))

    def site(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        x, packed, _, _, _, bias, out_features, in_features, _ = node.args
        return LinearSite(
            path=module_path(node),
            node=node,
            input=x,
            weight=get_attr_path(packed),
            bias=get_attr_path(bias),
            op="nf4",
            storage="nf4",
            in_features=in_features,
            out_features=out_features,
        )

    def read(self, gm: fx.GraphModule, site: Any) -> torch.Tensor:
        return dequantize_nf4(nf4_state(gm, site.node), torch.float32)

    def node(self, builder: Any, site: Any) -> fx.Node:
        _, *state, _, out_features, in_features, blocksize = site.node.args
        return builder.call(
            torch.ops.peftc.nf4_dequantize.default,
            *state,
            out_features,
            in_features,
            blocksize,
            site.node.meta["val"].dtype,
            role="base_weight",
        )

    def snapshot(self, gm: fx.GraphModule, site: Any) -> Any:
        names = [get_attr_path(a) for a in site.node.args[1:6] if a is not None]
        return {name: get_tensor(gm, name) for name in names}

    def restore(self, gm: fx.GraphModule, site: Any, state: Any) -> None:
        _restore_quantized(gm, site, state, self.name)

    def write(
        self,
        gm: fx.GraphModule,
        site: Any,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        options: Any,
    ) -> float:
        if bias is not None and site.bias:
            set_tensor(
                gm,
                site.bias,
                torch.nn.Parameter(bias.to(get_tensor(gm, site.bias).dtype), requires_grad=False),
            )
        return fold_into_nf4(
            gm,
            site,
            weight,
            self.read(gm, site),
            requantize=getattr(options, "requantize", False),
            dtype=getattr(options, "dtype", None),
        )

    def compute_dtype(self, gm: fx.GraphModule, site: Any) -> torch.dtype:
        return site.node.meta["val"].dtype

    def storage(self, gm: fx.GraphModule, site: Any) -> list[str]:
        # packed bytes and statistics
        return [get_attr_path(a) for a in site.node.args[1:5] if a is not None]


register_format(NF4Format(), ops=(torch.ops.peftc.nf4_linear.default,))


def _restore_quantized(gm: fx.GraphModule, site: Any, state: dict, storage: str) -> None:
    """Put a snapshot of quantized storage back, unless the site was merged into a dense weight."""
    if site.storage != storage:
        raise OptionError(
            f"{site.path!r} was merged into a dense weight (merge(dtype=...)); that cannot be "
            "undone"
        )
    for name, tensor in state.items():
        set_tensor(gm, name, tensor, buffer=not isinstance(tensor, torch.nn.Parameter))


def fold_into_nf4(
    gm: fx.GraphModule,
    site,
    merged: torch.Tensor,
    base: torch.Tensor,
    *,
    requantize: bool,
    dtype: str | None,
) -> float:
    """Replace an NF4 site's weight by `merged` (= base + dW, float32, (out, in)).

    `requantize`: quantize `merged` to NF4 again in place of the old buffers (as peft does for
    bitsandbytes weights); `dtype`: swap the site for a dense `linear` with the merged weight in
    that dtype. Returns the fraction of dW that survives requantization (1.0 for dense).
    """
    if dtype is not None and not requantize:
        _to_dense(gm, site, merged.to(DTYPES[dtype]))
        return 1.0
    state = nf4_state(gm, site.node)
    requantized = quantize_nf4(merged, state.blocksize, state.double_quant)
    survived = _survival(site, merged, base, dequantize_nf4(requantized, torch.float32), requantize)
    for node, field in zip(site.node.args[1:5], EXPERT_SUFFIXES, strict=True):
        if node is not None:
            set_tensor(gm, get_attr_path(node), getattr(requantized, field), buffer=True)
    return survived


def _survival(
    site, merged: torch.Tensor, base: torch.Tensor, requantized: torch.Tensor, requantize: bool
) -> float:
    """The fraction of dW = merged - base that `requantized` keeps; without `requantize` (and no
    dtype, the other choice), an error stating it and recommending one."""
    delta = merged - base
    kept = requantized - base
    survived = float((kept * delta).sum() / (delta * delta).sum().clamp_min(1e-30))
    if requantize:
        return survived
    ratio = float(delta.norm() / base.norm().clamp_min(1e-30))
    val = site.node.meta.get("val")
    model_dtype = _dtype_name(val.dtype) if isinstance(val, torch.Tensor) else "float32"
    raise OptionError(
        f"merge: {site.path!r} is NF4; this update has ||dW||/||W|| = {ratio:.1e} and "
        "requantizing would keep "
        f'{survived:.1%} of it. Choose merge(dtype="{model_dtype}") for a dense '
        f"merged weight{' (recommended here)' if survived < 0.9 else ''} or "
        "merge(requantize=true) to stay 4-bit"
    )


def _to_dense(gm: fx.GraphModule, site, weight: torch.Tensor) -> None:
    graph = gm.graph
    x, buffers, bias = (
        site.node.args[0],
        [a for a in site.node.args[1:5] if a is not None],
        site.node.args[5],
    )
    out_dtype = site.node.meta["val"].dtype
    name = qualify(site.path, "weight")
    set_tensor(gm, name, torch.nn.Parameter(weight, requires_grad=False))
    with graph.inserting_before(site.node):
        w = graph.get_attr(name)
        if weight.dtype != out_dtype:
            x = graph.call_function(torch.ops.aten._to_copy.default, (x,), {"dtype": weight.dtype})
            tag(x, pass_name="merge", role="cast", path=site.path)
        if bias is not None and weight.dtype != out_dtype:
            bias = graph.call_function(
                torch.ops.aten._to_copy.default, (bias,), {"dtype": weight.dtype}
            )
            tag(bias, pass_name="merge", role="cast", path=site.path)
        dense = graph.call_function(torch.ops.aten.linear.default, (x, w, bias))
        out = dense
        if weight.dtype != out_dtype:
            out = graph.call_function(
                torch.ops.aten._to_copy.default, (dense,), {"dtype": out_dtype}
            )
            tag(out, pass_name="merge", role="cast", path=site.path)
    for node in (w, dense):
        node.meta.update(module_path=site.path, module_type=site.node.meta.get("module_type", ""))
    site.node.replace_all_uses_with(out)
    graph.erase_node(site.node)
    _drop_storage(gm, buffers, site.path)


NF4_EXPERTS = torch.ops.peftc.nf4_dequantize_experts.default


class NF4ExpertsFormat:
    """A mixture-of-experts weight stack (E, a, b) stored NF4 one expert slice at a time (each
    slice's bytes are bitsandbytes' for that slice), decoded by `peftc::nf4_dequantize_experts`
    where the experts' matmul reads it. Its site is a parameter site named as the float stack
    was."""

    name = "nf4_experts"
    adds_in_adapter_dtype = False

    def site(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        from peftc.sites.parameters import ParameterSite

        path = get_attr_path(node.args[0]).removesuffix(EXPERT_SUFFIXES["packed"])
        transposed = path.rpartition(".")[0] in peftc_meta(gm).get("transposed_experts", ())
        return ParameterSite(path, node, tuple(node.args[4]), transposed, storage=self.name)

    def _tensors(self, gm: fx.GraphModule, site: Any) -> list[torch.Tensor | None]:
        return [None if a is None else get_tensor(gm, get_attr_path(a)) for a in site.node.args[:4]]

    def read(self, gm: fx.GraphModule, site: Any) -> torch.Tensor:
        _, _, _, _, shape, blocksize, _ = site.node.args
        return NF4_EXPERTS(*self._tensors(gm, site), shape, blocksize, torch.float32)

    def node(self, builder: Any, site: Any) -> fx.Node:
        return builder.call(NF4_EXPERTS, *site.node.args, role="base_weight")

    def snapshot(self, gm: fx.GraphModule, site: Any) -> Any:
        return {name: get_tensor(gm, name) for name in self.storage(gm, site)}

    def restore(self, gm: fx.GraphModule, site: Any, state: Any) -> None:
        _restore_quantized(gm, site, state, self.name)

    def write(
        self,
        gm: fx.GraphModule,
        site: Any,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        options: Any,
    ) -> float:
        requantize = getattr(options, "requantize", False)
        dtype = getattr(options, "dtype", None)
        if dtype is not None and not requantize:
            _experts_to_dense(gm, site, weight.to(DTYPES[dtype]))
            return 1.0
        _, _, scale, _, _, blocksize, _ = site.node.args
        slices = [quantize_nf4(w, blocksize, scale is not None) for w in weight]
        requantized = torch.stack([dequantize_nf4(s, torch.float32) for s in slices])
        survived = _survival(site, weight, self.read(gm, site), requantized, requantize)
        for node, field in zip(site.node.args[:4], EXPERT_SUFFIXES, strict=True):
            if node is not None:
                stacked = torch.stack([getattr(s, field) for s in slices])
                set_tensor(gm, get_attr_path(node), stacked, buffer=True)
        return survived

    def compute_dtype(self, gm: fx.GraphModule, site: Any) -> torch.dtype:
        return site.node.meta["val"].dtype

    def storage(self, gm: fx.GraphModule, site: Any) -> list[str]:
        return [get_attr_path(a) for a in site.node.args[:4] if a is not None]


register_format(NF4ExpertsFormat(), ops=(NF4_EXPERTS,))


def _experts_to_dense(gm: fx.GraphModule, site: Any, weight: torch.Tensor) -> None:
    """The stack becomes a frozen parameter under its float name again, read in the op's dtype."""
    graph = gm.graph
    buffers = [a for a in site.node.args[:4] if a is not None]
    set_tensor(gm, site.path, torch.nn.Parameter(weight, requires_grad=False))
    with graph.inserting_before(site.node):
        value = graph.get_attr(site.path)
        if weight.dtype != site.node.meta["val"].dtype:
            value = graph.call_function(
                torch.ops.aten._to_copy.default, (value,), {"dtype": site.node.meta["val"].dtype}
            )
            tag(value, pass_name="merge", role="cast", path=site.path)
    site.node.replace_all_uses_with(value)
    graph.erase_node(site.node)
    _drop_storage(gm, buffers, site.path)


def _drop_storage(gm: fx.GraphModule, buffers: list[fx.Node], path: str) -> None:
    """Remove the quantized buffers no node reads any more."""
    for node in buffers:
        if not node.users:
            qualname = get_attr_path(node)
            gm.graph.erase_node(node)
            owner, _, attr = qualname.rpartition(".")
            gm.get_submodule(owner)._buffers.pop(attr, None)
    peftc_meta(gm).get("quantized", {}).pop(path, None)
