"""Parameter sites: a stored tensor as the graph reads it, whatever reads it (peft's
`target_parameters`: the 3-D expert weights of mixture-of-experts layers, a parameter used by `@`).

The site is the `get_attr` node of a floating-point parameter; a technique's `output` stage replaces
the value every reader sees, as peft's parametrization makes every read inside the forward see
W + dW. `path` is the parameter's qualified name, `module` the module holding it. The weight is
stored densely: merging folds into it through `peftc.sites.formats` like a linear's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from peftc.ir.graph import peftc_meta
from peftc.sites.modules import captured_target

__all__ = ["ParameterSite", "parameter_sites"]


@dataclass(frozen=True)
class ParameterSite:
    kind: ClassVar[str] = "parameter"
    path: str
    node: fx.Node
    shape: tuple[int, ...]
    # transformers' experts declared `is_transposed` store (experts, in, out), others (experts,
    # out, in)
    transposed: bool = False
    reads: int = 1  # get_attr nodes reading it (export reads each parameter once)
    storage: ClassVar[str] = "dense"
    bias: ClassVar[None] = None

    @property
    def weight(self) -> str:
        return self.path

    @property
    def module(self) -> str:
        return self.path.rpartition(".")[0]


def parameter_sites(gm: fx.GraphModule) -> list[ParameterSite]:
    """Every floating-point parameter the graph reads, at its first read."""
    parameters = dict(gm.named_parameters())
    transposed = set(peftc_meta(gm).get("transposed_experts", ()))
    reads: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or "adapter" in n.meta.get("peftc", {}):
            continue
        name = captured_target(n)
        tensor = parameters.get(name)
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
            reads.setdefault(name, []).append(n)
    return [
        ParameterSite(
            name,
            nodes[0],
            tuple(parameters[name].shape),
            name.rpartition(".")[0] in transposed,
            len(nodes),
        )
        for name, nodes in reads.items()
    ]
