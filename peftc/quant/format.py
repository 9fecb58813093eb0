"""NF4 as a weight format: what the technique layer sees of an `nf4_linear` site.

A `peftc::nf4_linear(x, packed, absmax, absmax_scale, offset, bias, out, in, blocksize)` node
is a linear site with `storage="nf4"`; its weight reads as a dequantized float32 copy, appears
in the graph through `peftc::nf4_dequantize`, and folds back by requantizing or by turning the
site into a dense linear (see `passes/nf4.py`'s `fold_into_nf4`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.graph import get_attr_path, get_tensor, module_path, set_tensor
from peftc.quant import ops  # noqa: F401  (registers the peftc:: ops)
from peftc.quant.nf4 import NF4Weight, dequantize_nf4
from peftc.weights import register_format

__all__ = ["NF4Format", "nf4_state"]


def nf4_state(gm: fx.GraphModule, site: Any) -> NF4Weight:
    """The NF4Weight an `nf4_linear` site reads, from its buffers."""
    _, packed, absmax, scale, offset, _, out_features, in_features, blocksize = site.node.args
    read = lambda node: None if node is None else get_tensor(gm, get_attr_path(node))  # noqa: E731
    return NF4Weight(read(packed), read(absmax), torch.Size((out_features, in_features)), torch.float32, blocksize,
                     scale is not None, read(scale), read(offset))


class NF4Format:
    name = "nf4"

    def site(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        from peftc.sites import LinearSite

        x, packed, _, _, _, bias, out_features, in_features, _ = node.args
        return LinearSite(path=module_path(node), node=node, input=x, weight=get_attr_path(packed),
                          bias=get_attr_path(bias), op="nf4", storage="nf4",
                          in_features=in_features, out_features=out_features)

    def read(self, gm: fx.GraphModule, site: Any) -> torch.Tensor:
        return dequantize_nf4(nf4_state(gm, site), torch.float32)

    def node(self, builder: Any, site: Any) -> fx.Node:
        _, *state, _, out_features, in_features, blocksize = site.node.args
        return builder.call(torch.ops.peftc.nf4_dequantize.default, *state, out_features, in_features, blocksize,
                            site.node.meta["val"].dtype, role="base_weight")

    def snapshot(self, gm: fx.GraphModule, site: Any) -> Any:
        names = [get_attr_path(a) for a in site.node.args[1:6] if a is not None]
        return {name: get_tensor(gm, name) for name in names}

    def restore(self, gm: fx.GraphModule, site: Any, state: Any) -> None:
        if site.storage != "nf4":
            raise OptionError(f"{site.path!r} was merged into a dense weight (merge(dtype=...)); that cannot be undone")
        for name, tensor in state.items():
            set_tensor(gm, name, tensor, buffer=not isinstance(tensor, torch.nn.Parameter))

    def write(self, gm: fx.GraphModule, site: Any, weight: torch.Tensor, bias: torch.Tensor | None, options: Any) -> float:
        from peftc.passes.nf4 import fold_into_nf4

        if bias is not None and site.bias:
            set_tensor(gm, site.bias, torch.nn.Parameter(bias.to(get_tensor(gm, site.bias).dtype), requires_grad=False))
        return fold_into_nf4(gm, site, weight, self.read(gm, site), requantize=getattr(options, "requantize", False),
                             dtype=getattr(options, "dtype", None))

    def compute_dtype(self, gm: fx.GraphModule, site: Any) -> torch.dtype:
        return site.node.meta["val"].dtype

    def storage(self, gm: fx.GraphModule, site: Any) -> list[str]:
        return [get_attr_path(a) for a in site.node.args[1:5] if a is not None]  # packed bytes and statistics


register_format(NF4Format(), ops=(torch.ops.peftc.nf4_linear.default,))
