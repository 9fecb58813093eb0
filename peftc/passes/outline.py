"""Outlining: each repeated block of a graph becomes a submodule the graph calls, and back.

    x = layer0_ops(x); x = layer1_ops(x)   ->   x = call_module("model.layers.0", x); ...

A captured graph reads every weight through `get_attr`, so module hooks never fire inside it:
FSDP2's `fully_shard` on a block would never gather it. After `outline`, each block
(`regions.block_sites`: the children of a model's outermost ModuleLists) is an `fx.GraphModule` at
its own module path, owning its tensors under the same names (state_dict unchanged), called once per
forward: FSDP2 gathers one block at a time, and activation checkpointing or pipeline stages can take
blocks as units too.

1. A block is the nodes under its module path, with the tensors it alone reads; values from outside
   (the residual stream, masks, rotary angles) become its inputs, values read outside its outputs.
   A block whose nodes are not one convex region of the graph is refused by name.
2. `checkpoint=true` also recomputes each block's activations in backward instead of keeping them
   (`torch.utils.checkpoint`, non-reentrant; dropout masks replayed): the graph calls
   `checkpointed(block, *inputs)`, so under FSDP2 the block is gathered for its forward and again
   for its backward, where the recomputation runs.
3. Outlining is the last rewrite: adapters cannot be added, switched or merged on an outlined graph
   (the technique layer refuses, naming `outline`); `inline` puts the nodes back, exactly.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass

from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from peftc.errors import PassError
from peftc.ir.graph import module_path, peftc_meta, tag
from peftc.ir.options import Options, option
from peftc.ir.registry import PassResult, register_pass
from peftc.sites.regions import block_sites

__all__ = ["OutlineOptions", "outline", "inline", "blocks"]


@dataclass(frozen=True)
class OutlineOptions(Options):
    targets: str | None = option(
        None, doc="which blocks, by module path (e.g. `model.layers.*`); None: every block"
    )
    checkpoint: bool = option(
        False, doc="recompute each block's activations in backward instead of keeping them"
    )


def checkpointed(block: nn.Module, *inputs):
    """Run `block` keeping only its inputs for backward, where it runs again (activation
    checkpointing)."""
    return checkpoint(block, *inputs, use_reentrant=False)


def _calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        n
        for n in gm.graph.nodes
        if n.op in ("call_module", "call_function")
        and n.meta.get("peftc", {}).get("role") == "block"
        and n.meta["peftc"].get("pass") == "outline"
    ]


def blocks(gm: fx.GraphModule) -> list[str]:
    """Module paths of the outlined blocks, in call order."""
    return [module_path(n) for n in _calls(gm)]


@register_pass("outline", options=OutlineOptions, preserves_outputs=True)
def outline(gm: fx.GraphModule, options: OutlineOptions) -> PassResult:
    """Make each repeated block a submodule call (for FSDP2 per-block sharding, checkpointing).

    Apply it last; `inline` undoes it. `targets` picks blocks by module path (default: every block);
    `checkpoint=true` recomputes each block's activations in backward instead of keeping them.
    """
    lowered = peftc_meta(gm).get("lowered")
    if lowered is not None:
        raise PassError(
            f"outline: this graph is already lowered by {lowered['backend']!r}; outline a graph "
            "once ('triton' and 'outline' do not combine yet)"
        )
    sites = block_sites(gm, options.targets)
    if not sites:
        return PassResult(
            gm, modified=False, report="no repeated blocks (children of a ModuleList) in this graph"
        )
    paths = [site.path for site in sites]
    for path in paths:
        _outline_block(gm, path, options.checkpoint)
    _reorder(gm.graph)
    gm.graph.lint()
    gm.recompile()
    peftc_meta(gm)["lowered"] = {"backend": "outline", "sites": paths}
    return PassResult(
        gm,
        modified=True,
        sites=tuple(paths),
        report=f"outlined {len(paths)} blocks"
        + (", each recomputed in backward (checkpoint=true)" if options.checkpoint else ""),
    )


@register_pass("inline", preserves_outputs=True)
def inline(gm: fx.GraphModule) -> PassResult:
    """Put the nodes of outlined blocks back into the graph (undoes `outline`)."""
    calls = _calls(gm)
    if not calls:
        return PassResult(gm, modified=False, report="no outlined blocks in this graph")
    for call in calls:
        _inline_block(gm, call)
    gm.graph.lint()
    gm.recompile()
    peftc_meta(gm).pop("lowered", None)
    return PassResult(
        gm,
        modified=True,
        sites=tuple(module_path(c) for c in calls),
        report=f"inlined {len(calls)} blocks",
    )


def _within(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _outline_block(gm: fx.GraphModule, path: str, recompute: bool) -> None:
    members = _block_members(gm.graph, path)
    inside = set(members)
    inputs = list(dict.fromkeys(a for n in members for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    _install_block(gm, path, _block_graph(members, inputs, outputs, path))
    results = _call_block(gm, path, members[0], inputs, outputs, recompute)
    for output, result in zip(outputs, results, strict=True):
        output.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
    for n in reversed(members):
        gm.graph.erase_node(n)


def _block_members(graph: fx.Graph, path: str) -> list[fx.Node]:
    """The nodes computed under `path`, and the tensors only they read, in graph order."""
    compute = [
        n
        for n in graph.nodes
        if n.op not in ("placeholder", "output", "get_attr") and _within(module_path(n), path)
    ]
    computing = set(compute)
    # a tensor moves into the block when the block alone reads it and it lives under its path
    tensors = {
        n
        for n in graph.nodes
        if n.op == "get_attr"
        and _within(str(n.target), path)
        and n.users
        and all(u in computing for u in n.users)
    }
    members = [n for n in graph.nodes if n in computing or n in tensors]
    for n in compute:
        if n.op == "call_module" and not _within(str(n.target), path):
            raise PassError(
                f"outline: {path!r} calls module {n.target!r}, which lives outside the block"
            )
    _check_convex(graph, set(members), path)
    return members


def _block_graph(
    members: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], path: str
) -> fx.Graph:
    """The block's own graph: `inputs` become placeholders, targets lose the `path.` prefix."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for value in inputs:
        env[value] = sub.placeholder(value.name)
        env[value].meta.update(_shape_meta(value))
    for n in members:
        env[n] = sub.node_copy(n, lambda a: env[a])
        if n.op in ("get_attr", "call_module"):
            env[n].target = str(n.target)[len(path) + 1 :]
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return sub


def _install_block(gm: fx.GraphModule, path: str, sub: fx.Graph) -> None:
    """The module at `path` becomes a GraphModule running `sub`."""
    container = gm.get_submodule(path)
    block = fx.GraphModule(container, sub, class_name="OutlinedBlock")
    # the same children and tensors as the module it replaces: names, ties and state_dict unchanged
    block._modules = container._modules
    block._parameters, block._buffers = container._parameters, container._buffers
    block._non_persistent_buffers_set = container._non_persistent_buffers_set
    block.train(container.training)
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent), name, block)


def _call_block(
    gm: fx.GraphModule,
    path: str,
    first: fx.Node,
    inputs: list[fx.Node],
    outputs: list[fx.Node],
    recompute: bool,
) -> list[fx.Node]:
    """The call of the block (checkpointed when `recompute`) before `first`, and one node per
    output."""
    graph = gm.graph
    with graph.inserting_before(first):
        if recompute:
            module = tag(graph.get_attr(path), pass_name="outline", role="block_module", path=path)
            call = graph.call_function(checkpointed, (module, *inputs))
        else:
            call = graph.call_module(path, tuple(inputs))
        type_name = peftc_meta(gm).get("module_types", {}).get(path, "")
        tag(call, pass_name="outline", role="block", path=path, type_name=type_name)
        if len(outputs) == 1:
            call.meta["val"] = outputs[0].meta.get("val")
            return [call]
        call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for output, result in zip(outputs, results, strict=True):
        result.meta.update(_shape_meta(output))
        tag(result, pass_name="outline", role="block_output", path=path)
    return results


def _shape_meta(n: fx.Node) -> dict:
    return {k: v for k, v in n.meta.items() if k in ("val", "tensor_meta")}


def _reorder(graph: fx.Graph) -> None:
    """Topological order that keeps the old order wherever it already is one (a block's call goes
    where its last input is ready), so nothing is computed earlier than it was."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    waiting = {n: len(n.all_input_nodes) for n in graph.nodes}
    ready = [(index[n], n) for n in graph.nodes if not waiting[n]]
    heapq.heapify(ready)
    while ready:
        _, n = heapq.heappop(ready)
        graph._root.prepend(n)  # to the end of the node list
        for user in n.users:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (index[user], user))


def _check_convex(graph: fx.Graph, inside: set[fx.Node], path: str) -> None:
    """No path leaves the block and comes back: else one call could not compute it."""
    downstream: set[fx.Node] = set()
    for n in graph.nodes:
        feeds = [a for a in n.all_input_nodes if a in inside or a in downstream]
        if n in inside:
            back = [a for a in n.all_input_nodes if a in downstream]
            if back:
                raise PassError(
                    f"outline: {path!r} is not one region: {n.name} reads {back[0].name}, which is "
                    "computed outside the block from the block's own values; pass targets=... to "
                    "leave it out"
                )
        elif feeds:
            downstream.add(n)


def _inline_block(gm: fx.GraphModule, call: fx.Node) -> None:
    path = module_path(call)
    block = gm.get_submodule(path)
    graph = gm.graph
    placeholders = [n for n in block.graph.nodes if n.op == "placeholder"]
    module = call.args[0] if call.op == "call_function" else None  # checkpointed(block, *inputs)
    env = dict(zip(placeholders, call.args[1:] if module is not None else call.args, strict=True))
    with graph.inserting_before(call):
        for n in block.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                results = n.args[0]
                break
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op in ("get_attr", "call_module"):
                env[n].target = f"{path}.{n.target}"
    if isinstance(results, (tuple, list)):
        for user in list(call.users):
            user.replace_all_uses_with(env[results[user.args[1]]])
            graph.erase_node(user)
    else:
        call.replace_all_uses_with(env[results])
    graph.erase_node(call)
    if module is not None:
        graph.erase_node(module)
    container = nn.Module()
    container._modules, container._parameters, container._buffers = (
        block._modules,
        block._parameters,
        block._buffers,
    )
    container._non_persistent_buffers_set = block._non_persistent_buffers_set
    container.train(block.training)
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent), name, container)
