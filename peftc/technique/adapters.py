"""The technique layer's core: adapters on a graph, written once for every technique.

A technique (`peftc.technique.Technique`) declares its parameters, its stage and its rewrite;
this module inserts it, keeps the adapter record, switches, deletes, merges and unmerges.

How techniques compose at one site (documented in docs/concepts.md):

    y = O_k(...O_1(op(I_m(...I_1(x)), W_n(...W_1(W)), b))) + A_1(x) + ... + A_j(x)

1. `input` stages transform x, `weight` stages W (and b), `output` stages y, in adapter-name
   order within a stage; `add` stages read the site's own x and are summed last.
2. A site is always rebuilt whole from its active, unmerged adapters, so the graph depends only
   on which adapters are active and merged, never on the order they were added or switched.
3. Merging folds, from the site's original weight (kept at its first merge), every merged
   adapter in the order that keeps (1): weight stages, input stages (innermost last),
   output stages, then additive updates. A merged adapter must lie inside every active
   unmerged one at the site (an `add` adapter cannot be merged under an active `output` scale):
   otherwise merge, unmerge and set_adapter raise, naming both adapters.

Every node a technique adds carries `meta["peftc"] = {"pass", "role", "adapter", "site"}`. The
record lives in `gm.meta["peftc"]["adapters"]` as `Adapter` objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError, PassError, suggest
from peftc.ir.graph import freeze_parameters, get_tensor, peftc_meta, qualify, set_tensor
from peftc.ir.registry import PassResult, register_pass
from peftc.sites.formats import format_of
from peftc.sites.selection import sites_of
from peftc.sites.weight import WeightSite, decode_original, encode_original
from peftc.technique.declaration import STAGES, Builder, Context, Technique

__all__ = [
    "Adapter",
    "register_technique",
    "technique",
    "techniques",
    "adapters",
    "active_adapters",
    "set_active",
    "disable",
    "delete",
    "merge_adapters",
    "unmerge_adapters",
    "adapter_tensors",
]

aten = torch.ops.aten


@dataclass
class Adapter:
    """One adapter: its technique, options, sites and tensors; whether it is active and merged."""

    name: str
    technique: str
    options: Any
    sites: tuple[tuple[str, str], ...]  # (path, site kind)
    names: dict[str, dict[str, str]]  # site path ("" for shared tensors) -> attr -> qualified name
    modules: tuple[str, ...] = ()
    active: bool = True
    merged: bool = False
    kept: dict[str, torch.Tensor] | None = None  # the tensors, while merged
    stages: dict[str, str] = field(default_factory=dict)  # site path -> stage

    @property
    def param_names(self) -> list[str]:
        return [q for names in self.names.values() for q in names.values()]

    def method(self) -> Technique:
        return technique(self.technique)


_TECHNIQUES: dict[str, Technique] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Register a technique and the pass of the same name that adds it (`lora(...)`, `ia3(...)`)."""
    method = cls()
    _TECHNIQUES[cls.name] = method

    def run(gm: fx.GraphModule, options: Any) -> PassResult:
        return add_adapter(gm, method, options)

    run.__doc__ = cls.__doc__
    run.__name__ = cls.name
    register_pass(cls.name, options=cls.options, preserves_outputs=cls.preserves_outputs)(run)
    return cls


def technique(name: str) -> Technique:
    try:
        return _TECHNIQUES[name]
    except KeyError:
        raise OptionError(f"no technique named {name!r}; registered: {', '.join(sorted(_TECHNIQUES))}") from None


def techniques() -> dict[str, Technique]:
    return dict(_TECHNIQUES)


def adapters(gm: fx.GraphModule) -> dict[str, Adapter]:
    return peftc_meta(gm).setdefault("adapters", {})


def active_adapters(gm: fx.GraphModule) -> list[str]:
    return [name for name, record in adapters(gm).items() if record.active and not record.merged]


# --- inserting ------------------------------------------------------------------------------

def add_adapter(gm: fx.GraphModule, method: Technique, options: Any) -> PassResult:
    """The pass every technique gets: create its tensors at the selected sites and rebuild them."""
    _check_not_lowered(gm)
    if options.adapter in adapters(gm):
        raise OptionError(f"{method.name}: an adapter named {options.adapter!r} exists; pass adapter=\"other\" or delete it first")
    placed = method.select(gm, options)
    sites = [site for site, _ in placed]
    for site in sites:
        method.check(gm, site, options)
    record = Adapter(options.adapter, method.name, options, tuple((s.path, s.kind) for s in sites), {},
                     stages={s.path: method.stage_at(s, options) for s in sites})
    _check_nesting(gm, record.sites, extra=[record])  # before anything changes
    if options.freeze_base:
        freeze_parameters(gm, keep={q for record in adapters(gm).values() for q in record.param_names})
    shared = method.shared_params(gm, sites, options)
    if shared:
        record.names[""] = _create(gm, "", shared, options.adapter, _dtype(gm, sites[0]), _device(gm, sites[0]))
    modules = []
    for site, prefix in placed:
        ctx = Context(gm, site, options, dict(record.names.get("", {})))
        made = _create(gm, prefix, method.params(ctx), options.adapter, _dtype(gm, site), _device(gm, site))
        record.names[site.path] = made
        for attr, module in method.modules(site, options).items():
            qualname = qualify(site.path, attr, options.adapter)
            gm.add_submodule(qualname, module)
            modules.append(qualname)
    record.modules = tuple(modules)
    serving = "multi_lora" in peftc_meta(gm)
    record.active = not serving  # a stacked graph serves it per row after the next multi_lora, never on every row
    adapters(gm)[options.adapter] = record
    rebuild(gm, record.sites)
    method.after_insert(gm, sites, options)
    report = method.describe(options, sites)
    if serving:
        report += "; inactive: this graph serves stacked adapters, apply 'multi_lora' again to serve it"
    return PassResult(gm, modified=True, sites=tuple(s.path for s in sites), report=report)


def _device(gm: fx.GraphModule, site: Any) -> torch.device:
    if isinstance(site, WeightSite):
        return get_tensor(gm, site.weight).device
    val = site.node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else torch.device("cpu")


def _dtype(gm: fx.GraphModule, site: Any) -> torch.dtype:
    """The dtype adapter tensors at `site` take: the weight format's compute dtype, else the site's values'."""
    if isinstance(site, WeightSite):
        return format_of(site).compute_dtype(gm, site)
    val = site.node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else torch.float32


def _current_sites(gm: fx.GraphModule, refs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    wanted = set(refs)
    return {(s.path, s.kind): s for s in sites_of(gm, tuple({kind for _, kind in wanted})) if (s.path, s.kind) in wanted}


def _create(gm: fx.GraphModule, path: str, params: list, adapter: str, dtype: torch.dtype, device: torch.device) -> dict[str, str]:
    names = {}
    for param in params:
        qualname = qualify(path, param.attr, adapter, param.suffix)
        tensor = param.make(dtype, device)
        set_tensor(gm, qualname, tensor, buffer=not isinstance(tensor, nn.Parameter))
        names[param.key or param.attr] = qualname
    return names


# --- rebuilding sites -----------------------------------------------------------------------

def rebuild(gm: fx.GraphModule, refs: Iterable[tuple[str, str]]) -> None:
    """Strip the sites `refs` of every technique node, then insert their active, unmerged adapters."""
    _check_not_lowered(gm)
    refs = list(dict.fromkeys(refs))
    strip(gm, refs)
    compose(gm, refs)


def _check_not_serving(gm: fx.GraphModule) -> None:
    if "multi_lora" in peftc_meta(gm):
        raise PassError("this graph serves stacked adapters (multi_lora): every row picks its adapter with adapter_ids, "
                        "so switching or merging branches would add them to every row; do that on the graph before "
                        "'multi_lora'")


def _check_not_lowered(gm: fx.GraphModule) -> None:
    if "lowered" in peftc_meta(gm):
        backend = peftc_meta(gm)["lowered"]["backend"]
        if backend == "outline":
            raise PassError("this graph's blocks are outlined into submodules ('outline'), so adapters cannot be added, "
                            "switched, merged or deleted here; run 'inline' first, or do that before 'outline' "
                            "(apply it last)")
        raise PassError(f"this graph was lowered by {backend!r}: its sites are fused kernels now, so adapters cannot be "
                        f"added, switched, merged or deleted; do that on the graph before {backend!r} (apply it last)")


def strip(gm: fx.GraphModule, refs: list[tuple[str, str]]) -> None:
    """Remove every technique node at the sites `refs`, restoring their base ops."""
    paths = {path for path, _ in refs}
    by_site: dict[str, list[fx.Node]] = {}
    bases: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        site = n.meta.get("peftc", {}).get("site")
        if site in paths:
            by_site.setdefault(site, []).append(n)
        original = n.meta.get("peftc_original")
        if original is not None and original["site"] in paths:
            bases[original["site"]] = n
    names = {n.name: n for n in gm.graph.nodes}
    for path in paths:
        _strip(gm, by_site.get(path, []), bases.get(path), names)


def compose(gm: fx.GraphModule, refs: list[tuple[str, str]]) -> None:
    """Insert the active, unmerged adapters at the (stripped) sites `refs`."""
    found = _current_sites(gm, refs)
    # Composing a site replaces its output, which a later site may read (chained linears): find inputs by position.
    positions = {ref: s.node.args.index(s.input) for ref, s in found.items() if s.input in s.node.args}
    active = [r for r in adapters(gm).values() if r.active and not r.merged]
    for ref in refs:
        if ref not in found:
            raise PassError(f"expected a {ref[1]} site at {ref[0]!r}, found none; was the base op rewritten?")
        here = [r for r in active if ref in r.sites]
        if here:
            site = found[ref]
            if ref in positions and site.node.args[positions[ref]] is not site.input:
                site = replace(site, input=site.node.args[positions[ref]])
            _compose(gm, site, here)


def _strip(gm: fx.GraphModule, nodes: list[fx.Node], base: fx.Node | None, names: dict[str, fx.Node]) -> None:
    entry = next((n for n in nodes if n.meta["peftc"]["role"] == "input_entry"), None)
    if base is not None:
        original = base.meta.pop("peftc_original")
        live_x = entry.args[0] if entry is not None else base.args[original["now_input"]]
        base.op, base.target = original["op"], original["target"]
        base.args, base.kwargs = decode_original(original, names, live_x)
    for n in nodes:
        if n.meta["peftc"].get("exit"):
            n.replace_all_uses_with(names[n.meta["peftc"]["exit"]])
    for n in reversed(nodes):
        gm.graph.erase_node(n)


def _stage_key(record: Adapter, path: str) -> tuple[int, str]:
    return STAGES.index(record.stages[path]), record.name


def _compose(gm: fx.GraphModule, site: WeightSite, here: list[Adapter]) -> None:
    here = sorted(here, key=lambda r: _stage_key(r, site.path))
    base, x = site.node, site.input

    def builder(record: Adapter, cursor: fx.Node, before: fx.Node | None) -> Builder:
        ctx = Context(gm, site, record.options, {**record.names.get("", {}), **record.names[site.path]})
        return Builder(gm, ctx, record.method(), cursor, before=before, base=base, x=site.input)

    inputs = [r for r in here if r.stages[site.path] == "input"]
    weights = [r for r in here if r.stages[site.path] == "weight"]
    if inputs or weights:
        original = encode_original(site)
        for record in inputs:
            b = builder(record, base, before=base)
            if x is site.input:
                x = b.call(aten.alias.default, x, role="input_entry")
            x = record.method().build(b, x)
        weight = bias = None
        for record in weights:
            b = builder(record, base, before=base)
            b._weight = weight
            weight = record.method().build(b, b.weight())
            bias = b.bias or bias
        if weight is None:
            args = list(base.args)
            args[original["input"]] = x
            base.args = tuple(args)
            original["now_input"] = original["input"]
        else:
            if bias is None and site.bias:
                bias = builder(weights[-1], base, before=base).base_bias()
            target, args = site.functional(x, weight, bias)
            base.op, base.target, base.args, base.kwargs = "call_function", target, args, {}
            original["now_input"] = args.index(x)
        base.meta["peftc_original"] = original
    y, cursor, inside = base, base, []
    for record in here:
        stage = record.stages[site.path]
        if stage not in ("output", "add"):
            continue
        b = builder(record, cursor, before=None)
        if stage == "output":
            y = record.method().build(b, y)
        else:
            y = b.call(aten.add.Tensor, y, record.method().build(b, site.input), role="output")
        cursor = b.cursor
        inside += b.nodes
    if y is not base:
        y.meta["peftc"]["exit"] = base.name
        members = set(inside)
        base.replace_all_uses_with(y, delete_user_cb=lambda user: user not in members)


# --- switching, deleting ----------------------------------------------------------------------

def _check_name(gm: fx.GraphModule, name: str) -> Adapter:
    known = adapters(gm)
    if name not in known:
        parts = [f"no adapter named {name!r}.", suggest(name, known), f"Adapters: {', '.join(known) or 'none'}"]
        raise OptionError(" ".join(p for p in parts if p))
    return known[name]


def _check_nesting(gm: fx.GraphModule, refs: Iterable[tuple[str, str]], *, extra: Iterable[Adapter] = (),
                   merged: Iterable[str] = (), unmerged: Iterable[str] = (), active: Iterable[str] | None = None) -> None:
    """Refuse a state in which a merged adapter lies outside an active unmerged one at a site, or in which
    two active adapters of an `exclusive` technique share a site."""
    merged, unmerged = set(merged), set(unmerged)
    records = [*adapters(gm).values(), *extra]
    for path, kind in refs:
        at_site = [r for r in records if (path, kind) in r.sites]
        is_merged = lambda r: (r.merged or r.name in merged) and r.name not in unmerged  # noqa: E731
        is_active = lambda r: r.name in active if active is not None else r.active or r.name in unmerged  # noqa: E731
        live = [r for r in at_site if not is_merged(r) and is_active(r)]
        for method in sorted({r.technique for r in live if r.method().exclusive}):
            same = [r.name for r in live if r.technique == method]
            if len(same) > 1:
                raise OptionError(f"at {path!r}, adapters {', '.join(map(repr, same))} ({method}) would be active "
                                  f"together, but {method} allows one active adapter per site; make only one of them "
                                  "active (set_adapter)")
        for inner in [r for r in at_site if is_merged(r)]:
            for outer in [r for r in at_site if not is_merged(r) and is_active(r)]:
                i, o = _NESTING[inner.stages[path]], _NESTING[outer.stages[path]]
                if i > o or (i == o and inner.stages[path] != "add"):
                    raise OptionError(
                        f"at {path!r}, adapter {inner.name!r} ({inner.technique}, {inner.stages[path]} stage) would be "
                        f"merged into the base while {outer.name!r} ({outer.technique}, {outer.stages[path]} stage) "
                        f"stays unmerged around it, which changes what the site computes; merge {outer.name!r} too "
                        f"(or first), or unmerge {inner.name!r}")


def set_active(gm: fx.GraphModule, names: str | Iterable[str]) -> fx.GraphModule:
    """Make exactly `names` active (in place): their branches are in the graph, no others."""
    _check_not_lowered(gm)
    wanted = [names] if isinstance(names, str) else list(names)
    if wanted:
        _check_not_serving(gm)
    for name in wanted:
        if _check_name(gm, name).merged:
            raise OptionError(f"adapter {name!r} is merged into the base weights; unmerge it before switching")
    changed = [r for r in adapters(gm).values() if not r.merged and r.active != (r.name in wanted)]
    _check_nesting(gm, [ref for r in changed for ref in r.sites], active=wanted)
    for record in changed:
        record.active = record.name in wanted
    rebuild(gm, [ref for r in changed for ref in r.sites])
    gm.recompile()
    return gm


def disable(gm: fx.GraphModule) -> fx.GraphModule:
    """No unmerged adapter active: the graph computes the base model (with merged adapters) exactly."""
    return set_active(gm, [])


def delete(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """Remove adapter `name`: its nodes, tensors, modules and record."""
    _check_not_lowered(gm)
    record = _check_name(gm, name)
    if record.merged:
        raise OptionError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
    del adapters(gm)[name]
    rebuild(gm, record.sites)
    for qualname in record.param_names + list(record.modules):
        _pop(gm, qualname)
    gm.recompile()
    return gm


def _pop(gm: nn.Module, qualname: str) -> torch.Tensor | nn.Module | None:
    owner, _, attr = qualname.rpartition(".")
    module = gm.get_submodule(owner)
    for registry in (module._parameters, module._buffers, module._modules):
        if attr in registry:
            return registry.pop(attr)
    return None


# --- merging ----------------------------------------------------------------------------------

# How deep a stage sits in the composed site, innermost first: what merging folds first.
_NESTING = {"weight": 0, "input": 1, "output": 2, "add": 3}


def _fold_order(record: Adapter, path: str) -> tuple[int, str]:
    """Weight stages first, then input stages innermost last, then output stages, then updates."""
    stage = record.stages[path]
    rank = _NESTING[stage]
    key = record.name if stage != "input" else "".join(chr(0x10FFFF - ord(c)) for c in record.name)
    return rank, key


def _refold(gm: fx.GraphModule, site: WeightSite, merged: list[Adapter], options: Any) -> float:
    """Set the site's weights to its original ones with `merged` folded in; returns dW's survival."""
    fmt = format_of(site)
    bases = peftc_meta(gm).setdefault("merged_bases", {})
    if site.path not in bases:
        bases[site.path] = (fmt.name, fmt.snapshot(gm, site))
    stored, state = bases[site.path]
    if stored != fmt.name:
        raise OptionError(f"{site.path!r} was stored as {stored} and merged into a {fmt.name} weight; "
                          "that merge cannot be undone (merge into the same format, e.g. requantize=true, to keep it undoable)")
    fmt.restore(gm, site, state)
    if not merged:
        del bases[site.path]
        return 1.0
    with torch.no_grad():
        weight = fmt.read(gm, site).float()
        bias = get_tensor(gm, site.bias).float() if site.bias else None
        original = weight
        for record in sorted(merged, key=lambda r: _fold_order(r, site.path)):
            ctx = _Kept(gm, site, record.options, {**record.names.get("", {}), **record.names[site.path]}, record.kept)
            weight, bias = record.method().fold(ctx, weight, bias)
        unchanged = bias is None or not site.bias or torch.equal(bias, get_tensor(gm, site.bias).float())
        if torch.equal(weight, original) and unchanged:
            return 1.0
        return fmt.write(gm, site, weight, None if unchanged else bias, options)


class _Kept(Context):
    """A context reading a merged adapter's kept tensors."""

    def __init__(self, gm, site, options, names, kept):
        super().__init__(gm, site, options, names)
        self.kept = kept or {}

    def tensor(self, attr: str) -> torch.Tensor:
        qualname = self.names[attr]
        return self.kept[qualname] if qualname in self.kept else get_tensor(self.gm, qualname)


def merge_adapters(gm: fx.GraphModule, names: list[str], options: Any) -> tuple[list[str], list[float]]:
    """Fold `names` into their sites' base weights; their tensors move into the record (or are dropped)."""
    _check_not_lowered(gm)
    _check_not_serving(gm)
    records = [adapters(gm)[n] for n in names]
    refs = list(dict.fromkeys(ref for r in records for ref in r.sites))
    _check_nesting(gm, refs, merged=names)
    strip(gm, refs)
    for record in records:
        record.kept, record.merged = {q: get_tensor(gm, q) for q in record.param_names}, True
    sites = _current_sites(gm, refs)
    survival = [_refold(gm, sites[ref], [r for r in adapters(gm).values() if r.merged and ref in r.sites], options)
                for ref in refs]
    for record in records:  # modules (dropout) hold no weights; unmerge calls them again
        for qualname in record.param_names + ([] if options.keep else list(record.modules)):
            _pop(gm, qualname)
    if not options.keep:  # the merged weights become the base
        for record in records:
            del adapters(gm)[record.name]
        still_merged = {path for r in adapters(gm).values() if r.merged for path, _ in r.sites}
        for path, _ in refs:
            if path not in still_merged:
                peftc_meta(gm).get("merged_bases", {}).pop(path, None)
    compose(gm, refs)
    return [path for path, _ in refs], survival


def unmerge_adapters(gm: fx.GraphModule, names: list[str]) -> list[str]:
    """Undo `merge` for `names`: restore the original weights, refold the others, re-insert their branches."""
    _check_not_lowered(gm)
    records = [adapters(gm)[n] for n in names]
    for record in records:
        if record.kept is None:
            raise OptionError(f"unmerge: adapter {record.name!r} was merged with keep=false; its weights are gone")
    refs = list(dict.fromkeys(ref for r in records for ref in r.sites))
    _check_nesting(gm, refs, unmerged=names)
    strip(gm, refs)
    for record in records:
        record.merged = False
    sites = _current_sites(gm, refs)
    for ref in refs:
        _refold(gm, sites[ref], [r for r in adapters(gm).values() if r.merged and ref in r.sites], None)
    for record in records:
        for qualname, tensor in record.kept.items():
            set_tensor(gm, qualname, tensor, buffer=not isinstance(tensor, nn.Parameter))
        record.kept, record.active = None, True
    compose(gm, refs)
    return [path for path, _ in refs]


def adapter_tensors(gm: fx.GraphModule, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors by qualified name (from the record while it is merged)."""
    record = _check_name(gm, name)
    if record.merged:
        return dict(record.kept or {})
    return {q: get_tensor(gm, q) for q in record.param_names}
