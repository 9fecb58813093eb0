"""`multi_lora` at parameter sites (LoRA's `target_parameters`): each row's adapter on the weights
of mixture-of-experts layers and routers.

    linear(x, W)                 ->  linear(x, W) + delta(x, ids, A_stack, B_stack)
    grouped_mm(x_sorted, W, offs) ->  grouped_mm(x_sorted, W, offs)
                                      + delta(x_sorted, row_ids, A_stack, B_stack)

1. A 2-D parameter read by `linear` is served as a linear site is: one A and B per adapter.
2. A 3-D expert stack read by transformers' grouped matmul (rows sorted by expert) holds one LoRA
   pair per adapter and expert: the stacks are (N * E, r_max, ...) and row i of the sorted input
   uses pair `adapter * E + expert`, where its expert is found from the offsets and its adapter
   from the token it came from (the `index` that gathered the sorted rows, followed back through
   the ops that keep rows, as transformers' experts compute it); -1 (the base) adds nothing.
   `peftc::expert_row_ids` (in `peftc.passes.multi_lora`) computes those pair indices.
3. Any other read of an adapted parameter is refused by name.
"""

from __future__ import annotations

import torch
from torch import fx

from peftc.errors import PassError
from peftc.ir.graph import tag
from peftc.sites.parameters import ParameterSite

__all__ = ["serve_parameter"]

aten = torch.ops.aten
# ops between a parameter and its matmul that only change its layout or dtype
_LAYOUT = (aten.transpose.int, aten.t.default, aten.to.dtype, aten._to_copy.default)
_LINEAR = aten.linear.default


def serve_parameter(
    gm: fx.GraphModule, site: ParameterSite, ids: fx.Node
) -> list[tuple[fx.Node, fx.Node, fx.Node | None]]:
    """Where `site`'s adapters are served: (matmul node, its input, row ids or None for
    per-batch-row ids) for each read of the parameter; the stacks are one LoRA pair per adapter
    and expert (`site.experts_in_out`)."""
    served = []
    for matmul, weight in _matmuls(site):
        x = matmul.args[0]
        if matmul.target is _LINEAR:
            served.append((matmul, x, None))
            continue
        if tuple(weight.meta["val"].shape) != site.experts_in_out:
            raise PassError(
                f"multi_lora: the grouped matmul {matmul.name!r} reads {site.path!r} as "
                f"{tuple(weight.meta['val'].shape)}, not (experts, in, out) as its adapters "
                "were made; serve one adapter at a time (merge it) instead"
            )
        source, token_index = _gathered_rows(matmul)
        with gm.graph.inserting_before(matmul):
            rows = gm.graph.call_function(
                torch.ops.peftc.expert_row_ids.default, (ids, source, token_index, matmul.args[2])
            )
        tag(rows, pass_name="multi_lora", role="expert_rows", path=site.path)
        served.append((matmul, x, rows))
    return served


def _matmuls(site: ParameterSite) -> list[tuple[fx.Node, fx.Node]]:
    """Each matmul reading the parameter (through layout ops), with the value it reads."""
    found, frontier = [], [site.node]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if user.target is aten._assert_tensor_metadata.default:
                continue  # a check of dtype and device; it computes nothing
            if user.target in _LAYOUT and user.args[0] is value:
                frontier.append(user)
            elif _reads_weight(user, value, len(site.shape)):
                found.append((user, value))
            else:
                raise PassError(
                    f"multi_lora: {site.path!r} is read by {user.name!r} ({user.target}), not by "
                    "a linear or transformers' grouped expert matmul; serve one adapter at a "
                    "time (merge it) instead"
                )
    return found


def _grouped_mm(node: fx.Node) -> bool:
    """transformers' grouped matmul of experts (rows sorted by expert)."""
    return "grouped_mm" in str(node.target)


def _reads_weight(node: fx.Node, value: fx.Node, dims: int) -> bool:
    grouped = _grouped_mm(node) and dims == 3
    return (node.target is _LINEAR and dims == 2 or grouped) and node.args[1] is value


def _gathered_rows(matmul: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(the (tokens, hidden) input, the token of each sorted row): the `index` that gathered the
    rows `matmul` multiplies, followed back through ops that keep its rows."""
    rows = matmul.args[0].meta["val"].shape[0]
    frontier, seen = [matmul.args[0]], set()
    while frontier:
        node = frontier.pop(0)
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.target is aten.index.Tensor and len(node.args[1]) == 1:
            return node.args[0], node.args[1][0]
        if _grouped_mm(node):
            frontier.append(node.args[0])
            continue
        frontier += [a for a in node.all_input_nodes if _rows(a) == rows]
    raise PassError(
        f"multi_lora: cannot tell which token each row of {matmul.name!r} is (no gather of the "
        "tokens before it); serve one adapter at a time (merge it) instead"
    )


def _rows(node: fx.Node) -> int | None:
    """The leading size of the node's value (of its first tensor, for ops returning several)."""
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)) and val:
        val = val[0]
    return val.shape[0] if isinstance(val, torch.Tensor) and val.dim() else None
