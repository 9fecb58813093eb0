"""Rewrites that stay undoable, and queries that see the graph as it was captured.

Two records, both naming nodes by their captured *name* (node metadata is shallow-copied when a
graph is cloned, so a reference would point into the other graph):

1. `meta["peftc"]["exit"] = E` on a node a rewrite put in place of the captured value named E: E's
   users were rerouted to it (`"partial": True` when only some of them were). Stripping the rewrite
   gives those users back the value its nodes consumed in E's place.
2. `meta["peftc_original"]` on a captured node whose op or arguments a rewrite changed: the op,
   target, args and kwargs it was captured with, with the name of the rewrite's site.

`captured_name(node)` is the captured value a node stands for; a `Resolver` maps a captured name
to the node that carries that value now: the latest full reroute of it, else the node itself.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import fx

__all__ = [
    "captured_name",
    "Resolver",
    "keep_original",
    "original_call",
    "restore_original",
    "consumed",
    "as_captured",
]

_NODE, _ATTR = "__node__", "__attr__"


def captured_name(node: fx.Node) -> str:
    """The name of the captured value `node` carries: what it was put in place of, else its own."""
    return node.meta.get("peftc", {}).get("exit", node.name)


class Resolver:
    """Captured name -> the node that carries that value now, leaving out the nodes in `skip`."""

    def __init__(self, graph: fx.Graph, skip: Collection[fx.Node] = ()):
        self.graph = graph
        self.nodes = {n.name: n for n in graph.nodes}
        self.exits: dict[str, fx.Node] = {}
        for n in graph.nodes:  # in graph order: the last (most downstream) reroute of a value wins
            tag = n.meta.get("peftc", {})
            if "exit" in tag and not tag.get("partial") and n not in skip:
                self.exits[tag["exit"]] = n

    def __call__(self, name: str) -> fx.Node:
        return self.exits.get(name) or self.nodes[name]

    def attr(self, target: str) -> fx.Node:
        """A `get_attr` node reading `target`; made again if dead-code elimination took the captured
        one."""
        found = next((n for n in self.graph.find_nodes(op="get_attr", target=target)), None)
        if found is None:
            inputs = list(self.graph.find_nodes(op="placeholder"))
            at = inputs[-1].next if inputs else next(iter(self.graph.nodes))
            with self.graph.inserting_before(at):
                found = self.graph.get_attr(target)
        return found


def keep_original(node: fx.Node, **record: Any) -> dict[str, Any]:
    """Record `node`'s captured call (once: a node rewritten twice keeps the first); returns the
    record."""
    if "peftc_original" not in node.meta:

        def encode(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a
            return (_ATTR, a.target) if a.op == "get_attr" else (_NODE, captured_name(a))

        node.meta["peftc_original"] = {
            "op": node.op,
            "target": node.target,
            "args": [fx.node.map_aggregate(a, encode) for a in node.args],
            "kwargs": {k: fx.node.map_aggregate(v, encode) for k, v in node.kwargs.items()},
            **record,
        }
    return node.meta["peftc_original"]


def original_call(node: fx.Node, resolve: Resolver) -> tuple[str, Any, tuple, dict[str, Any]]:
    """(op, target, args, kwargs) `node` was captured with, its node arguments as they are carried
    now."""
    original = node.meta["peftc_original"]

    def decode(a: Any) -> Any:
        if _is_ref(a):
            return resolve(a[1]) if a[0] == _NODE else resolve.attr(a[1])
        return a

    args = tuple(_map(a, decode) for a in original["args"])
    return (
        original["op"],
        original["target"],
        args,
        {k: _map(v, decode) for k, v in original["kwargs"].items()},
    )


class _Captured:
    def __init__(self, node: fx.Node, resolve: Resolver):
        self.op, self.target, self.args, self.kwargs = original_call(node, resolve)
        self.name, self.meta, self.graph, self.users = node.name, node.meta, node.graph, node.users


def as_captured(node: fx.Node, resolve: Resolver) -> Any:
    """`node` as queries should read it: a rewritten node as it was captured (arguments as carried
    now)."""
    return _Captured(node, resolve) if "peftc_original" in node.meta else node


def restore_original(node: fx.Node, resolve: Resolver) -> None:
    """Put `node` back to its captured call and drop the record."""
    node.op, node.target, node.args, node.kwargs = original_call(node, resolve)
    del node.meta["peftc_original"]


def consumed(exit_node: fx.Node, removed: Collection[fx.Node], resolve: Resolver) -> fx.Node:
    """What `exit_node`'s users get back when the nodes `removed` (among them `exit_node`) go: the
    value those nodes read in place of the captured value it stands for (the latest, if several),
    else that captured value as it is carried now."""
    name = exit_node.meta["peftc"]["exit"]
    found, seen, todo = [], {exit_node}, [exit_node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in removed:
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
            elif captured_name(a) == name:
                found.append(a)
    if len(found) > 1:
        order = {n: i for i, n in enumerate(exit_node.graph.nodes)}
        return max(found, key=order.__getitem__)
    return found[0] if found else resolve(name)


def _is_ref(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and value[0] in (_NODE, _ATTR)


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, tuple) and not _is_ref(value):
        return tuple(_map(v, fn) for v in value)
    return fn(value)
