"""Parameter sites: a stored tensor as the graph reads it, whatever reads it (peft's
`target_parameters`: the 3-D expert weights of mixture-of-experts layers, a parameter used by `@`).

The site is the `get_attr` node of a floating-point parameter; a technique's `output` stage replaces
the value every reader sees, as peft's parametrization makes every read inside the forward see
W + dW. `path` is the parameter's qualified name as read, `module` the module holding it,
`aliases` the names of the same tensor elsewhere (export reads tied weights under one name).
Merging folds into the weight through `peftc.sites.formats` like a linear's. A quantized weight
stack is a site too: the node of the op that decodes it (a registered format's op, e.g.
`peftc::nf4_dequantize_experts`), with `storage` naming the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from peftc.ir.graph import peftc_meta
from peftc.sites.formats import format_of_node
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
    aliases: tuple[str, ...] = ()  # its other names (tied weights: GPT-2's wte and lm_head)
    storage: str = "dense"
    bias: ClassVar[None] = None

    @property
    def weight(self) -> str:
        return self.path

    @property
    def module(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def experts_in_out(self) -> tuple[int, int, int]:
        """(experts, fan_in, fan_out): a 2-D parameter (out, in) is one expert."""
        if len(self.shape) == 2:
            return 1, self.shape[1], self.shape[0]
        experts, first, second = self.shape
        return (experts, first, second) if self.transposed else (experts, second, first)


def parameter_sites(gm: fx.GraphModule) -> list[ParameterSite]:
    """Every floating-point parameter the graph reads, at its first read, and every quantized stack
    it decodes; reads of one tensor under several names (tied weights) are one site."""
    names: dict[int, list[str]] = {}
    tensors: dict[str, nn.Parameter] = {}
    for name, tensor in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), []).append(name)
        tensors[name] = tensor
    reads: dict[int, list[tuple[str, fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or not n.users or "adapter" in n.meta.get("peftc", {}):
            continue
        tensor = tensors.get(captured_target(n))
        if tensor is not None and tensor.is_floating_point():
            reads.setdefault(id(tensor), []).append((captured_target(n), n))
    transposed = set(peftc_meta(gm).get("transposed_experts", ()))
    sites = [
        site
        for n in gm.graph.nodes
        if (fmt := format_of_node(n)) is not None
        and isinstance(site := fmt.site(gm, n), ParameterSite)
    ]
    for key, found in reads.items():
        name, node = found[0]
        sites.append(
            ParameterSite(
                name,
                node,
                tuple(tensors[name].shape),
                name.rpartition(".")[0] in transposed,
                len(found),
                tuple(a for a in names[key] if a != name),
            )
        )
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(sites, key=lambda s: order[s.node])
