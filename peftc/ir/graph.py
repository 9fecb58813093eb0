"""Small helpers every pass uses: module paths of nodes, tags, parameters on a GraphModule.

Node metadata written by peftc:
- `meta["module_path"]`: the dotted path of the innermost module the node came from
  (`model.layers.3.self_attn.q_proj`; `""` for the root), for both capture flavours.
- `meta["module_type"]`: that module's class, as `module.qualname` text.
- `meta["peftc"]`: on nodes a pass inserted, `{"pass": ..., "role": ..., **extra}`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "qualify",
    "module_path",
    "module_type",
    "tag",
    "tagged",
    "get_attr_path",
    "get_tensor",
    "set_tensor",
    "set_module",
    "clone",
    "freeze_parameters",
    "peftc_meta",
    "dim_names",
    "input_dim_names",
    "shape_text",
]


def qualify(*parts: str) -> str:
    """Dotted name from parts, skipping empty ones: `qualify("", "lora_A")` is `lora_A` (root
    sites)."""
    return ".".join(p for p in parts if p)


def module_path(node: fx.Node) -> str:
    return node.meta.get("module_path", "")


def module_type(node: fx.Node) -> str:
    return node.meta.get("module_type", "")


def tag(
    node: fx.Node, *, pass_name: str, role: str, path: str, type_name: str = "", **extra: Any
) -> fx.Node:
    """Mark `node` as inserted by `pass_name` for the module at `path`."""
    node.meta["module_path"] = path
    node.meta["module_type"] = type_name
    node.meta["peftc"] = {"pass": pass_name, "role": role, **extra}
    return node


def tagged(gm: fx.GraphModule, **match: Any) -> list[fx.Node]:
    """Nodes whose `meta["peftc"]` has every key/value in `match` (all tagged nodes if empty)."""
    return [
        n
        for n in gm.graph.nodes
        if "peftc" in n.meta and all(n.meta["peftc"].get(k) == v for k, v in match.items())
    ]


def get_attr_path(node: Any) -> str | None:
    """The qualified attribute name a `get_attr` node reads, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def get_tensor(gm: nn.Module, qualname: str) -> torch.Tensor:
    owner, _, name = qualname.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def set_tensor(
    gm: nn.Module,
    qualname: str,
    value: torch.Tensor,
    *,
    buffer: bool = False,
    persistent: bool = True,
) -> None:
    """Register a parameter (or buffer) at `qualname`, creating empty parent modules as needed."""
    owner, name = _owner(gm, qualname)
    for registry in (owner._parameters, owner._buffers):
        registry.pop(name, None)
    if buffer:
        owner.register_buffer(name, value, persistent=persistent)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:
        setattr(owner, name, value)


def set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    """Register `module` at `qualname`, creating empty parent modules as needed."""
    owner, name = _owner(gm, qualname)
    owner.add_module(name, module)


def _owner(gm: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """The module holding `qualname` (made, with its parents, where missing) and its last name."""
    owner_path, _, name = qualname.rpartition(".")
    owner = gm
    for part in owner_path.split(".") if owner_path else ():
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    return owner, name


def freeze_parameters(gm: nn.Module, keep: set[str] = frozenset()) -> list[str]:
    """Freeze every trainable parameter not named in `keep`; returns the names frozen.

    Each is replaced by a new frozen `nn.Parameter` over the same storage (tied weights stay
    tied), so the model the graph was captured from keeps its own `requires_grad` flags.
    """
    replacements: dict[int, nn.Parameter] = {}
    frozen = []
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        if p.requires_grad and name not in keep:
            if id(p) not in replacements:
                replacements[id(p)] = nn.Parameter(p.data, requires_grad=False)
            set_tensor(gm, name, replacements[id(p)])
            frozen.append(name)
    return frozen


def clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graph and module tree that shares every tensor with `gm`.

    Passes replace tensors instead of mutating them, so the copy can be rewritten
    without touching `gm` and without doubling the memory of the weights.
    """
    tensors = itertools.chain(
        gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False)
    )
    memo = {id(t): t for _, t in tensors}
    # merged adapters' weights and the originals merge keeps live in the record, not the module
    memo.update({id(t): t for t in _tensors_in(gm.meta.get("peftc", {}))})
    # torch's own TreeSpec deprecation, raised while copying the codegen
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
        return copy.deepcopy(gm, memo)


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors_in(getattr(value, f.name))


def peftc_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """peftc's per-module record (capture info, pass history), created on first use."""
    return gm.meta.setdefault("peftc", {})


def add_input(graph: fx.Graph, name: str, *, pass_name: str, role: str) -> fx.Node:
    """A new graph input `name` after the existing ones; a captured graph's signature gains it
    too."""
    import torch.utils._pytree as pytree
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(placeholders[-1].next if placeholders else next(iter(graph.nodes))):
        node = tag(graph.placeholder(name), pass_name=pass_name, role=role, path="")
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        names = [*codegen.pytree_info.orig_args, name]
        _, in_spec = pytree.tree_flatten((tuple(range(len(names))), {}))
        codegen.pytree_info = _PyTreeInfo(names, in_spec, codegen.pytree_info.out_spec)
    return node


def dim_names(inputs: list[tuple[str, list[str]]]) -> dict[str, str]:
    """Names for export's dimension symbols (`s72`), from the user inputs' (name, dims) in order:
    the first dim of every input is `batch` (one batch for all), the second `sequence` for the token
    ids (or the first input), else `<input>_length`. Fixed dims (digits) are left alone."""
    first = next((i for i in inputs if i[0] == "input_ids"), inputs[0] if inputs else None)
    names: dict[str, str] = {}
    for name, dims in ([first] if first else []) + inputs:
        if dims and not dims[0].isdigit():
            names.setdefault(dims[0], "batch")
        if len(dims) >= 2 and not dims[1].isdigit():
            names.setdefault(dims[1], "sequence" if name == first[0] else f"{name}_length")
    return names


def shape_text(shape: Any, dims: dict[str, str] | None = None) -> str:
    """`batch, sequence, 64`: a shape with export's symbols (`s72`, `s53 + 4`) named by `dims` where
    given."""
    text = ", ".join(str(s) for s in shape)
    return re.sub(r"\bs\d+\b", lambda m: dims.get(m.group(), m.group()), text) if dims else text


def input_dim_names(gm: fx.GraphModule) -> dict[str, str]:
    """`dim_names` of a captured graph's placeholders."""
    inputs = [
        (str(n.target), [str(d) for d in n.meta["val"].shape])
        for n in gm.graph.nodes
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    return dim_names(inputs)
