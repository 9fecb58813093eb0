"""Region sites: places a technique rewrites that are not one weight.

1. Attention sites: `scaled_dot_product_attention` with its q, k, v inputs.
2. Block sites: the repeated blocks of a model (children of its outermost `ModuleList`s,
   e.g. `model.layers.3`), with the residual stream entering and leaving each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from peftc.graph import module_path, peftc_meta
from peftc.targets import select

__all__ = ["AttentionSite", "BlockSite", "attention_sites", "block_sites"]

_SDPA_FNS = {torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}


def _base_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if "peftc" not in n.meta]


def _select(sites: list, targets: str | None, what: str) -> list:
    chosen = set(select(targets, [s.path for s in sites], what=what))
    return [s for s in sites if s.path in chosen]


@dataclass(frozen=True)
class AttentionSite:
    path: str
    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node


@dataclass(frozen=True)
class BlockSite:
    """Block `index` at `path`: `input` is the residual stream entering it, `output` leaving it."""

    path: str
    index: int
    input: fx.Node | None
    output: fx.Node


def attention_sites(gm: fx.GraphModule, targets: str | None = None) -> list[AttentionSite]:
    sites = [
        AttentionSite(module_path(n), n, *n.args[:3])
        for n in _base_nodes(gm)
        if n.op == "call_function" and n.target in _SDPA_FNS
    ]
    return _select(sites, targets, "attention site")


def block_sites(gm: fx.GraphModule, targets: str | None = None) -> list[BlockSite]:
    types = peftc_meta(gm).get("module_types") or _module_types_from_nodes(gm)
    blocks = _outermost_list_children(types)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = []
    for path in blocks:
        inside = [n for n in _base_nodes(gm) if n.op not in ("get_attr", "placeholder") and _within(module_path(n), path)]
        if not inside:
            continue
        members = set(inside)
        outputs = [n for n in inside if any(u not in members for u in n.users)]
        inputs = sorted({a for n in inside for a in n.all_input_nodes if a not in members and a.op != "get_attr"}, key=order.get)
        stream_in, stream_out = _residual_stream(inputs, outputs)
        if stream_out is not None:
            sites.append(BlockSite(path, int(path.rsplit(".", 1)[1]), stream_in, stream_out))
    return _select(sites, targets, "block")


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _module_types_from_nodes(gm: fx.GraphModule) -> dict[str, str]:
    types: dict[str, str] = {}
    for n in gm.graph.nodes:
        for path, kind in (n.meta.get("nn_module_stack") or {}).values():
            types.setdefault(path, kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}")
    for path, module in gm.named_modules():
        types.setdefault(path, f"{type(module).__module__}.{type(module).__qualname__}")
    return types


def _outermost_list_children(types: dict[str, str]) -> list[str]:
    """Paths `<list>.<i>` whose parent is a ModuleList and that lie in no other such block."""
    blocks: list[str] = []
    for path in types:
        parent, _, index = path.rpartition(".")
        if index.isdigit() and types.get(parent, "").endswith("ModuleList"):
            if not any(_within(path, b) for b in blocks):
                blocks.append(path)
    return blocks


def _residual_stream(inputs: list[fx.Node], outputs: list[fx.Node]) -> tuple[fx.Node | None, fx.Node | None]:
    """The output whose shape matches an input's: the residual stream keeps its shape."""

    def shape(n: fx.Node) -> tuple | None:
        val = n.meta.get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) and val.is_floating_point() else None

    for out in outputs:
        for inp in inputs:
            if shape(out) is not None and shape(out) == shape(inp):
                return inp, out
    return None, (outputs[0] if outputs else None)


