"""Module sites: a whole submodule of the captured model, as peft's `modules_to_save` wraps one.

A module site is every graph node that reads the module's tensors (`get_attr` of `<path>.<name>`,
exported graphs) or calls it or a submodule of it (`call_module`, symbolically traced graphs), as
captured: a read a technique retargeted is found at the module it read when captured. `node` is the
first of them in graph order. Nodes a technique inserted are never readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from peftc.ir.graph import module_path
from peftc.ir.targets import select

__all__ = ["ModuleSite", "module_sites", "captured_target"]


@dataclass(frozen=True)
class ModuleSite:
    kind: ClassVar[str] = "module"
    path: str
    node: fx.Node
    # (node, the name it reads inside the module, the users reading it for this module; None: all)
    readers: tuple[tuple[fx.Node, str, tuple[fx.Node, ...] | None], ...]


def captured_target(node: fx.Node) -> str:
    """The attribute or module a `get_attr` / `call_module` node read when captured."""
    return str(node.meta.get("peftc_original", {}).get("target", node.target))


def module_sites(gm: fx.GraphModule, targets: str | None = None) -> list[ModuleSite]:
    """Every module whose tensors the graph reads, in the order of its first read.

    Export keeps one name for tied tensors (GPT-2's wte and lm_head both read `lm_head.weight`): a
    read belongs to each module holding the tensor under some name, for the users inside it."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers()]:
        names.setdefault(id(tensor), []).append(name)
    readers: dict[str, dict[fx.Node, tuple[str, tuple[fx.Node, ...] | None]]] = {}
    for n in gm.graph.nodes:
        if n.op not in ("get_attr", "call_module") or "adapter" in n.meta.get("peftc", {}):
            continue
        target = captured_target(n)
        aliases = [target]
        if n.op == "get_attr":
            owner, _, leaf = target.rpartition(".")
            tensor = getattr(gm.get_submodule(owner), leaf, None)
            aliases += [a for a in names.get(id(tensor), []) if a != target]
        for alias in aliases:
            parts = alias.split(".")
            # a tensor belongs to its owners; a called module to itself and its owners
            for depth in range(1, len(parts) + (n.op == "call_module")):
                path = ".".join(parts[:depth])
                users = _users_inside(n, path) if alias != target else None
                if users != ():
                    readers.setdefault(path, {}).setdefault(n, (".".join(parts[depth:]), users))
    sites = [
        ModuleSite(path, next(iter(found)), tuple((n, *r) for n, r in found.items()))
        for path, found in readers.items()
    ]
    chosen = set(select(targets, [s.path for s in sites], what="module"))
    return [s for s in sites if s.path in chosen]


def _users_inside(node: fx.Node, path: str) -> tuple[fx.Node, ...]:
    return tuple(
        u for u in node.users if module_path(u) == path or module_path(u).startswith(path + ".")
    )
