"""Adapters on a graph: inserting tagged branches, and switching, deleting, merging them.

An adapter technique (LoRA, LoHa, LoKr) registers a `Technique`: how to insert its branch at
a site from parameters already on the module, and how to compute its dense update dW.
Every inserted node carries `meta["peftc"] = {"pass", "role", "adapter"}`; the node with role
`"output"` is `add(base_output, branch)`, so a branch is removed by rerouting that node's
users to its first argument and erasing the adapter's nodes.

The record of adapters lives in `gm.meta["peftc"]["adapters"]`:
`{name: {"technique", "options", "sites", "active", "merged"}}`; the graph holds exactly
the branches of the active, unmerged adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError, PassError, suggest
from peftc.graph import get_tensor, peftc_meta, qualify, set_tensor, tag
from peftc.quant.nf4 import dequantize_nf4
from peftc.sites import EmbeddingSite, LinearSite, embedding_sites, linear_sites, lm_head, nf4_state
from peftc.targets import select

__all__ = [
    "Technique",
    "register_technique",
    "BranchBuilder",
    "adapters",
    "active_adapters",
    "set_active",
    "disable",
    "delete",
    "site_for",
    "default_targets",
]

Site = LinearSite | EmbeddingSite


@dataclass(frozen=True)
class Technique:
    """How one adapter technique lives in a graph.

    - `insert(gm, site, adapter, options)` adds the branch from parameters already registered;
    - `param_names(gm, site, adapter, options)` lists those parameters' qualified names;
    - `merge(gm, site, adapter, options, W) -> (W', state)` folds the update into the base weight
      W (in (out, in) layout; (num, dim) for embeddings), and `unmerge(..., W', state) -> W` undoes it.
    """

    name: str
    insert: Callable[[fx.GraphModule, Site, str, Any], None]
    param_names: Callable[[fx.GraphModule, Site, str, Any], list[str]]
    merge: Callable[[fx.GraphModule, Site, str, Any, torch.Tensor], tuple[torch.Tensor, Any]]
    unmerge: Callable[[fx.GraphModule, Site, str, Any, torch.Tensor, Any], torch.Tensor]


_TECHNIQUES: dict[str, Technique] = {}


def additive_technique(name: str, insert: Callable, param_names: Callable, delta: Callable) -> Technique:
    """A technique whose merge is `W + dW` with `dW = delta(gm, site, adapter, options)`."""
    return Technique(
        name, insert, param_names,
        merge=lambda gm, site, adapter, options, W: (W + delta(gm, site, adapter, options), None),
        unmerge=lambda gm, site, adapter, options, W, state: W - delta(gm, site, adapter, options),
    )


def check_new_adapter(gm: fx.GraphModule, name: str, pass_name: str) -> None:
    if name in adapters(gm):
        raise OptionError(f"{pass_name}: an adapter named {name!r} exists; pass adapter=\"other\" or delete it first")


def register_technique(technique: Technique) -> Technique:
    _TECHNIQUES[technique.name] = technique
    return technique


def technique(name: str) -> Technique:
    return _TECHNIQUES[name]


class BranchBuilder:
    """Appends nodes after `anchor`, each tagged with the pass, role, adapter and module path."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, *, pass_name: str, adapter: str, path: str):
        self.gm, self.cursor = gm, anchor
        self.pass_name, self.adapter, self.path = pass_name, adapter, path
        self.nodes: list[fx.Node] = []

    def _place(self, make: Callable[[], fx.Node], role: str) -> fx.Node:
        with self.gm.graph.inserting_after(self.cursor):
            node = make()
        tag(node, pass_name=self.pass_name, role=role, path=self.path, adapter=self.adapter)
        self.cursor = node
        self.nodes.append(node)
        return node

    def get(self, qualname: str, role: str) -> fx.Node:
        return self._place(lambda: self.gm.graph.get_attr(qualname), role)

    def call(self, target: Any, *args: Any, role: str, **kwargs: Any) -> fx.Node:
        return self._place(lambda: self.gm.graph.call_function(target, args, kwargs), role)

    def module(self, qualname: str, *args: Any, role: str) -> fx.Node:
        return self._place(lambda: self.gm.graph.call_module(qualname, args), role)

    def finish(self, base: fx.Node, branch: fx.Node) -> fx.Node:
        """`base -> add(base, branch)` for every user of `base` outside this branch."""
        out = self.call(torch.ops.aten.add.Tensor, base, branch, role="output")
        inside = set(self.nodes)
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
        return out


def new_parameter(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    set_tensor(gm, qualname, nn.Parameter(value))


def adapters(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    return peftc_meta(gm).setdefault("adapters", {})


def active_adapters(gm: fx.GraphModule) -> list[str]:
    return [name for name, record in adapters(gm).items() if record["active"]]


def site_for(gm: fx.GraphModule, path: str, kind: str) -> Site:
    finder = embedding_sites if kind == "embedding" else linear_sites
    found = [s for s in finder(gm) if s.path == path]
    if len(found) != 1:
        raise PassError(f"expected one {kind} site at {path!r}, found {len(found)}; was the base op rewritten?")
    return found[0]


def remove_branches(gm: fx.GraphModule, name: str) -> None:
    nodes = [n for n in gm.graph.nodes if n.meta.get("peftc", {}).get("adapter") == name]
    for node in nodes:
        if node.meta["peftc"]["role"] == "output":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def insert_branches(gm: fx.GraphModule, name: str) -> None:
    record = adapters(gm)[name]
    method = technique(record["technique"])
    for path, kind in record["sites"]:
        method.insert(gm, site_for(gm, path, kind), name, record["options"])


def _check_name(gm: fx.GraphModule, name: str) -> dict[str, Any]:
    known = adapters(gm)
    if name not in known:
        parts = [f"no adapter named {name!r}.", suggest(name, known), f"Adapters: {', '.join(known) or 'none'}"]
        raise OptionError(" ".join(p for p in parts if p))
    return known[name]


def set_active(gm: fx.GraphModule, names: str | Iterable[str]) -> fx.GraphModule:
    """Make exactly `names` active (in place): their branches are in the graph, no others."""
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        if _check_name(gm, name)["merged"]:
            raise OptionError(f"adapter {name!r} is merged into the base weights; unmerge it before switching")
    for name, record in adapters(gm).items():
        if record["active"] and name not in wanted and not record["merged"]:
            remove_branches(gm, name)
            record["active"] = False
    for name in wanted:
        record = adapters(gm)[name]
        if not record["active"]:
            insert_branches(gm, name)
            record["active"] = True
    gm.graph.lint()
    gm.recompile()
    return gm


def disable(gm: fx.GraphModule) -> fx.GraphModule:
    """No adapter active: the graph computes the base model exactly."""
    return set_active(gm, [])


def delete(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """Remove adapter `name`: its branches, parameters and record."""
    record = _check_name(gm, name)
    if record["active"] and not record["merged"]:
        remove_branches(gm, name)
    method = technique(record["technique"])
    for path, kind in record["sites"]:
        site = site_for(gm, path, kind)
        for qualname in method.param_names(gm, site, name, record["options"]):
            owner, _, attr = qualname.rpartition(".")
            module = gm.get_submodule(owner)
            module._parameters.pop(attr, None)
            module._buffers.pop(attr, None)
        dropouts = _maybe_module(gm, qualify(path, f"{record['technique']}_dropout"))
        if dropouts is not None and name in dropouts._modules:
            delattr(dropouts, name)
    del adapters(gm)[name]
    gm.recompile()
    return gm


def _maybe_module(gm: nn.Module, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


# peft's default target modules (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), by module class prefix.
_DEFAULT_TARGETS = {
    "llama": "*.q_proj|*.v_proj",
    "mistral": "*.q_proj|*.v_proj",
    "qwen2": "*.q_proj|*.v_proj",
    "opt": "*.q_proj|*.v_proj",
    "gpt2": "*.c_attn",
    "gpt_neox": "*.query_key_value",
    "bert": "*.query|*.value",
    "roberta": "*.query|*.value",
    "t5": "*.q|*.v",
}


def default_targets(gm: fx.GraphModule, pass_name: str) -> str:
    """peft's default targets for the captured architecture; `all-linear` for every linear but the head."""
    model_class = peftc_meta(gm).get("capture", {}).get("class", "")
    for family, pattern in _DEFAULT_TARGETS.items():
        if f".models.{family}." in model_class:
            return pattern
    raise OptionError(
        f"{pass_name}: no default targets for {model_class or 'this model'}; pass targets=\"...\" "
        "(a glob such as '*.q_proj|*.v_proj', a 're:' regex, or 'all-linear')"
    )


def resolve_sites(gm: fx.GraphModule, targets: str | None, pass_name: str, *, embeddings: bool = False) -> list[Site]:
    """The sites `targets` selects: linear sites, and embedding sites when the technique takes them."""
    if targets == "all-linear":
        head = _lm_head_path(gm)
        return [s for s in linear_sites(gm) if s.path != head]
    pattern = targets or default_targets(gm, pass_name)
    if not embeddings:
        return linear_sites(gm, pattern)
    candidates: list[Site] = [*linear_sites(gm), *embedding_sites(gm)]
    chosen = set(select(pattern, [s.path for s in candidates], what="linear or embedding site"))
    return [s for s in candidates if s.path in chosen]


def _lm_head_path(gm: fx.GraphModule) -> str | None:
    head = lm_head(gm)
    return head.path if head else None


def param_like(gm: fx.GraphModule, site: Site) -> dict[str, Any]:
    """dtype and device for a site's adapter weights: its output's dtype (NF4 weights are uint8)."""
    weight = get_tensor(gm, site.weight)
    val = site.node.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else weight.dtype
    return {"dtype": dtype, "device": weight.device}


def weight_of(gm: fx.GraphModule, site: Site) -> torch.Tensor:
    """The base weight in (out, in) layout (embeddings: (num, dim)); NF4 sites: a dequantized float32 copy."""
    if getattr(site, "kind", "") == "nf4":
        return dequantize_nf4(nf4_state(gm, site), torch.float32)
    weight = get_tensor(gm, site.weight)
    return weight.T if getattr(site, "fan_in_fan_out", False) else weight
