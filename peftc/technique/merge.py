"""Merging: adapters folded into their sites' base weights, and back out.

1. `merge_adapters` strips the sites, keeps each site's original weights (through its weight format)
   at its first merge, folds every merged adapter there from those originals in nesting order
   (weight stages, input stages innermost last, output stages, additive updates), writes the result
   through the format (NF4: requantize, or a dense weight), moves the adapters' tensors into their
   records and composes what stays active. `unmerge_adapters` restores the originals and refolds the
   rest.
2. The first time a technique merges on a graph, its `fold` is checked against its own rewrite: at
   one of its sites, on a copy of that op alone with only this adapter composed, random inputs must
   give what the op with the folded weight and bias gives. A fold that forgets the bias, or a term,
   fails there with the technique's name, before anything changes.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import NotMergeable, OptionError, PassError
from peftc.ir.graph import get_tensor, peftc_meta, set_module, set_tensor
from peftc.ir.rewrites import Resolver, as_captured
from peftc.sites.formats import format_of
from peftc.sites.weight import WeightSite
from peftc.technique.adapters import (
    NESTING,
    Adapter,
    adapters,
    check_nesting,
    check_not_lowered,
    check_not_serving,
    closure,
    compose,
    compose_op,
    context,
    current_sites,
    pop,
    strip,
)
from peftc.technique.declaration import Context
from peftc.technique.module_copy import own_tensors

__all__ = ["merge_adapters", "unmerge_adapters", "check_fold"]


def _fold_order(record: Adapter, path: str) -> tuple[int, str]:
    """Weight stages first, then input stages innermost last, then output stages, then updates."""
    stage = record.stages[path]
    key = record.name if stage != "input" else "".join(chr(0x10FFFF - ord(c)) for c in record.name)
    return NESTING[stage], key


class MergedContext(Context):
    """A context reading a merged adapter's kept tensors."""

    def __init__(self, gm: fx.GraphModule, site: Any, record: Adapter):
        base = context(gm, record, site)
        super().__init__(
            gm,
            site,
            base.options,
            base.names,
            base.modules,
            base.sites,
            base.dtype,
            base.base_dtype,
        )
        self.kept = record.kept or {}

    def tensor(self, attr: str) -> torch.Tensor:
        qualname = self.names[attr]
        return self.kept[qualname] if qualname in self.kept else get_tensor(self.gm, qualname)


def _refold(gm: fx.GraphModule, site: WeightSite, merged: list[Adapter], options: Any) -> float:
    """Set the site's weights to its original ones with `merged` folded in; returns dW's
    survival."""
    if site.kind == "module":
        return _recopy(gm, site, merged)
    fmt = format_of(site)
    bases = peftc_meta(gm).setdefault("merged_bases", {})
    if site.path not in bases:
        bases[site.path] = (fmt.name, fmt.snapshot(gm, site))
    stored, state = bases[site.path]
    if stored != fmt.name:
        raise OptionError(
            f"{site.path!r} was stored as {stored} and merged into a {fmt.name} weight; that merge "
            "cannot be undone (merge into the same format, e.g. requantize=true, to keep it "
            "undoable)"
        )
    fmt.restore(gm, site, state)
    if not merged:
        del bases[site.path]
        return 1.0
    with torch.no_grad():
        weight = fmt.read(gm, site).float()
        bias = get_tensor(gm, site.bias).float() if site.bias else None
        original = weight
        for record in sorted(merged, key=lambda r: _fold_order(r, site.path)):
            weight, bias = record.method().fold(MergedContext(gm, site, record), weight, bias)
        unchanged = (
            bias is None or not site.bias or torch.equal(bias, get_tensor(gm, site.bias).float())
        )
        if torch.equal(weight, original) and unchanged:
            return 1.0
        return fmt.write(gm, site, weight, None if unchanged else bias, options)


def _recopy(gm: fx.GraphModule, site: Any, merged: list[Adapter]) -> float:
    """A saved module's tensors: its original ones, or the merged adapter's copy (peft's
    merge_and_unload puts the copy in the module's place). Tensors are replaced, never written in
    place: other graphs may share them."""
    bases = peftc_meta(gm).setdefault("merged_bases", {})
    tensors = own_tensors(gm.get_submodule(site.path))
    if site.path not in bases:
        bases[site.path] = ("module", dict(tensors))
    originals = bases[site.path][1]
    values = dict(originals)
    if merged:
        record = merged[-1]
        (attr,) = record.modules[site.path]
        ctx = MergedContext(gm, site, record)
        values = {name: ctx.tensor(f"{attr}.{name}").detach().clone() for name in tensors}
    else:
        del bases[site.path]
    for name, value in values.items():
        old = originals[name]
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
        set_tensor(gm, f"{site.path}.{name}", value, buffer=not isinstance(value, nn.Parameter))
    return 1.0


def merge_adapters(
    gm: fx.GraphModule, names: list[str], options: Any
) -> tuple[list[str], list[float]]:
    """Fold `names` into their sites' base weights; their tensors move into the record (or are
    dropped)."""
    check_not_lowered(gm)
    check_not_serving(gm)
    records = [adapters(gm)[n] for n in names]
    folded = list(dict.fromkeys(ref for r in records for ref in r.sites))
    check_nesting(gm, folded, merged=names)
    for record in records:
        check_fold(gm, record)
    refs = closure(gm, folded)
    strip(gm, refs)
    for record in records:
        record.kept, record.merged = {q: get_tensor(gm, q) for q in record.param_names}, True
    sites = current_sites(gm, folded)
    survival = [
        _refold(
            gm,
            sites[ref],
            [r for r in adapters(gm).values() if r.merged and ref in r.sites],
            options,
        )
        for ref in folded
    ]
    for record in records:  # modules (dropout) hold no weights; unmerge calls them again
        for qualname in record.param_names + ([] if options.keep else record.module_names):
            pop(gm, qualname)
    if not options.keep:  # the merged weights become the base
        for record in records:
            del adapters(gm)[record.name]
        still_merged = {path for r in adapters(gm).values() if r.merged for path, _ in r.sites}
        for path, _ in folded:
            if path not in still_merged:
                peftc_meta(gm).get("merged_bases", {}).pop(path, None)
    compose(gm, refs)
    return [path for path, _ in folded], survival


def unmerge_adapters(gm: fx.GraphModule, names: list[str]) -> list[str]:
    """Undo `merge` for `names`: restore the original weights, refold the others, re-insert their
    branches."""
    check_not_lowered(gm)
    records = [adapters(gm)[n] for n in names]
    for record in records:
        if record.kept is None:
            raise OptionError(
                f"unmerge: adapter {record.name!r} was merged with keep=false; its weights are gone"
            )
    folded = list(dict.fromkeys(ref for r in records for ref in r.sites))
    check_nesting(gm, folded, unmerged=names)
    refs = closure(gm, folded)
    strip(gm, refs)
    for record in records:
        record.merged = False
    sites = current_sites(gm, folded)
    for ref in folded:
        _refold(
            gm, sites[ref], [r for r in adapters(gm).values() if r.merged and ref in r.sites], None
        )
    for record in records:
        for qualname, tensor in record.kept.items():
            set_tensor(gm, qualname, tensor, buffer=not isinstance(tensor, nn.Parameter))
        record.kept, record.active = None, True
    compose(gm, refs)
    return [path for path, _ in folded]


# --- the fold's numeric check (case 2) --------------------------------------------------------


def check_fold(gm: fx.GraphModule, record: Adapter) -> None:
    """Check `record`'s technique's fold at one of its sites, the first time it merges on `gm`."""
    for path in [path for path, kind in record.sites if kind == "module"]:
        own = {id(t) for t in own_tensors(gm.get_submodule(path)).values()}
        tied = [
            name
            for name, t in gm.named_parameters(remove_duplicate=False)
            if id(t) in own and not name.startswith(path + ".")
        ]
        if tied:
            raise NotMergeable(
                f"{record.name!r} trains a copy of {path!r}, whose tensors are tied to "
                f"{tied[0]!r}; merging would change both: keep it unmerged"
            )
    checked = peftc_meta(gm).setdefault("folds_checked", [])
    if record.technique in checked:
        return
    sites = current_sites(gm, record.sites)
    site = next(
        (sites[ref] for ref in record.sites if ref in sites and isinstance(sites[ref], WeightSite)),
        None,
    )
    # the op as captured, before any adapter rewrote it (what the weight format reads)
    if site is not None:
        site = replace(site, node=as_captured(site.node, Resolver(gm.graph)))
    sandbox = _sandbox(gm, site, record) if site is not None else None
    if sandbox is not None:
        _compare(site, record, *sandbox)
    checked.append(record.technique)


def _sandbox(
    gm: fx.GraphModule, site: WeightSite, record: Adapter
) -> tuple[fx.GraphModule, torch.Tensor] | None:
    """The site's op alone in a graph of its own, `record` composed on it, and a random input; None
    where the op reads other values than its input and stored tensors, or shapes or data are unknown
    (meta tensors)."""
    val = site.input.meta.get("val")
    if not isinstance(val, torch.Tensor) or any(t.device.type == "meta" for t in gm.parameters()):
        return None
    graph, root = fx.Graph(), nn.Module()
    x = graph.placeholder("x")
    outside = []

    def arg(a: Any) -> Any:
        if not isinstance(a, fx.Node) or a is site.input:
            return x if a is site.input else a
        if a.op != "get_attr":
            outside.append(a)
            return x
        set_tensor(root, a.target, get_tensor(gm, a.target), buffer=True)
        return graph.get_attr(a.target)

    op = graph.create_node(
        site.node.op,
        site.node.target,
        fx.node.map_aggregate(site.node.args, arg),
        fx.node.map_aggregate(site.node.kwargs, arg),
    )
    op.meta["val"] = site.node.meta.get("val")
    if site.node.op == "call_module":
        set_module(root, site.node.target, gm.get_submodule(site.node.target))
    graph.output(op)
    if outside:
        return None
    sandbox = fx.GraphModule(root, graph)
    # what techniques read of the model (module types, its config)
    sandbox.meta["peftc"] = peftc_meta(gm)
    for qualname in record.param_names:
        _own_path(sandbox, qualname)
        set_tensor(sandbox, qualname, _away_from_init(get_tensor(gm, qualname)), buffer=True)
    for qualname in record.module_names:
        _own_path(sandbox, qualname)
        set_module(sandbox, qualname, gm.get_submodule(qualname))
    compose_op(sandbox, op, [(replace(site, node=op, input=x), record)], {})
    sandbox.recompile()
    return sandbox, _random_input(site, val)


def _own_path(root: nn.Module, qualname: str) -> None:
    """Shallow copies of the modules on `qualname`'s path (a symbolic graph's `nn.Linear` holds the
    adapter's tensors), so what the sandbox sets there leaves the graph's own modules alone."""
    owner = root
    for part in qualname.split(".")[:-1]:
        child = owner._modules.get(part)
        if child is None:
            return
        twin = copy.copy(child)
        twin._parameters, twin._buffers = dict(child._parameters), dict(child._buffers)
        twin._modules = dict(child._modules)
        owner._modules[part] = twin
        owner = twin


def _away_from_init(tensor: torch.Tensor) -> torch.Tensor:
    """A trainable tensor moved by noise: a factor that starts at zero (LoRA's B) would make any
    fold agree with the rewrite."""
    if not (
        isinstance(tensor, nn.Parameter) and tensor.requires_grad and tensor.is_floating_point()
    ):
        return tensor
    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1))
    return tensor.detach() + 0.1 * noise.to(tensor)


def _random_input(site: WeightSite, val: torch.Tensor) -> torch.Tensor:
    shape = [d if isinstance(d, int) else _example_size(d) for d in val.shape]
    generator = torch.Generator().manual_seed(0)
    if not val.is_floating_point():  # token ids
        return torch.randint(0, site.num_embeddings, shape, generator=generator).to(val.device)
    return torch.randn(shape, generator=generator).to(device=val.device, dtype=val.dtype)


def _example_size(size: torch.SymInt) -> int:
    """A symbolic size as the captured example had it (2 where none is known)."""
    hint = getattr(size.node, "hint", None)
    return int(hint) if isinstance(hint, int) else 2


def _compare(
    site: WeightSite,
    record: Adapter,
    sandbox: fx.GraphModule,
    x: torch.Tensor,
) -> None:
    modes = {m: m.training for m in sandbox.modules()}
    sandbox.eval()  # no dropout
    try:
        with torch.no_grad():
            expected = sandbox(x)
            # the sandbox holds the site's tensors (the adapter's moved) under the graph's names
            weight = format_of(site).read(sandbox, site).float()
            bias = get_tensor(sandbox, site.bias).float() if site.bias else None
            weight, bias = record.method().fold(context(sandbox, record, site), weight, bias)
            target, args = site.functional(
                x, weight.to(expected.dtype), None if bias is None else bias.to(expected.dtype)
            )
            got = target(*args)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    tolerance = (1e-4 if expected.dtype == torch.float32 else 2e-2) * max(scale, 1.0)
    gap = (
        float((got.float() - expected.float()).abs().max())
        if got.shape == expected.shape
        else float("inf")
    )
    if not gap <= tolerance:
        raise PassError(
            f"{record.technique}: its fold does not compute what its rewrite computes at "
            f"{site.path!r} (max |difference| {gap:.3g} on a random input, tolerance "
            f"{tolerance:.2g}); fix the technique's fold() (or delta()): merging it would change "
            "the model's outputs"
        )
