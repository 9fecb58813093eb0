"""The technique layer's core: adapters on a graph, written once for every technique.

A technique (`peftc.technique.Technique`) declares its parameters, its stage and its rewrite; this
module inserts it, keeps the adapter record, switches and deletes (`peftc.technique.merge` merges,
`peftc.technique.checkpoint` saves and loads).

How techniques compose at one op (docs/concepts.md):

    y = F(O_k(...O_1(op(I_m(...I_1(x)), W_n(...W_1(W)), b))) + A_1(x) + ... + A_j(x))

1. `input` stages transform x (or the op's operands), `weight` stages W (and b), `output` stages y,
   `add` stages add terms read from the op's own x, `final` stages the whole result, in adapter-name
   order within a stage. All sites at one op (an embedding weight and the token site of prompt
   tuning, an RMSNorm weight and the final hidden state) compose together in this one order.
2. An op is always rebuilt whole from its active, unmerged adapters: `rebuild` strips every node the
   core inserted there (undoing reroutes and operand rewrites, `peftc.ir.rewrites`) and composes
   again, so the graph depends only on which adapters are active and merged, never on the order they
   were added or switched. Rebuilding a site rebuilds every site at its op, and every site of an
   adapter whose nodes are shared across its sites (`Builder.once`).
3. Merging (`peftc.technique.merge`) folds merged adapters from the site's original weights; a
   merged adapter must lie inside every active unmerged one at the site.
4. Over a float16/bfloat16 op an adapter's tensors are float32 where its technique says peft keeps
   them so (`half_precision`, `autocast_adapter_dtype`): an `add` term is computed from x cast to
   their dtype at run time and the sum cast back after the last term (cast first on formats whose
   peft layers do: bitsandbytes' 4-bit), and an op whose weight stage is float32 runs in float32.

Every node a technique adds carries `meta["peftc"] = {"pass", "role", "adapter", "site", "kind"}`.
The record lives in `gm.meta["peftc"]["adapters"]` as `Adapter` objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError, PassError, PeftcError, suggest
from peftc.ir.graph import freeze_parameters, get_tensor, peftc_meta, qualify, set_tensor
from peftc.ir.registry import PassResult, register_pass
from peftc.ir.rewrites import Resolver, consumed, keep_original, restore_original
from peftc.sites.formats import format_of
from peftc.sites.selection import sites_of
from peftc.sites.weight import WeightSite
from peftc.technique import registry
from peftc.technique.declaration import STAGES, Builder, Context, Param, Technique
from peftc.technique.module_copy import MODULE_COPY
from peftc.technique.scope import scope

__all__ = [
    "Adapter",
    "SHARED",
    "register_technique",
    "adapters",
    "active_adapters",
    "set_active",
    "disable",
    "delete",
    "rebuild",
    "adapter_tensors",
    "check_name",
    "check_nesting",
    "context",
    "check_not_lowered",
    "check_not_serving",
]

aten = torch.ops.aten
Ref = tuple[str, str]  # (site path, site kind)
# the record's key for tensors an adapter shares across its sites (no module path looks so)
SHARED = "<shared>"


@dataclass
class Adapter:
    """One adapter: its technique, options, sites, tensors and modules; whether it is active and
    merged."""

    name: str
    technique: str
    options: Any
    sites: tuple[Ref, ...]
    # site path (SHARED for shared tensors) -> attr -> qualified tensor name
    names: dict[str, dict[str, str]]
    # site path -> attr -> qualified module name
    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    active: bool = True
    merged: bool = False
    kept: dict[str, torch.Tensor] | None = None  # the tensors, while merged
    stages: dict[str, str] = field(default_factory=dict)  # site path -> stage
    saved_modules: tuple[str, ...] = ()  # the module sites of `modules_to_save`
    # site path -> its own options, where they differ (peft's rank_pattern, alpha_pattern)
    site_options: dict[str, Any] = field(default_factory=dict)
    # qualified tensor name -> the name without the adapter's
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def param_names(self) -> list[str]:
        return [q for names in self.names.values() for q in names.values()]

    @property
    def module_names(self) -> list[str]:
        return [q for names in self.modules.values() for q in names.values()]

    def options_at(self, path: str) -> Any:
        """The options at site `path` (`Technique.options_at`)."""
        return self.site_options.get(path, self.options)

    def method(self, kind: str | None = None, path: str | None = None) -> Technique:
        """The technique acting at the site (`kind`, `path`): the adapter's own, or at the modules
        it saves (`modules_to_save`) the core's module copy."""
        saved = kind == "module" and path in self.saved_modules
        return MODULE_COPY if saved else registry.technique(self.technique)


def register_technique(cls: type[Technique] | None = None, *, replace: bool = False) -> Any:
    """Register a technique and the pass of its name that adds it (`lora(...)`, `ia3(...)`).

    Refused before anything changes when the declaration is incomplete, or when its name or a peft
    type it loads is taken; `replace=True` replaces a technique registered under the same name (a
    fix reloaded in a notebook), never another pass.
    """

    def decorate(cls: type[Technique]) -> type[Technique]:
        registry.check_declaration(cls, replace)
        method = cls()

        def run(gm: fx.GraphModule, options: Any) -> PassResult:
            return add_adapter(gm, method, options)

        run.__doc__, run.__name__ = cls.__doc__, cls.name
        register_pass(
            cls.name, options=cls.options, preserves_outputs=cls.preserves_outputs, replace=replace
        )(run)
        registry.add(method)
        return cls

    return decorate(cls) if cls is not None else decorate


def adapters(gm: fx.GraphModule) -> dict[str, Adapter]:
    return peftc_meta(gm).setdefault("adapters", {})


def active_adapters(gm: fx.GraphModule) -> list[str]:
    return [name for name, record in adapters(gm).items() if record.active and not record.merged]


def context(gm: fx.GraphModule, record: Adapter, site: Any) -> Context:
    """What `record`'s technique sees at `site` (its shared tensors too)."""
    names = {**record.names.get(SHARED, {}), **record.names.get(site.path, {})}
    modules = {**record.modules.get(SHARED, {}), **record.modules.get(site.path, {})}
    base = _dtype(gm, site)
    options = record.options_at(site.path)
    dtype = adapter_dtype(gm, site, record.method(site.kind, site.path), options)
    return Context(
        gm,
        site,
        options,
        names,
        modules,
        record.sites,
        dtype,
        base,
    )


HALF = (torch.float16, torch.bfloat16)


def adapter_dtype(gm: fx.GraphModule, site: Any, handler: Technique, options: Any) -> torch.dtype:
    """The dtype of an adapter's tensors at `site`: the base's compute dtype, or float32 over a
    float16/bfloat16 base where peft upcasts them (`autocast_adapter_dtype`, its default)."""
    dtype = _dtype(gm, site)
    if dtype not in HALF or not options.autocast_adapter_dtype or handler.half_precision == "base":
        return dtype
    if handler.half_precision == "float32":
        return torch.float32
    supported = sorted(n for n, t in registry.techniques().items() if t.half_precision == "float32")
    raise OptionError(
        f"{handler.name} on a {dtype} model: peft keeps the adapter's tensors in float32 there "
        f"(get_peft_model's autocast_adapter_dtype=True), which peftc implements for "
        f"{', '.join(supported)}; pass autocast_adapter_dtype=false to train it in {dtype}, as "
        "get_peft_model(..., autocast_adapter_dtype=False)"
    )


# --- inserting ------------------------------------------------------------------------------


def add_adapter(gm: fx.GraphModule, method: Technique, options: Any) -> PassResult:
    """The pass every technique gets: create its tensors at the selected sites and rebuild them."""
    check_not_lowered(gm)
    if options.adapter in adapters(gm):
        raise OptionError(
            f'{method.name}: an adapter named {options.adapter!r} exists; pass adapter="other" or '
            "delete it first"
        )
    options = method.resolve_options(gm, options)
    saved = [path for r in adapters(gm).values() for path in r.saved_modules]
    kept, copies = scope(gm, method.name, options, method.select(gm, options), saved)
    placed = kept + [(site, site.path) for site in copies]
    sites = [site for site, _ in placed]
    record = Adapter(
        options.adapter,
        method.name,
        options,
        tuple((s.path, s.kind) for s in sites),
        {},
        saved_modules=tuple(s.path for s in copies),
    )
    for site in sites:
        handler = record.method(site.kind, site.path)
        here = handler.options_at(site, options)
        if here != options:
            record.site_options[site.path] = here
        _at_site(handler, site, "cannot act on", partial(handler.check, gm, site, here))
        adapter_dtype(gm, site, handler, here)
        record.stages[site.path] = handler.stage_at(site, here)
    method.check_options_at(gm, options, [s for s in sites if s.path not in record.saved_modules])
    check_nesting(gm, record.sites, extra=[record])  # before anything changes
    if options.freeze_base:
        freeze_parameters(gm, keep={q for r in adapters(gm).values() for q in r.param_names})
    _create_all(gm, method, options, record, placed)
    serving = "multi_lora" in peftc_meta(gm)
    # a stacked graph serves it per row after the next multi_lora, never on every row
    record.active = not serving
    adapters(gm)[options.adapter] = record
    rebuild(gm, record.sites)
    own = [s for s in sites if s.path not in record.saved_modules]
    method.after_insert(gm, own, options)
    report = method.describe(options, own)
    if record.saved_modules:
        report += f"; trains a copy of {', '.join(record.saved_modules)}"
    if serving:
        report += (
            "; inactive: this graph serves stacked adapters, apply 'multi_lora' again to serve it"
        )
    return PassResult(gm, modified=True, sites=tuple(s.path for s in sites), report=report)


def _create_all(
    gm: fx.GraphModule, method: Technique, options: Any, record: Adapter, placed: list
) -> None:
    """The adapter's tensors and modules (shared, then per site), into `record`."""
    sites = [site for site, _ in placed if site.path not in record.saved_modules]
    shared = method.shared_params(gm, sites, options) if sites else []
    if shared:
        dtype = adapter_dtype(gm, sites[0], method, options)
        record.names[SHARED] = _create(gm, "", shared, record, dtype, _device(gm, sites[0]))
    modules = method.shared_modules(gm, sites, options) if sites else {}
    if modules:
        _add_modules(gm, ("", SHARED), modules, record, method, _device(gm, sites[0]))
    for site, prefix in placed:
        ctx, handler = context(gm, record, site), record.method(site.kind, site.path)
        params = _at_site(
            handler, site, "cannot create its tensors at", partial(handler.params, ctx)
        )
        record.names[site.path] = _create(gm, prefix, params, record, ctx.dtype, _device(gm, site))
        modules = _at_site(
            handler, site, "cannot create its modules at", partial(handler.modules, ctx)
        )
        _add_modules(gm, (prefix, site.path), modules, record, handler, _device(gm, site))


def _add_modules(
    gm: fx.GraphModule,
    where: tuple[str, str],
    modules: dict[str, nn.Module],
    record: Adapter,
    handler: Technique,
    device: torch.device,
) -> None:
    """Register `modules` at `<prefix>.<attr>.<adapter>` for the record's key (a site path, or
    SHARED); `where` is (prefix, key)."""
    prefix, key = where
    for attr, module in modules.items():
        qualname = qualify(prefix, attr, record.name)
        gm.add_submodule(qualname, module.to(device))
        record.modules.setdefault(key, {})[attr] = qualname
        # a module's tensors are the adapter's: trained, saved, never frozen with the base
        for name, _ in [*module.named_parameters(), *module.named_buffers()]:
            record.names.setdefault(key, {})[f"{attr}.{name}"] = f"{qualname}.{name}"
            record.keys[f"{qualname}.{name}"] = handler.module_key(prefix, attr, name)


def _at_site(method: Technique, site: Any, what: str, fn: Any) -> Any:
    """`fn()`, an error from inside the technique named by technique and site (not by a node deep in
    the graph)."""
    try:
        return fn()
    except PeftcError:
        raise
    except Exception as e:
        raise PassError(
            f"{method.name} {what} the {site.kind} site {site.path!r} ({type(e).__name__}: {e}); a "
            "technique refuses the sites it cannot act on in its check()"
        ) from e


def _device(gm: fx.GraphModule, site: Any) -> torch.device:
    if hasattr(site, "storage"):  # a stored weight (weight and parameter sites)
        return get_tensor(gm, format_of(site).storage(gm, site)[0]).device
    val = site.node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else torch.device("cpu")


def _dtype(gm: fx.GraphModule, site: Any) -> torch.dtype:
    """The dtype adapter tensors at `site` take: the weight format's compute dtype, else the site's
    values'."""
    if hasattr(site, "storage"):
        return format_of(site).compute_dtype(gm, site)
    val = site.node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else torch.float32


def _create(
    gm: fx.GraphModule,
    path: str,
    params: list[Param],
    record: Adapter,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, str]:
    names = {}
    for param in params:
        qualname = qualify(path, param.attr, record.name, param.suffix)
        tensor = param.make(dtype, device)
        set_tensor(gm, qualname, tensor, buffer=not isinstance(tensor, nn.Parameter))
        names[param.key or param.attr] = qualname
        record.keys[qualname] = qualify(path, param.attr, param.suffix)
    return names


# --- rebuilding sites -----------------------------------------------------------------------


def rebuild(gm: fx.GraphModule, refs: Iterable[Ref]) -> None:
    """Strip the sites `refs` (and every site composed with them, case 2) of every technique node,
    then insert their active, unmerged adapters."""
    check_not_lowered(gm)
    refs = closure(gm, list(dict.fromkeys(refs)))
    strip(gm, refs)
    compose(gm, refs)


def closure(gm: fx.GraphModule, refs: list[Ref]) -> list[Ref]:
    """`refs` with every site at the same op as one of them, and every site of an adapter with
    shared nodes."""
    records = list(adapters(gm).values())
    every = list(dict.fromkeys([*refs, *(ref for r in records for ref in r.sites)]))
    if len(every) == len(refs):
        return refs
    anchors = {ref: site.node for ref, site in current_sites(gm, every).items()}
    shared = {
        n.meta["peftc"]["adapter"]
        for n in gm.graph.nodes
        if "adapter" in n.meta.get("peftc", {}) and n.meta["peftc"].get("site") is None
    }
    chosen = dict.fromkeys(refs)
    while True:
        ops = {anchors.get(ref) for ref in chosen}
        grow = [ref for ref in every if ref not in chosen and anchors.get(ref) in ops]
        grow += [
            ref
            for r in records
            if r.name in shared and set(r.sites) & set(chosen)
            for ref in r.sites
            if ref not in chosen
        ]
        if not grow:
            return list(chosen)
        chosen.update(dict.fromkeys(grow))


def check_not_serving(gm: fx.GraphModule) -> None:
    if "multi_lora" in peftc_meta(gm):
        raise PassError(
            "this graph serves stacked adapters (multi_lora): every row picks its adapter with "
            "adapter_ids, so switching or merging branches would add them to every row; do that on "
            "the graph before 'multi_lora'"
        )


def check_not_lowered(gm: fx.GraphModule) -> None:
    if "lowered" in peftc_meta(gm):
        backend = peftc_meta(gm)["lowered"]["backend"]
        if backend == "outline":
            raise PassError(
                "this graph's blocks are outlined into submodules ('outline'), so adapters cannot "
                "be added, switched, merged or deleted here; run 'inline' first, or do that before "
                "'outline' (apply it last)"
            )
        raise PassError(
            f"this graph was lowered by {backend!r}: its sites are fused kernels now, so adapters "
            "cannot be added, switched, merged or deleted; do that on the graph before "
            f"{backend!r} (apply it last)"
        )


def strip(gm: fx.GraphModule, refs: list[Ref]) -> None:
    """Remove every technique node at the sites `refs` (and the shared nodes of their adapters),
    restoring the ops they rewrote and giving rerouted users back what they read."""
    keys = set(refs)
    owners = {r.name for r in adapters(gm).values() if keys & set(r.sites)}
    graph = gm.graph

    def ours(n: fx.Node) -> bool:
        tag = n.meta.get("peftc", {})
        if "adapter" not in tag or "kind" not in tag:
            return False
        return (
            (tag["site"], tag["kind"]) in keys
            if tag["site"] is not None
            else tag["adapter"] in owners
        )

    removed = [n for n in graph.nodes if ours(n)]
    gone = set(removed)
    resolve = Resolver(graph, skip=gone)
    for n in graph.nodes:
        original = n.meta.get("peftc_original")
        if original is not None and (original["site"], original["kind"]) in keys:
            restore_original(n, resolve)
    for n in reversed(removed):
        if "exit" in n.meta["peftc"]:
            n.replace_all_uses_with(consumed(n, gone, resolve))
    for n in reversed(removed):
        graph.erase_node(n)


def current_sites(gm: fx.GraphModule, refs: Iterable[Ref]) -> dict[Ref, Any]:
    wanted = set(refs)
    kinds = tuple(dict.fromkeys(kind for _, kind in wanted))
    return {(s.path, s.kind): s for s in sites_of(gm, kinds) if (s.path, s.kind) in wanted}


def compose(gm: fx.GraphModule, refs: list[Ref]) -> None:
    """Insert the active, unmerged adapters at the (stripped) sites `refs`, each op's sites
    together."""
    found = current_sites(gm, refs)
    missing = [ref for ref in refs if ref not in found]
    if missing:
        path, kind = missing[0]
        raise PassError(
            f"expected a {kind} site at {path!r}, found none; was its op rewritten by another pass?"
        )
    active = [r for r in adapters(gm).values() if r.active and not r.merged]
    # composing an op replaces its output, which a later site may read (chained linears), so
    # inputs are matched by position
    positions = {
        ref: s.node.args.index(s.input)
        for ref, s in found.items()
        if isinstance(s, WeightSite) and s.input in s.node.args
    }
    groups: dict[fx.Node, list[tuple[Ref, Any, Adapter]]] = {}
    for ref, site in found.items():
        for record in active:
            if ref in record.sites:
                groups.setdefault(site.node, []).append((ref, site, record))
    memo: dict[tuple[str, Any], Any] = {}
    for node in [n for n in gm.graph.nodes if n in groups]:
        pairs = []
        for ref, site, record in groups[node]:
            if ref in positions and site.node.args[positions[ref]] is not site.input:
                site = replace(site, input=site.node.args[positions[ref]])
            pairs.append((site, record))
        compose_op(gm, node, pairs, memo)


def _stage(site: Any, record: Adapter) -> str:
    return record.stages[site.path]


def compose_op(
    gm: fx.GraphModule, base: fx.Node, pairs: list[tuple[Any, Adapter]], memo: dict
) -> None:
    """Compose every active adapter of every site at op `base` (case 1)."""
    _check_alone(gm, base, pairs)
    pairs = sorted(pairs, key=lambda p: (STAGES.index(_stage(*p)), p[1].name))

    def builder(
        site: Any, record: Adapter, before: fx.Node | None, cursor: fx.Node, x: Any
    ) -> Builder:
        return Builder(
            gm,
            context(gm, record, site),
            record.method(site.kind, site.path),
            base=base,
            x=x,
            before=before,
            cursor=cursor,
            memo=memo,
        )

    def build(b: Builder, record: Adapter, value: Any) -> Any:
        method = record.method(b.site.kind, b.site.path)
        return _at_site(method, b.site, "cannot rewrite", lambda: method.build(b, value))

    before = [p for p in pairs if _stage(*p) in ("input", "weight")]
    op_dtype = _compose_before(gm, base, before, builder, build)
    y, cursor, inside, restore = base, base, [], None
    if op_dtype is not None:  # the op ran in the adapter's float32: back to its dtype
        b = builder(*before[-1], None, cursor, getattr(before[-1][0], "input", None))
        y = b.call(aten._to_copy.default, y, dtype=op_dtype, role="output_downcast")
        cursor, inside = b.cursor, inside + b.nodes
    for site, record in [p for p in pairs if _stage(*p) in ("output", "add", "final")]:
        b = builder(site, record, None, cursor, getattr(site, "input", None))
        if _stage(site, record) == "add":
            y, upcast = _add(b, record, y, build)
            restore = restore or upcast
        else:
            if restore is not None:  # the additive terms are in: back to the op's dtype
                y, restore = b.call(aten._to_copy.default, y, dtype=restore, role="output"), None
            y = build(b, record, y)
        if restore is not None and site is pairs[-1][0] and record is pairs[-1][1]:
            y = b.call(aten._to_copy.default, y, dtype=restore, role="output")
        cursor = b.cursor
        inside += b.nodes
    if y is not base:
        y.meta["peftc"]["exit"] = base.name
        members = set(inside)
        base.replace_all_uses_with(y, delete_user_cb=lambda user: user not in members)


def _add(b: Builder, record: Adapter, y: fx.Node, build: Any) -> tuple[fx.Node, Any]:
    """y + the term of an `add` stage; over a half-precision base with the adapter in float32, as
    peft: the term from x cast to float32, added in float32 (the op's dtype returned, to cast the
    sum back after the last term) or, where the format says so (bitsandbytes' 4-bit layers), cast
    to the op's dtype first."""
    x, ctx = b.site.input, b.ctx
    if not ctx.upcast:
        return b.call(aten.add.Tensor, y, build(b, record, x), role="output"), None
    if b.site.kind != "embedding":  # token ids stay ids
        x = b.as_adapter(x, "input_upcast")
    term, base = build(b, record, x), _dtype(b.gm, b.site)
    if not format_of(b.site).adds_in_adapter_dtype:
        return b.call(
            aten.add.Tensor,
            y,
            b.call(aten._to_copy.default, term, dtype=base, role="term_downcast"),
            role="output",
        ), None
    return b.call(aten.add.Tensor, y, term, role="output"), base


def _compose_before(
    gm: fx.GraphModule, base: fx.Node, pairs: list[tuple[Any, Adapter]], builder: Any, build: Any
) -> torch.dtype | None:
    """The `input` and `weight` stages: nodes before the op, which then reads the new input and
    weight. Where a weight stage's adapter is float32 over a half-precision op, the op computes in
    float32 as peft's (x and the bias cast too): returns the dtype to cast its result back to."""
    if not pairs:
        return None
    site = pairs[0][0]
    x = getattr(site, "input", None)
    weight = bias = upcast = None
    for site, record in pairs:
        b = builder(site, record, base, base, x)
        if _stage(site, record) == "input":
            # an op of several operands: the op (`b.rewrite`)
            x = build(b, record, x if x is not None else base)
        else:
            b._weight = weight
            weight = build(b, record, b.weight())
            bias = b.bias or bias
            upcast = b if b.ctx.upcast else upcast
    if not isinstance(site, WeightSite):
        return None
    index = list(base.args).index(site.input)
    keep_original(base, site=site.path, kind=site.kind)
    if weight is None:
        args = list(base.args)
        args[index] = x
        base.args = tuple(args)
        return None
    if bias is None and site.bias:
        bias = builder(*pairs[-1], base, base, x).base_bias()
    if upcast is not None:
        x = upcast.as_adapter(x, "input_upcast")
        bias = upcast.as_adapter(bias, "bias_upcast") if bias is not None else None
    target, args = site.functional(x, weight, bias)
    base.op, base.target, base.args, base.kwargs = "call_function", target, args, {}
    return upcast.ctx.base_dtype if upcast is not None else None


def _check_alone(gm: fx.GraphModule, base: fx.Node, pairs: list[tuple[Any, Adapter]]) -> None:
    """An op composed while another site's nodes are still at it would nest them in an unknown
    order."""
    ours = {(s.path, s.kind) for s, _ in pairs}
    original = base.meta.get("peftc_original")
    if original is not None and (original["site"], original["kind"]) not in ours:
        others = f"{original['kind']} site {original['site']!r}"
    else:
        chains = [n for n in base.users if n.meta.get("peftc", {}).get("exit") == base.name]
        others = next(
            (f"{n.meta['peftc']['kind']} site {n.meta['peftc']['site']!r}" for n in chains), None
        )
    if others is not None:
        raise PassError(
            f"internal: the op of {', '.join(f'{k} site {p!r}' for p, k in sorted(ours))} was "
            f"composed while {others} still rewrites it; please report this with the pipeline that "
            "gave it"
        )


# --- switching, deleting ----------------------------------------------------------------------


def check_name(gm: fx.GraphModule, name: str) -> Adapter:
    known = adapters(gm)
    if name not in known:
        parts = [
            f"no adapter named {name!r}.",
            suggest(name, known),
            f"Adapters: {', '.join(known) or 'none'}",
        ]
        raise OptionError(" ".join(p for p in parts if p))
    return known[name]


# How deep a stage sits in the composed site, innermost first: what merging folds first.
NESTING = {"weight": 0, "input": 1, "output": 2, "add": 3, "final": 4}


def check_nesting(
    gm: fx.GraphModule,
    refs: Iterable[Ref],
    *,
    extra: Iterable[Adapter] = (),
    merged: Iterable[str] = (),
    unmerged: Iterable[str] = (),
    active: Iterable[str] | None = None,
) -> None:
    """Refuse a state in which a merged adapter lies outside an active unmerged one at a site, or in
    which two active adapters of `exclusive` techniques share a site."""
    merged, unmerged = set(merged), set(unmerged)
    active = set(active) if active is not None else None
    records = [*adapters(gm).values(), *extra]

    def is_merged(r: Adapter) -> bool:
        return (r.merged or r.name in merged) and r.name not in unmerged

    def is_active(r: Adapter) -> bool:
        return r.name in active if active is not None else r.active or r.name in unmerged

    for path, kind in refs:
        at_site = [r for r in records if (path, kind) in r.sites]
        live = [r for r in at_site if not is_merged(r) and is_active(r)]
        alone = [r for r in live if r.method(kind, path).exclusive]
        if len(alone) > 1:
            named = ", ".join(f"{r.name!r} ({r.technique})" for r in alone)
            raise OptionError(
                f"at {path!r}, adapters {named} would be active together, but each replaces what "
                "the other computes there (one active at a time); make only one of them active "
                "(set_adapter, or disable_adapters before adding another)"
            )
        for inner in [r for r in at_site if is_merged(r)]:
            for outer in live:
                i, o = NESTING[inner.stages[path]], NESTING[outer.stages[path]]
                if i > o or (i == o and inner.stages[path] != "add"):
                    raise OptionError(
                        f"at {path!r}, adapter {inner.name!r} ({inner.technique}, "
                        f"{inner.stages[path]} stage) would be merged into the base while "
                        f"{outer.name!r} ({outer.technique}, {outer.stages[path]} stage) stays "
                        "unmerged around it, which changes what the site computes; merge "
                        f"{outer.name!r} too (or first), or unmerge {inner.name!r}"
                    )


def set_active(gm: fx.GraphModule, names: str | Iterable[str]) -> fx.GraphModule:
    """Make exactly `names` active (in place): their branches are in the graph, no others."""
    check_not_lowered(gm)
    wanted = [names] if isinstance(names, str) else list(names)
    if wanted:
        check_not_serving(gm)
    for name in wanted:
        if check_name(gm, name).merged:
            raise OptionError(
                f"adapter {name!r} is merged into the base weights; unmerge it before switching"
            )
    changed = [r for r in adapters(gm).values() if not r.merged and r.active != (r.name in wanted)]
    check_nesting(gm, [ref for r in changed for ref in r.sites], active=wanted)
    for record in changed:
        record.active = record.name in wanted
    rebuild(gm, [ref for r in changed for ref in r.sites])
    gm.recompile()
    return gm


def disable(gm: fx.GraphModule) -> fx.GraphModule:
    """No unmerged adapter active: the graph computes the base model (with merged adapters)
    exactly."""
    return set_active(gm, [])


def delete(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """Remove adapter `name`: its nodes, tensors, modules and record."""
    check_not_lowered(gm)
    record = check_name(gm, name)
    if record.merged:
        raise OptionError(
            f"adapter {name!r} is merged into the base weights; unmerge it before deleting it"
        )
    # stripped while still recorded, so that the nodes it shares across its sites go too
    record.active = False
    rebuild(gm, record.sites)
    del adapters(gm)[name]
    for qualname in record.param_names + record.module_names:
        pop(gm, qualname)
    gm.recompile()
    return gm


def pop(gm: nn.Module, qualname: str) -> torch.Tensor | nn.Module | None:
    """Unregister the tensor or module at `qualname` (nothing if it is already gone with its
    module)."""
    owner, _, attr = qualname.rpartition(".")
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return None
    for table in (module._parameters, module._buffers, module._modules):
        if attr in table:
            return table.pop(attr)
    return None


def adapter_tensors(gm: fx.GraphModule, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors by qualified name (from the record while it is merged)."""
    record = check_name(gm, name)
    if record.merged:
        return dict(record.kept or {})
    return {q: get_tensor(gm, q) for q in record.param_names}
