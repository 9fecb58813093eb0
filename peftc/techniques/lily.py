"""LiLy: low-rank A's shared by neighbouring layers, B's mixed by a router, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + s (h @ sum_e p_e B_e),   h = A x,
                     p = mean over every token of softmax(router(h))

1. Sites are grouped as peft groups them: by the target name a site's path ends with (peft's
   `target_modules` list; a regex string is one name for all) and by its weight's shape. Within a
   group, in graph order, each run of `stride_A` consecutive sites shares one `lily_A` (r, in), and
   all share one `lily_B` (num_B r, out), read as num_B blocks B_e (r, out); each site trains its
   own `lily_router` (num_B, r). peft orders a group by module registration, which is graph order
   for models that call their layers in the order they define them (transformers' models do).
2. The router mixes the B's by its probabilities averaged over the whole batch, so the update
   depends on the input: peft does not merge it, and `merge` leaves it in the graph.
3. peft's `init_weights=true` starts B at zero (the identity); `false` draws it Kaiming-uniform, as
   A and the router always are. Over a float16/bfloat16 base the term is computed in float32 and
   cast to the base dtype before it is added, as peft does.
4. Dense nn.Linear sites only, as peft: GPT-2's Conv1D, nn.MultiheadAttention's projections and
   quantized weights are refused, and so are targets peft has no grouping for (a glob beyond
   `name` / `*.name` alternatives, or a path ending with two of the names).
Tensors: the router at `<path>.lily_router.<adapter>.weight`; the shared A's and B's are the
adapter's shared tensors, each at its first site, `<path>.lily_A.<adapter>.weight`, peft's name.
peft's checkpoint holds them once per site (`base_model.model.<path>.lily_A.weight`): saving writes
every copy, loading reads the first site's. The config's `target_modules` are the names the groups
come from, with `exclude_modules`, so that peft rebuilds the same groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.targets import names_pattern
from peftc.sites.formats import format_of
from peftc.sites.selection import default_targets, resolve_sites
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    kaiming_uniform,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["LilyOptions", "Lily"]

aten = torch.ops.aten
SHARED = ("lily_A", "lily_B")


def _two_or_more(value: int) -> str | None:
    return None if value >= 2 else "at least 2 (peft: the router needs two B's to mix)"


@dataclass(frozen=True)
class LilyOptions(AdapterOptions):
    r: int = rank_option(32, "rank of each A (r x in) and of each of the num_B B's (r x out)")
    stride_A: int = option(
        1, doc="consecutive sites of one group sharing one A", check=positive, peft="stride_A"
    )
    num_B: int = option(
        2, doc="B's shared by a group, mixed by its routers", check=_two_or_more, peft="num_B"
    )
    scaling: float = option(1.0, doc="the update's multiplier", peft="scaling")
    init_weights: bool = option(
        True,
        doc="B = 0 (the identity at init); false: B Kaiming-uniform, as A and the router",
        peft="init_weights",
    )


def peft_targets(targets: str) -> str | tuple[str, ...]:
    """peft's `target_modules` for `targets`: a `re:` pattern's regex, else the names of its
    `name` / `*.name` alternatives; any other glob has no peft grouping and is refused."""
    if targets.startswith("re:"):
        return targets[3:]
    names = [g.strip().removeprefix("*.") for g in targets.split("|") if g.strip()]
    odd = [n for n in names if any(c in n for c in "*?[]")]
    if odd:
        raise OptionError(
            f"lily: targets {targets!r} has the glob {odd[0]!r}; LiLy groups its sites by peft's "
            "target_modules names, so give names ('q_proj|v_proj' or '*.q_proj|*.v_proj'), a "
            "'re:' regex or all-linear"
        )
    return tuple(dict.fromkeys(names))


def _name_of(path: str, names: tuple[str, ...]) -> str:
    """The target name peft groups `path` under: the one it ends with (peft's `endswith`)."""
    ends = [n for n in names if path.endswith(n)]
    if len(ends) != 1:
        raise OptionError(
            f"lily: {path!r} ends with the targets {ends}; peft groups it under whichever its set "
            "of target names yields last, so give target names none of which ends another"
        )
    return ends[0]


def groups(sites: list[Any], options: LilyOptions) -> list[list[Any]]:
    """The sites that share one B, each list in graph order (case 1)."""
    targets = peft_targets(options.targets)
    found: dict[tuple, list[Any]] = {}
    for site in sites:
        name = targets if isinstance(targets, str) else _name_of(site.path, targets)
        found.setdefault((name, site.out_features, site.in_features), []).append(site)
    return list(found.values())


def _key(attr: str, members: list[Any]) -> str:
    """How `build` finds a shared tensor: its attr and the paths of the sites sharing it."""
    return f"{attr}:{','.join(s.path for s in members)}"


def _members(key: str) -> list[str]:
    return key.partition(":")[2].split(",")


def _shared(ctx: Context, attr: str) -> str:
    """The key of the shared tensor `attr` this site reads."""
    path = ctx.site.path
    return next(k for k in ctx.names if k.startswith(f"{attr}:") and path in _members(k))


@register_technique
class Lily(Technique):
    """Insert LiLy branches: `y = W x + b -> y = W x + b + s A x @ mix(B)`, A shared by neighbouring
    sites, the B's by all sites of a group, mixed by each site's router."""

    name = "lily"
    half_precision = "float32"
    options = LilyOptions
    peft_type = "LILY"
    mergeable = False  # the router's mix depends on the batch (case 2)

    def resolve_options(self, gm: fx.GraphModule, options: LilyOptions) -> LilyOptions:
        # spelled as peft's names: the architecture's defaults, all-linear's leaf names
        targets = options.targets
        if targets is None:
            targets = default_targets(gm, self.name, self.targets_table)
        elif targets == "all-linear":
            sites = resolve_sites(gm, targets, self.name, self.site_kinds)
            targets = names_pattern(sorted({s.path.rpartition(".")[2] for s in sites}))
        names = peft_targets(targets)
        targets = targets if isinstance(names, str) else names_pattern(names)
        return dataclasses.replace(options, targets=targets)

    def check(self, gm: fx.GraphModule, site: Any, options: LilyOptions) -> None:
        mha = multihead_attention(site)
        fmt = format_of(site).name
        if getattr(site, "fan_in_fan_out", False) or mha or fmt != "dense":
            what = (
                f"nn.MultiheadAttention {mha[1]!r}"
                if mha
                else f"the {fmt} weight of {site.path!r}"
                if fmt != "dense"
                else f"GPT-2's Conv1D {site.path!r}"
            )
            raise OptionError(
                f"lily: peftc implements peft's LiLy on dense nn.Linear layers, not {what}; "
                "exclude it from targets"
            )

    def check_options_at(self, gm: fx.GraphModule, options: LilyOptions, sites: list) -> None:
        groups(sites, options)  # refuses ambiguous target names before anything changes

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: LilyOptions
    ) -> list[Param]:
        o, params = options, []
        for members in groups(sites, o):
            first = members[0]
            params.append(
                Param(
                    f"{first.path}.lily_B",
                    (o.num_B * o.r, first.out_features),
                    init=None if o.init_weights else kaiming_uniform,
                    suffix="weight",
                    key=_key("lily_B", members),
                )
            )
            for start in range(0, len(members), o.stride_A):
                run = members[start : start + o.stride_A]
                params.append(
                    Param(
                        f"{run[0].path}.lily_A",
                        (o.r, first.in_features),
                        init=kaiming_uniform,
                        suffix="weight",
                        key=_key("lily_A", run),
                    )
                )
        return params

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        return [Param("lily_router", (o.num_B, o.r), init=kaiming_uniform, suffix="weight")]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        o, names = b.options, b.ctx.names
        hidden = b.call(
            aten.linear.default, x, b.get(names[_shared(b.ctx, "lily_A")], "lily_A"), role="hidden"
        )
        logits = b.call(aten.linear.default, hidden, b.param("lily_router"), role="router")
        probs = b.call(aten.softmax.int, logits, -1, role="router_probability")
        flat = b.call(aten.reshape.default, probs, [-1, o.num_B], role="router_flat")
        mix = b.call(aten.mean.dim, flat, [0], role="expert_probabilities")
        B = b.get(names[_shared(b.ctx, "lily_B")], "lily_B")
        blocks = b.call(aten.reshape.default, B, [o.num_B, o.r, b.site.out_features], role="B_e")
        combined = b.call(aten.einsum.default, "e,eio->io", [mix, blocks], role="combined_B")
        delta = b.call(aten.matmul.default, hidden, combined, role="delta")
        term = b.call(aten.mul.Tensor, delta, o.scaling, role="lily")
        if not b.ctx.upcast:
            return term
        # peft casts the term to the base dtype before adding it
        return b.call(aten._to_copy.default, term, dtype=b.ctx.base_dtype, role="lily_downcast")

    def checkpoint_key(self, key: str) -> str:
        # the shared A's and B's are peft's per-site tensors, named by their first site
        if key.endswith((".lily_A.weight", ".lily_B.weight")):
            return "base_model.model." + key.removeprefix("base_model.")
        return key

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # peft's layers each hold their group's A and B, so its file repeats them at every site
        copies = {}
        for key in ctx.names:
            attr, _, _ = key.partition(":")
            if attr not in SHARED:
                continue
            first, *rest = _members(key)
            value = tensors[f"base_model.model.{first}.{attr}.weight"]
            copies.update({f"base_model.model.{p}.{attr}.weight": value.clone() for p in rest})
        return {**tensors, **copies}

    def to_peft(self, options: LilyOptions, sites: list[Any]) -> dict[str, Any]:
        # the names the groups come from, not the adapted paths: peft regroups by them
        names = peft_targets(options.targets)
        exclude = options.exclude_modules
        return {
            "target_modules": names if isinstance(names, str) else sorted(names),
            "exclude_modules": list(exclude) if isinstance(exclude, tuple) else exclude,
        }

    def describe(self, options: LilyOptions, sites: list[Any]) -> str:
        return (
            f"LiLy r={options.r}, stride_A={options.stride_A}, num_B={options.num_B} on "
            f"{len(sites)} sites in {len(groups(sites, options))} groups, adapter "
            f"{options.adapter!r}"
        )
