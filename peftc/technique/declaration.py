"""A technique is a declaration; the technique layer's core (`peftc.technique.adapters`) does the
rest.

A technique subclasses `Technique` and states:

1. `name` (its pass name; peft's method name in lower case), `options` (a frozen dataclass deriving
   `AdapterOptions`, fields made with `option(...)`: peft's name, default and checks per field),
   `peft_type`, and the `site_kinds` it acts on: weight sites (`linear`, `conv`, `embedding`,
   `layer_norm`, `rms_norm`), sublayer sites (a block's residual add: `attention`, `feed_forward`),
   `tokens` (the token embedding of the input ids), `sdpa` (each attention op), `final_hidden` (the
   stream entering the head);
2. its `stage` at a site, which fixes how it composes with the others there (`STAGES`, in order):
   `input` (x -> f(x) before the op; at `sdpa` sites the op's operands, changed with `b.rewrite`),
   `weight` (W -> f(W), and the bias if it wants), `output` (y -> f(y)), `add` (y -> y + g(x)),
   `final` (the whole result -> f(result), additive terms included);
3. `params(ctx)`: its tensors (`Param`: peft's attribute name, shape or value, init);
   `shared_params(gm, sites, options)` for tensors one adapter shares across its sites (saved as
   `base_model.<attr>`, peft's rule for VeRA's projections); `modules(ctx)` for submodules it calls
   or whose parameters it trains (dropout, P-tuning's encoder, a side network);
4. `build(b, value)`: the rewrite, written with the `Builder` in standard aten ops;
5. `fold(ctx, W, bias)` or just `delta(ctx)`: how it merges into the base weight and bias (raise
   `NotMergeable` if it cannot; `mergeable = False` if it never is a weight update). The first merge
   on a graph checks the fold against the unmerged rewrite numerically.

Insertion, tags, the adapter record, switching, deleting, merging, saving and loading are the
core's. `docs/writing-a-technique.md` writes one from scratch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import fx, nn

from peftc.errors import NotMergeable, OptionError
from peftc.ir.graph import get_tensor, qualify, tag
from peftc.ir.rewrites import captured_name, keep_original
from peftc.sites.formats import format_of, read_weight
from peftc.sites.selection import resolve_sites
from peftc.technique.options import at_site, unmatched_patterns

__all__ = [
    "Builder",
    "Context",
    "NotMergeable",
    "Param",
    "STAGES",
    "Stage",
    "Technique",
    "kaiming_uniform",
]

Stage = Literal["input", "weight", "output", "add", "final"]
# the order a site composes them in
STAGES: tuple[Stage, ...] = (
    "input",
    "weight",
    "output",
    "add",
    "final",
)


@dataclass(frozen=True)
class Param:
    """One adapter tensor at a site: `<site path>.<attr>.<adapter>[.<suffix>]`, peft's in-memory
    name.

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
    """What a technique sees at one site: the site, its options, its tensors and modules (by attr),
    the graph."""

    gm: fx.GraphModule
    site: Any
    options: Any
    names: dict[str, str] = field(default_factory=dict)  # attr -> qualified tensor name
    modules: dict[str, str] = field(default_factory=dict)  # attr -> qualified module name
    # every (path, kind) the adapter acts on, in graph order
    sites: tuple[tuple[str, str], ...] = ()
    # the adapter's tensors' dtype here, and the op's: float32 over a float16/bfloat16 base, as
    # peft's autocast_adapter_dtype keeps them (`upcast`: the input and base weight are cast to it)
    dtype: torch.dtype = torch.float32
    base_dtype: torch.dtype = torch.float32

    @property
    def upcast(self) -> bool:
        return self.dtype != self.base_dtype

    @property
    def index(self) -> int:
        """This site's position among the adapter's sites (prefix tuning's layer)."""
        return self.sites.index((self.site.path, self.site.kind))

    def tensor(self, attr: str) -> torch.Tensor:
        return get_tensor(self.gm, self.names[attr])

    def module(self, attr: str) -> nn.Module:
        return self.gm.get_submodule(self.modules[attr])

    def weight(self) -> torch.Tensor:
        """The base weight as float, in the op's layout (dequantized for quantized storage)."""
        return read_weight(self.gm, self.site)


class Builder:
    """Adds tagged nodes for one adapter at one site.

    Nodes go before the site's op for the `input` and `weight` stages, after it (in order) for the
    others, or after any node inside `with b.at(node):`. Every node carries
    `meta["peftc"] = {"pass", "role", "adapter", "site", "kind"}`; the core strips them all when it
    rebuilds the site, undoing `reroute` and `rewrite` too.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        ctx: Context,
        technique: Technique,
        *,
        base: fx.Node,
        x: Any,
        before: fx.Node | None,
        cursor: fx.Node,
        memo: dict[tuple[str, Any], Any],
    ):
        self.gm, self.ctx, self.technique = gm, ctx, technique
        self.site, self.options = ctx.site, ctx.options
        # base: the site's op; x: its own input (None where it has several operands)
        self.base, self.x = (
            base,
            x,
        )
        self.nodes: list[fx.Node] = []
        self.bias: fx.Node | None = None  # a `weight`-stage technique may replace the bias too
        self._weight: fx.Node | None = None
        self._before, self.cursor, self._at = before, cursor, None
        self._memo, self._shared = memo, False

    def _place(self, make: Callable[[], fx.Node], role: str) -> fx.Node:
        graph = self.gm.graph
        if self._at is not None:
            with graph.inserting_after(self._at):
                node = make()
            self._at = node
        elif self._before is not None:
            with graph.inserting_before(self._before):
                node = make()
        else:
            with graph.inserting_after(self.cursor):
                node = make()
            self.cursor = node
        tag(
            node,
            pass_name=self.technique.name,
            role=role,
            path=self.site.path,
            adapter=self.options.adapter,
            site=None if self._shared else self.site.path,
            kind=None if self._shared else self.site.kind,
        )
        self.nodes.append(node)
        return node

    @contextlib.contextmanager
    def at(self, node: fx.Node) -> Iterator[None]:
        """Insert the nodes made inside right after `node`, in order (an input's extension, a
        shifted position)."""
        saved, self._at = self._at, node
        try:
            yield
        finally:
            self._at = saved

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()`'s result, made once for all of this adapter's sites (prefix tuning's keys and
        values): its nodes belong to the adapter, and every site of the adapter is rebuilt with
        them."""
        memo_key = (self.options.adapter, key)
        if memo_key not in self._memo:
            shared, self._shared = self._shared, True
            try:
                self._memo[memo_key] = make()
            finally:
                self._shared = shared
        return self._memo[memo_key]

    def get(self, qualname: str, role: str) -> fx.Node:
        return self._place(lambda: self.gm.graph.get_attr(qualname), role)

    def param(self, attr: str) -> fx.Node:
        """The technique's tensor `attr` at this site (or shared by the adapter)."""
        return self.get(self.ctx.names[attr], attr)

    def call(self, target: Any, *args: Any, role: str, **kwargs: Any) -> fx.Node:
        return self._place(lambda: self.gm.graph.call_function(target, args, kwargs), role)

    def module(self, attr: str, *args: Any, role: str, **kwargs: Any) -> fx.Node:
        """Call the technique's module `attr` (e.g. its dropout), registered at
        `<path>.<attr>.<adapter>`, with `args` and keyword arguments `kwargs`."""
        qualname = self.ctx.modules[attr]
        return self._place(lambda: self.gm.graph.call_module(qualname, args, kwargs), role)

    def node(
        self, op: str, target: Any, args: tuple, kwargs: dict[str, Any], *, role: str
    ) -> fx.Node:
        """A node of any kind (`call_function`, `call_module` of a module the graph calls,
        `get_attr`): for a technique that runs part of the captured forward again."""
        graph = self.gm.graph
        return self._place(lambda: graph.create_node(op, target, args, kwargs), role)

    def weight(self) -> fx.Node:
        """The base weight as a graph value in the op's layout (dequantized for quantized
        storage)."""
        if self._weight is None:
            self._weight = format_of(self.site).node(self, self.site)
            if self.ctx.upcast:  # peft: weight.to(x.dtype)
                self._weight = self.as_adapter(self._weight, "base_weight_upcast")
        return self._weight

    def as_adapter(self, value: fx.Node, role: str) -> fx.Node:
        """`value` in the dtype the adapter's tensors have when the graph runs (float32 over a
        half-precision base; FSDP's mixed precision may cast them), as peft reads `lora_A.dtype`."""
        tensors = [
            a for a, q in self.ctx.names.items() if get_tensor(self.gm, q).is_floating_point()
        ]
        return self.call(torch.ops.aten.type_as.default, value, self.param(tensors[0]), role=role)

    def base_bias(self) -> fx.Node | None:
        return self.get(self.site.bias, "base_bias") if self.site.bias else None

    def reroute(self, old: fx.Node, new: fx.Node, *, users: set[fx.Node] | None = None) -> fx.Node:
        """Give `old`'s users `new` instead (all but this build's own nodes, or only `users`); the
        core gives them `old` back when it strips the site."""
        mine = set(self.nodes)
        for user in [
            u for u in old.users if u not in mine and u is not new and (users is None or u in users)
        ]:
            user.replace_input_with(old, new)
        new.meta["peftc"]["exit"] = captured_name(old)
        if users is not None:
            new.meta["peftc"]["partial"] = True
        return new

    def retarget(self, node: fx.Node, target: str) -> None:
        """Point a `get_attr` or `call_module` node at another tensor or module (a module copy); put
        back when the core strips the site."""
        keep_original(node, site=self.site.path, kind=self.site.kind)
        node.target = target

    def rewrite(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Call the site's op with other arguments (attention's keys, values and mask); the captured
        call is kept and put back when the core strips the site."""
        keep_original(self.base, site=self.site.path, kind=self.site.kind)
        self.base.args, self.base.kwargs = tuple(args), dict(kwargs)


class Technique:
    """Declare a technique: set the class attributes, write `params` and `build`; see the module
    doc."""

    name: ClassVar[str]
    options: ClassVar[type]
    peft_type: ClassVar[str | None] = None  # None: saved in peftc's format (its options as JSON)
    # peft types whose checkpoints load as this; None: peft_type
    peft_loads: ClassVar[tuple[str, ...] | None] = None
    # peft fields it implements at one value: written so, refused otherwise
    peft_fixed: ClassVar[dict[str, Any]] = {}
    # peft fields that change nothing here (read from the graph, init)
    peft_ignored: ClassVar[tuple[str, ...]] = ()
    site_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    stage: ClassVar[Stage] = "add"
    # at init the rewritten model computes what the base did
    preserves_outputs: ClassVar[bool] = True
    # False: not a weight update; `merge` leaves it in the graph and says so
    mergeable: ClassVar[bool] = True
    # at most one active adapter of an exclusive technique per site
    exclusive: ClassVar[bool] = False
    # on a float16/bfloat16 base, with autocast_adapter_dtype (peft's default): "float32": peft
    # upcasts its tensors, and at `add` stages the core computes its term from x in float32 and
    # adds it as peft does (the technique casts at other stages); "base": peft leaves them in the
    # base dtype; None: how peft computes it there is not implemented, so it is refused there
    half_precision: ClassVar[Literal["float32", "base"] | None] = None
    # one of peft's prompt-learning methods, whose checkpoints name module copies (a classifier
    # head) `base_model.<path>` rather than `base_model.model.<path>`
    prompt_learning: ClassVar[bool] = False

    def stage_at(self, site: Any, options: Any) -> Stage:
        return self.stage

    @property
    def targets_table(self) -> str:
        """peft's per-family table of this technique's default targets
        (`TRANSFORMERS_MODELS_TO_<it>_MODULES_MAPPING`): its peft type's, LoRA's without one."""
        return f"{(self.peft_type or 'LORA').replace('_', '')}_TARGET"

    def resolve_options(self, gm: fx.GraphModule, options: Any) -> Any:
        """The options as they apply to this graph, kept in the adapter's record and checkpoint (by
        default as given; LoRA spells peft's all-linear out on mixture-of-experts families)."""
        return options

    def select(self, gm: fx.GraphModule, options: Any) -> list[tuple[Any, str]]:
        """The sites an adapter acts on, each with the module path its tensors are named under: by
        default the sites `options.targets` selects, each at its own path. Override to adapt more
        than the selected sites (peft's LoRA on nn.MultiheadAttention also adapts its out_proj,
        under `<mha>.base_layer.out_proj`)."""
        sites = resolve_sites(gm, options.targets, self.name, self.site_kinds, self.targets_table)
        return [(site, site.path) for site in sites]

    def check(self, gm: fx.GraphModule, site: Any, options: Any) -> None:
        """Raise `OptionError` to refuse a site (e.g. an option it does not support there)."""

    def options_at(self, site: Any, options: Any) -> Any:
        """The options at one site: the adapter's, or their own (peft's rank_pattern and
        alpha_pattern give a site its rank and alpha, `PatternOptions`); `ctx.options` and
        `b.options` are these."""
        return at_site(options, self.peft_key(site))

    def peft_key(self, site: Any) -> str:
        """The module path peft matches patterns against at `site`."""
        return site.path

    def check_options_at(self, gm: fx.GraphModule, options: Any, sites: list[Any]) -> None:
        """Per-site options that reach no site: peft ignores such rank_pattern / alpha_pattern
        keys with a warning, so does peftc."""
        unmatched = unmatched_patterns(options, [self.peft_key(s) for s in sites])
        if unmatched:
            warnings.warn(
                f"{self.name}: rank_pattern / alpha_pattern keys {unmatched} match no site and are "
                "ignored, as peft ignores them",
                stacklevel=2,
            )

    def params(self, ctx: Context) -> list[Param]:
        return []

    def shared_params(self, gm: fx.GraphModule, sites: list[Any], options: Any) -> list[Param]:
        return []

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        """Submodules at `<path>.<attr>.<adapter>`: called by the rewrite (dropout) or holding its
        parameters; they follow the graph's train/eval mode and their parameters are the
        adapter's."""
        return {}

    def shared_modules(
        self, gm: fx.GraphModule, sites: list[Any], options: Any
    ) -> dict[str, nn.Module]:
        """Submodules one adapter shares across its sites, at `<attr>.<adapter>` (every site's
        `ctx.modules` has them); their tensors are saved as `base_model.<attr>.<name>`."""
        return {}

    def build(self, b: Builder, value: Any) -> Any:
        """The rewrite. `value` is x (`input`, `add`; the op at `sdpa` sites), W (`weight`) or the
        result so far (`output`, `final`); return its replacement (for `add`: the term added to
        y)."""
        raise NotImplementedError

    def delta(self, ctx: Context) -> torch.Tensor:
        """dW in the op's weight layout, for `add` techniques whose merge is `W + dW`."""
        raise NotMergeable(
            f"{self.name} does not fold into the base weight; keep it unmerged or delete it"
        )

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') such that the base op with them computes what this stage computed."""
        return weight + self.delta(ctx).to(weight.dtype), bias

    def module_key(self, prefix: str, attr: str, name: str) -> str:
        """The name (before `checkpoint_key`) of tensor `name` of module `attr` at `prefix`."""
        return qualify(prefix, attr, name)

    def checkpoint_key(self, key: str) -> str:
        """peft's key for one tensor, given `base_model.model.<path>.<attr>[.<suffix>]` (the adapter
        name dropped; shared tensors: `base_model.<attr>`)."""
        return key

    def saved(self, options: Any, attr: str) -> bool:
        """Whether peft's checkpoint holds tensor `attr`; False for tensors `params` /
        `shared_params` recreate from the options alone (FourierFT's indices, VeRA's projections
        without save_projection)."""
        return True

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The tensors peft's checkpoint holds, from the adapter's own (by checkpoint key): the same
        by default; P-tuning and projected prefixes save their encoder's output, as peft does."""
        return tensors

    def from_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The adapter's own tensors (by checkpoint key) from what peft's file holds: the inverse of
        `to_checkpoint` where peft saves one tensor for several, or a compressed form of one."""
        return tensors

    def as_lora(self, options: Any, tensors: dict[str, torch.Tensor]) -> tuple[dict, Any]:
        """(tensors by qualified name, options) of the adapter as a plain LoRA on the original base,
        for an adapter whose init rewrote the base (PiSSA); `save_adapter(..., as_lora=True)`."""
        raise OptionError(
            f"{self.name}: as_lora converts LoRA adapters initialised with pissa or olora; save "
            "this one as it is"
        )

    def to_peft(self, options: Any, sites: list[Any]) -> dict[str, Any]:
        """`adapter_config.json` fields beyond those the options declare (read from the sites,
        say)."""
        return {}

    def from_shapes(
        self, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, Any]:
        """Options the checkpoint's tensor shapes (by key) decide where its config does not (peft
        computes BOFT without its butterfly when its CUDA extension is missing); pop each field
        read."""
        return {}

    def from_folder(self, config: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The config of the checkpoint in `folder` as the options read it: `config` itself, or
        pointed at what `to_folder` wrote there."""
        return config

    def to_folder(self, options: Any, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        """Write what the checkpoint holds beside `adapter_model.safetensors` (checkpoints of
        its own that an adapter loads from files); `tensors`: every tensor of the adapter by
        checkpoint key, those `saved` leaves out of that file too."""

    def from_peft(self, config: dict[str, Any]) -> dict[str, Any]:
        """Options from `adapter_config.json` fields the options do not declare one to one; pop each
        field read."""
        return {}

    def after_insert(self, gm: fx.GraphModule, sites: list[Any], options: Any) -> None:
        """Anything beyond the sites (LoRA's `bias="all"` trains biases)."""

    def describe(self, options: Any, sites: list[Any]) -> str:
        return f"{self.name} on {len(sites)} sites, adapter {options.adapter!r}"
