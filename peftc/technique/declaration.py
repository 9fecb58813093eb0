"""A technique is a declaration; `peftc.adapters` does the rest.

A technique subclasses `Technique` and states:

1. `name` (its pass name, peft's method name in lower case), `options` (a frozen dataclass
   deriving from `AdapterOptions`), `peft_type`, the `site_kinds` it acts on (weight sites:
   `linear`, `conv`, `embedding`, `layer_norm`, `rms_norm`; sublayer sites, a block's residual
   adds: `attention`, `feed_forward`);
2. its `stage` at a site, which fixes how it composes with others there:
   `input` (x -> f(x)), `weight` (W -> f(W, theta), and the bias too if it wants),
   `output` (y -> f(y)), or `add` (y -> y + g(x));
3. `params(ctx)`: its tensors (`Param`: peft's attribute name, shape or value, init);
   `shared_params(ctx)` for tensors one adapter shares across sites (VeRA);
4. `build(b, value)`: the rewrite, written with the `Builder` in standard aten ops;
5. `fold(ctx, W, bias)` or just `delta(ctx)`: how it merges into the base weight and bias
   (raise `NotMergeable` if it does not);
6. `to_peft(options, sites)` / `from_peft(config)`: its `adapter_config.json` fields. `from_peft`
   pops what it reads; the core refuses every other field that is not at a neutral value.

Insertion, tags, the adapter record, switching, deleting, merging, saving and loading are the
core's. `docs/writing-a-technique.md` writes one from scratch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import fx, nn

from peftc.errors import NotMergeable, OptionError
from peftc.ir.graph import get_tensor, qualify, tag
from peftc.sites.formats import format_of, read_weight
from peftc.sites.selection import resolve_sites

__all__ = [
    "AdapterOptions",
    "Builder",
    "Context",
    "NotMergeable",
    "Param",
    "STAGES",
    "Stage",
    "Technique",
    "kaiming_uniform",
]

Stage = Literal["input", "weight", "output", "add"]
STAGES: tuple[Stage, ...] = ("input", "weight", "output", "add")  # the order a site composes them in


@dataclass(frozen=True)
class AdapterOptions:
    """Options every technique has. Subclass with the technique's own fields (all with defaults)."""

    targets: str | None = None  # glob/regex on module paths, "all-linear", or None for peft's default
    adapter: str = "default"
    freeze_base: bool = True  # as peft's get_peft_model: only adapter weights train

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.adapter):
            raise OptionError(f"adapter name must be an identifier (it becomes part of parameter names), got {self.adapter!r}")


@dataclass(frozen=True)
class Param:
    """One adapter tensor at a site: `<site path>.<attr>.<adapter>[.<suffix>]`, peft's in-memory name.

    Give `value` or `shape` (+ `init`, applied in place; zeros if None, skipped on `meta`).
    `dtype` defaults to the site's compute dtype. Frozen tensors (`trainable=False`) are buffers.
    `key` is how `build` and `fold` name it (`b.param(key)`), `attr` unless several tensors share
    an attr (LN tuning's `ln_tuning_layers.<adapter>.weight` and `.bias`).
    """

    attr: str
    shape: tuple[int, ...] = ()
    init: Callable[[torch.Tensor], Any] | None = None
    value: torch.Tensor | None = None
    suffix: str = ""
    trainable: bool = True
    dtype: torch.dtype | None = None
    key: str = ""

    def make(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.value is not None:
            tensor = self.value.detach().to(device=device, dtype=self.dtype or dtype).clone()
        else:
            tensor = torch.zeros(self.shape, dtype=self.dtype or dtype, device=device)
            if self.init is not None and device.type != "meta":
                with torch.no_grad():
                    self.init(tensor)
        return nn.Parameter(tensor) if self.trainable else tensor


def kaiming_uniform(tensor: torch.Tensor) -> None:
    """nn.Linear's default init, which peft uses for its down-projections."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


@dataclass
class Context:
    """What a technique sees at one site: the site, its options, its tensors (by attr), the graph."""

    gm: fx.GraphModule
    site: Any
    options: Any
    names: dict[str, str] = field(default_factory=dict)  # attr -> qualified name

    def tensor(self, attr: str) -> torch.Tensor:
        return get_tensor(self.gm, self.names[attr])

    def weight(self) -> torch.Tensor:
        """The base weight as float, in the op's layout (dequantized for quantized storage)."""
        return read_weight(self.gm, self.site)


class Builder:
    """Adds tagged nodes for one adapter at one site, in order.

    Nodes of the `input` and `weight` stages go before the base op, the others after it.
    Every node carries `meta["peftc"] = {"pass", "role", "adapter", "site"}`.
    """

    def __init__(self, gm: fx.GraphModule, ctx: Context, technique: Technique, cursor: fx.Node, *, before: fx.Node | None,
                 base: fx.Node, x: fx.Node):
        self.gm, self.ctx, self.technique = gm, ctx, technique
        self.site, self.options = ctx.site, ctx.options
        self.cursor, self.before = cursor, before
        self.base, self.x = base, x  # base: the base op's output; x: the site's own input
        self.nodes: list[fx.Node] = []
        self.bias: fx.Node | None = None  # a `weight`-stage technique may replace the bias too
        self._weight: fx.Node | None = None

    def _place(self, make: Callable[[], fx.Node], role: str) -> fx.Node:
        if self.before is not None:
            with self.gm.graph.inserting_before(self.before):
                node = make()
        else:
            with self.gm.graph.inserting_after(self.cursor):
                node = make()
            self.cursor = node
        tag(node, pass_name=self.technique.name, role=role, path=self.site.path, adapter=self.options.adapter,
            site=self.site.path)
        self.nodes.append(node)
        return node

    def get(self, qualname: str, role: str) -> fx.Node:
        return self._place(lambda: self.gm.graph.get_attr(qualname), role)

    def param(self, attr: str) -> fx.Node:
        """The technique's tensor `attr` at this site (or shared by the adapter)."""
        return self.get(self.ctx.names[attr], attr)

    def call(self, target: Any, *args: Any, role: str, **kwargs: Any) -> fx.Node:
        return self._place(lambda: self.gm.graph.call_function(target, args, kwargs), role)

    def module(self, attr: str, *args: Any, role: str) -> fx.Node:
        """Call the technique's module `attr` (e.g. its dropout) registered at `<path>.<attr>.<adapter>`."""
        qualname = qualify(self.site.path, attr, self.options.adapter)
        return self._place(lambda: self.gm.graph.call_module(qualname, args), role)

    def weight(self) -> fx.Node:
        """The base weight as a graph value in the op's layout (dequantized for quantized storage)."""
        if self._weight is None:
            self._weight = format_of(self.site).node(self, self.site)
        return self._weight

    def base_bias(self) -> fx.Node | None:
        return self.get(self.site.bias, "base_bias") if self.site.bias else None


class Technique:
    """Declare a technique: set the class attributes, write `params` and `build`; see the module doc."""

    name: ClassVar[str]
    options: ClassVar[type]
    peft_type: ClassVar[str | None] = None
    site_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    stage: ClassVar[Stage] = "add"
    preserves_outputs: ClassVar[bool] = True  # at init the rewritten model computes what the base did
    mergeable: ClassVar[bool] = True  # False: not a weight update; `merge` leaves it in the graph and says so
    default_targets: ClassVar[dict[str, str] | None] = None  # model family -> pattern; None: LoRA's table
    exclusive: ClassVar[bool] = False  # at most one of its adapters active at a site (it replaces the weight)

    def stage_at(self, site: Any, options: Any) -> Stage:
        return self.stage

    def select(self, gm: fx.GraphModule, options: Any) -> list[tuple[Any, str]]:
        """The sites an adapter acts on, each with the module path its tensors are named under: by default
        the sites `options.targets` selects, each at its own path. Override to adapt more than the selected
        sites (peft's LoRA on nn.MultiheadAttention also adapts its out_proj, under `<mha>.base_layer.out_proj`)."""
        sites = resolve_sites(gm, options.targets, self.name, self.site_kinds, self.default_targets)
        return [(site, site.path) for site in sites]

    def check(self, gm: fx.GraphModule, site: Any, options: Any) -> None:
        """Raise `OptionError` to refuse a site (e.g. an option it does not support there)."""

    def params(self, ctx: Context) -> list[Param]:
        raise NotImplementedError

    def shared_params(self, gm: fx.GraphModule, sites: list[Any], options: Any) -> list[Param]:
        return []

    def modules(self, site: Any, options: Any) -> dict[str, nn.Module]:
        """Submodules the rewrite calls (dropout), registered at `<path>.<attr>.<adapter>`."""
        return {}

    def build(self, b: Builder, value: fx.Node) -> fx.Node:
        """The rewrite. `value` is x (`input`, `add`), W (`weight`) or y (`output`); return its replacement
        (for `add`: the branch added to y)."""
        raise NotImplementedError

    def delta(self, ctx: Context) -> torch.Tensor:
        """dW in the op's weight layout, for `add` techniques whose merge is `W + dW`."""
        raise NotMergeable(f"{self.name} does not fold into the base weight; keep it unmerged or delete it")

    def fold(self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') such that the base op with them computes what this stage computed."""
        return weight + self.delta(ctx).to(weight.dtype), bias

    def checkpoint_key(self, attr_key: str) -> str:
        """peft's key for one tensor, given `<path>.<attr>[.<suffix>]` (the adapter name dropped)."""
        return attr_key

    def saved(self, options: Any, attr: str) -> bool:
        """Whether peft's checkpoint holds tensor `attr`; False for tensors `params` / `shared_params`
        recreate from the options alone (FourierFT's indices, VeRA's projections without save_projection)."""
        return True

    def to_peft(self, options: Any, sites: list[Any]) -> dict[str, Any]:
        """The technique's `adapter_config.json` fields (peft_type and target_modules are the core's)."""
        return {}

    def from_peft(self, config: dict[str, Any]) -> dict[str, Any]:
        """Options from an `adapter_config.json`; pop every field read."""
        return {}

    def after_insert(self, gm: fx.GraphModule, sites: list[Any], options: Any) -> None:
        """Anything beyond the sites (LoRA's `bias="all"` trains biases)."""

    def describe(self, options: Any, sites: list[Any]) -> str:
        return f"{self.name} on {len(sites)} sites, adapter {options.adapter!r}"
