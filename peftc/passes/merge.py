"""Merge as constant folding, and the passes that switch adapters.

    y = W x + b + branch(x)  ->  y = W' x + b',   (W', b') = fold(W, b)   (LoRA: W' = W + s B A)

1. `merge` folds every active adapter (or the one named) into its sites' base weights, as its
   technique's `fold` says (techniques that are not weight updates, bottleneck adapters, stay and
   the report says so); the adapter nodes go, so the graph has the captured base graph's
   ops. The adapter's tensors leave the module; with `keep=true` (the default) they are kept
   in the adapter record, with the sites' original weights, so `unmerge` restores them exactly.
2. `unmerge` restores the original weights, folds in the adapters still merged, and re-inserts
   the branches.
3. `set_adapter`, `disable_adapters` and `delete_adapter` choose which adapters the graph holds.
Each fails with the adapters that exist when there is nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx

from peftc.errors import OptionError
from peftc.ir.options import Options, option
from peftc.ir.registry import PassResult, register_pass
from peftc.technique import adapters as core
from peftc.technique import merge as merging
from peftc.technique.adapters import adapters

__all__ = ["MergeOptions", "merge", "unmerge", "set_adapter", "disable_adapters", "delete_adapter"]


@dataclass(frozen=True)
class MergeOptions(Options):
    adapter: str | None = option(None, doc="the adapter to merge (None: every active one)")
    keep: bool = option(
        True, doc="keep the adapter's weights and the original base weights, so `unmerge` works"
    )
    requantize: bool = option(
        False, doc="NF4 bases: dequantize, fold, quantize again (stays 4-bit, loses small updates)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = option(
        None, doc="NF4 bases: a dense merged weight of this dtype instead"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.requantize and self.dtype:
            raise OptionError(
                "merge: choose requantize=true (stay NF4) or dtype=... (dense), not both"
            )


@dataclass(frozen=True)
class SetAdapterOptions(Options):
    name: str = option(
        "default", doc="the adapter to make the only active one", aliases=("adapter",)
    )


@dataclass(frozen=True)
class DeleteAdapterOptions(Options):
    name: str = option("default", doc="the adapter to delete", aliases=("adapter",))


@dataclass(frozen=True)
class UnmergeOptions(Options):
    adapter: str | None = option(None, doc="the adapter to unmerge (None: every merged one)")


@register_pass("merge", options=MergeOptions, preserves_outputs=True)
def merge(gm: fx.GraphModule, options: MergeOptions) -> PassResult:
    """Fold adapters into base weights: `W x + branch(x) -> W' x`, W' = fold(W)."""
    chosen = _chosen(
        gm, options.adapter, lambda r: r.active and not r.merged, "active and unmerged", "merge"
    )
    names = [n for n in chosen if adapters(gm)[n].method().mergeable]
    stays = [f"{n} ({adapters(gm)[n].technique})" for n in chosen if n not in names]
    kept = (
        f"{', '.join(stays)} stay{'s' if len(stays) == 1 else ''} in the graph: not a weight "
        "update, nothing to fold"
    )
    if not names:
        return PassResult(gm, modified=False, report=f"nothing merged: {kept}")
    touched, survival = merging.merge_adapters(gm, names, options)
    report = f"merged {', '.join(names)} into {len(touched)} weights" + (
        f"; {kept}" if stays else ""
    )
    if survival and options.requantize:
        mean = sum(survival) / len(survival)
        report += (
            f"; requantizing to NF4 kept {mean:.1%} of dW on average (worst {min(survival):.1%})"
            + ('; prefer merge(dtype="float16") for this update' if mean < 0.9 else "")
        )
    return PassResult(gm, modified=True, sites=tuple(touched), report=report)


@register_pass("unmerge", options=UnmergeOptions, preserves_outputs=True)
def unmerge(gm: fx.GraphModule, options: UnmergeOptions) -> PassResult:
    """Undo `merge`: `W' x -> W x + branch(x)`, from the kept weights."""
    names = _chosen(gm, options.adapter, lambda r: r.merged, "merged", "unmerge")
    touched = merging.unmerge_adapters(gm, names)
    return PassResult(
        gm, modified=True, sites=tuple(touched), report=f"unmerged {', '.join(names)}"
    )


@register_pass("set_adapter", options=SetAdapterOptions)
def set_adapter(gm: fx.GraphModule, options: SetAdapterOptions) -> PassResult:
    """Make adapter `name` the only active one: its branches in the graph, no other unmerged
    ones."""
    before = core.active_adapters(gm)
    core.set_active(gm, options.name)
    changed = before != [options.name]
    return PassResult(
        gm,
        modified=changed,
        report=f"active: {options.name}" + ("" if changed else " (already the only one)"),
    )


@register_pass("disable_adapters")
def disable_adapters(gm: fx.GraphModule) -> PassResult:
    """Remove every unmerged branch from the graph: it computes the base model (and merged adapters)
    exactly."""
    before = core.active_adapters(gm)
    core.disable(gm)
    return PassResult(
        gm, modified=bool(before), report="no adapter active" if before else "no adapter was active"
    )


@register_pass("delete_adapter", options=DeleteAdapterOptions)
def delete_adapter(gm: fx.GraphModule, options: DeleteAdapterOptions) -> PassResult:
    """Delete adapter `name`: its branches, tensors and record."""
    core.delete(gm, options.name)
    return PassResult(gm, modified=True, report=f"deleted {options.name}")


def _chosen(gm: fx.GraphModule, name: str | None, wanted, what: str, pass_name: str) -> list[str]:
    known = adapters(gm)
    listing = (
        ", ".join(
            f"{n} ({r.technique}, {'merged' if r.merged else 'active' if r.active else 'inactive'})"
            for n, r in known.items()
        )
        or "none"
    )
    if name is not None:
        if name not in known:
            raise OptionError(f"{pass_name}: no adapter named {name!r}; adapters: {listing}")
        if not wanted(known[name]):
            raise OptionError(f"{pass_name}: adapter {name!r} is not {what}; adapters: {listing}")
        return [name]
    chosen = [n for n, record in known.items() if wanted(record)]
    if not chosen:
        raise OptionError(
            f"{pass_name}: nothing to {pass_name}: no adapter is {what}; adapters: {listing}"
        )
    return chosen
