"""Merge as constant folding, and the passes that switch adapters.

    y = W x + b + branch(x)  ->  y = W' x + b,   W' = W + dW   (DoRA: W' = (W + dW) m / ||W + dW||_row)

1. `merge` folds every active adapter (or the one named) into its base weights; the branch
   nodes go, so the graph has exactly the captured base graph's ops. The adapter's
   weights leave the module's parameters; with `keep=true` (the default) they are kept
   in the adapter record so `unmerge` can restore the branch.
2. `unmerge` subtracts dW again and re-inserts the branches.
3. `set_adapter`, `disable_adapters` and `delete_adapter` choose which branches the graph holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from peftc import adapters as registry
from peftc.adapters import adapters, remove_branches, site_for, technique, weight_of
from peftc.errors import OptionError
from peftc.graph import get_tensor, set_tensor
from peftc.passes.nf4 import fold_into_nf4
from peftc.registry import PassResult, register_pass

_NF4_FOLDED = "folded into NF4"

__all__ = ["MergeOptions", "merge", "unmerge", "set_adapter", "disable_adapters", "delete_adapter"]


@dataclass(frozen=True)
class MergeOptions:
    adapter: str | None = None  # default: every active adapter
    keep: bool = True  # keep adapter weights so `unmerge` works
    requantize: bool = False  # NF4 bases: dequantize, add dW, quantize again (stays 4-bit, loses small updates)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # NF4 bases: a dense merged weight instead

    def __post_init__(self) -> None:
        if self.requantize and self.dtype:
            raise OptionError("merge: choose requantize=true (stay NF4) or dtype=... (dense), not both")


@dataclass(frozen=True)
class AdapterName:
    name: str = "default"


@dataclass(frozen=True)
class UnmergeOptions:
    adapter: str | None = None  # default: every merged adapter


@register_pass("merge", options=MergeOptions, preserves_outputs=True)
def merge(gm: fx.GraphModule, options: MergeOptions) -> PassResult:
    """Fold adapters into base weights: `W x + branch(x) -> (W + dW) x`."""
    names = _chosen(gm, options.adapter, lambda r: r["active"] and not r["merged"], "active, unmerged")
    touched: list[str] = []
    survival: list[float] = []
    for name in names:
        record = adapters(gm)[name]
        method = technique(record["technique"])
        sites = [site_for(gm, path, kind) for path, kind in record["sites"]]
        states = {}
        for site in sites:
            with torch.no_grad():
                base = weight_of(gm, site)
                merged, states[site.path] = method.merge(gm, site, name, record["options"], base)
                if getattr(site, "kind", "") == "nf4":  # embedding sites have no kind
                    survival.append(fold_into_nf4(gm, site, merged, base, requantize=options.requantize,
                                                  dtype=options.dtype))
                    states[site.path] = _NF4_FOLDED
                else:
                    _set_weight(gm, site, merged)
            touched.append(site.path)
        remove_branches(gm, name)
        kept = {}
        for site in sites:
            for qualname in method.param_names(gm, site, name, record["options"]):
                kept[qualname] = get_tensor(gm, qualname)
                _pop_tensor(gm, qualname)
        record.update(merged=True, states=states, kept=kept if options.keep else None)
        if not options.keep:
            del adapters(gm)[name]
    report = f"merged {', '.join(names)} into {len(touched)} weights"
    if survival and options.requantize:
        mean = sum(survival) / len(survival)
        report += (f"; requantizing to NF4 kept {mean:.1%} of dW on average (worst {min(survival):.1%})"
                   + ("; prefer merge(dtype=\"float16\") for this update" if mean < 0.9 else ""))
    return PassResult(gm, modified=bool(names), sites=tuple(touched), report=report)


@register_pass("unmerge", options=UnmergeOptions, preserves_outputs=True)
def unmerge(gm: fx.GraphModule, options: UnmergeOptions) -> PassResult:
    """Undo `merge`: `(W + dW) x -> W x + branch(x)`, from the kept adapter weights."""
    names = _chosen(gm, options.adapter, lambda r: r["merged"], "merged")
    touched = []
    for name in names:
        record = adapters(gm)[name]
        if record.get("kept") is None:
            raise OptionError(f"unmerge: adapter {name!r} was merged with keep=false; its weights are gone")
        if _NF4_FOLDED in record["states"].values():
            raise OptionError(f"unmerge: adapter {name!r} was folded into NF4 weights, which cannot be undone exactly")
        for qualname, tensor in record["kept"].items():
            set_tensor(gm, qualname, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
        method = technique(record["technique"])
        for path, kind in record["sites"]:
            site = site_for(gm, path, kind)
            with torch.no_grad():
                base = method.unmerge(gm, site, name, record["options"], weight_of(gm, site), record["states"][path])
            _set_weight(gm, site, base)
            touched.append(path)
        record.update(merged=False, states=None, kept=None, active=False)
        registry.set_active(gm, [n for n, r in adapters(gm).items() if r["active"] and not r["merged"]] + [name])
    return PassResult(gm, modified=bool(names), sites=tuple(touched), report=f"unmerged {', '.join(names)}")


@register_pass("set_adapter", options=AdapterName)
def set_adapter(gm: fx.GraphModule, options: AdapterName) -> PassResult:
    """Make adapter `name` the only active one: its branches in the graph, no others."""
    before = registry.active_adapters(gm)
    registry.set_active(gm, options.name)
    return PassResult(gm, modified=before != [options.name], report=f"active: {options.name}")


@register_pass("disable_adapters")
def disable_adapters(gm: fx.GraphModule) -> PassResult:
    """Remove every unmerged branch from the graph: it computes the base model exactly."""
    before = registry.active_adapters(gm)
    registry.disable(gm)
    return PassResult(gm, modified=bool(before), report="no adapter active")


@register_pass("delete_adapter", options=AdapterName)
def delete_adapter(gm: fx.GraphModule, options: AdapterName) -> PassResult:
    """Delete adapter `name`: its branches, parameters and record."""
    registry.delete(gm, options.name)
    return PassResult(gm, modified=True, report=f"deleted {options.name}")


def _chosen(gm: fx.GraphModule, name: str | None, wanted, what: str) -> list[str]:
    known = adapters(gm)
    if name is not None:
        if name not in known:
            raise OptionError(f"no adapter named {name!r}; adapters: {', '.join(known) or 'none'}")
        if not wanted(known[name]):
            raise OptionError(f"adapter {name!r} is not {what}")
        return [name]
    return [n for n, record in known.items() if wanted(record)]


def _set_weight(gm: fx.GraphModule, site, value) -> None:
    """Replace (never mutate) the base weight, keeping its layout and trainability."""
    old = get_tensor(gm, site.weight)
    value = value.T if getattr(site, "fan_in_fan_out", False) else value
    set_tensor(gm, site.weight, nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad))


def _pop_tensor(gm: fx.GraphModule, qualname: str) -> None:
    owner, _, attr = qualname.rpartition(".")
    module = gm.get_submodule(owner)
    module._parameters.pop(attr, None)
