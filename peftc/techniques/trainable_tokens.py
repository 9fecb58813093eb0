"""Trainable tokens: chosen rows of an embedding (or of a linear's weight) trained in place, as HF
peft's TrainableTokensLayer (new tokens added to a vocabulary, a chat template's special tokens).

    W -> W.index_copy(0, indices, delta)          delta (len(indices), dim), starts as W[indices]

1. The site is the weight as the graph reads it (a parameter site), so every reader sees the new
   rows: an LM head tied to the input embeddings (GPT-2) gets them too, as peft ties its wrapper
   to the embedding's (`tie_word_embeddings`).
2. `targets` names the module by the end of its path, as peft; by default the input embeddings.
3. Merging writes the rows into W (unmerging restores them). peft's checkpoint holds
   `<module>.trainable_tokens_delta`, and the same tensor under each module tied to it.
4. LoRA's `trainable_token_indices` ({module: indices}, or indices of the input embeddings) trains
   the same rows beside its branches, under `<module>.token_adapter` (`token_rows` below).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.targets import compile_pattern
from peftc.sites.parameters import ParameterSite, parameter_sites
from peftc.sites.regions import input_embeddings
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    register_technique,
)

__all__ = [
    "TrainableTokensOptions",
    "TrainableTokens",
    "token_modules",
    "token_placements",
    "token_rows",
    "token_params",
    "replace_rows",
    "fold_rows",
]

aten = torch.ops.aten


def _indices(value: Any) -> str | None:
    ok = isinstance(value, tuple) and all(isinstance(i, int) and i >= 0 for i in value)
    return None if ok and value and len(set(value)) == len(value) else "distinct token ids"


@dataclass(frozen=True)
class TrainableTokensOptions(AdapterOptions):
    token_indices: tuple[int, ...] = option(
        (),
        doc="the token ids whose rows are trained (distinct)",
        check=_indices,
        peft="token_indices",
    )
    init: bool = option(
        True,
        doc="start from the rows' current values (false: random normal, as peft's init_weights)",
        peft="init_weights",
    )


def _weights(gm: fx.GraphModule) -> dict[str, ParameterSite]:
    """Module path -> the site of its `.weight`, under every name of the tensor (tied weights)."""
    return {
        name.rpartition(".")[0]: site
        for site in parameter_sites(gm)
        for name in (site.path, *site.aliases)
        if name.endswith(".weight")
    }


def token_modules(gm: fx.GraphModule, match: Callable[[str], bool] | None) -> list[str]:
    """The modules `match` selects (one per weight: tied modules are one), or the input
    embeddings."""
    if match is None:
        embeddings = input_embeddings(gm)
        if not embeddings:
            raise OptionError("trainable tokens: this graph has no input embeddings; name a module")
        return [embeddings[0].path]
    weights, found, seen = _weights(gm), [], set()
    for module in sorted(weights):
        if match(module) and weights[module].path not in seen:
            found.append(module)
            seen.add(weights[module].path)
    if not found:
        raise OptionError(
            "trainable tokens: the targets select no module whose weight the graph reads; name an "
            "embedding or linear (a module called whole by a symbolic capture: capture with "
            "example inputs)"
        )
    return found


def _by_name(gm: fx.GraphModule, rows: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """peft's {name: ids} ('' the input embeddings; names match the end of a path) by module."""
    return {
        module: ids
        for name, ids in rows.items()
        for module in token_modules(gm, (lambda m, n=name: m.endswith(n)) if name else None)
    }


def token_placements(
    gm: fx.GraphModule, rows: dict[str, tuple[int, ...]], suffix: str = ""
) -> list[tuple[ParameterSite, str]]:
    """(the weight's site, where its tensors go) for each module of `rows`."""
    weights = _weights(gm)
    return [(weights[module], module + suffix) for module in _by_name(gm, rows)]


def token_rows(gm: fx.GraphModule, site: ParameterSite, rows: dict[str, tuple[int, ...]]) -> Any:
    """The ids trained at `site` among `rows`, or None where it is no token site."""
    names = (site.path, *site.aliases)
    return next(
        (ids for module, ids in _by_name(gm, rows).items() if f"{module}.weight" in names), None
    )


def check_rows(site: ParameterSite, ids: tuple[int, ...]) -> None:
    if len(site.shape) != 2:
        raise OptionError(f"trainable tokens: {site.path!r} is not a 2-D weight")
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise OptionError(
            f"trainable tokens: token ids must be distinct and not negative, got {list(ids)}"
        )
    if max(ids) >= site.shape[0]:
        raise OptionError(
            f"trainable tokens: token id {max(ids)} is past the {site.shape[0]} rows of "
            f"{site.path!r}; resize the embeddings first"
        )


def token_params(ctx: Context, ids: tuple[int, ...], init: bool) -> list[Param]:
    index = torch.tensor(ids, dtype=torch.long)
    rows = ctx.weight()[index] if init else torch.randn(len(ids), ctx.site.shape[1])
    return [
        Param("trainable_tokens_delta", value=rows),
        Param("token_indices", value=index, dtype=torch.long, trainable=False),
    ]


def replace_rows(b: Builder, W: fx.Node) -> fx.Node:
    delta = b.param("trainable_tokens_delta")
    if b.ctx.upcast:  # peft: delta.to(W)
        delta = b.call(aten._to_copy.default, delta, dtype=b.ctx.base_dtype, role="delta_downcast")
    return b.call(
        aten.index_copy.default, W, 0, b.param("token_indices"), delta, role="trained_rows"
    )


def fold_rows(ctx: Context, weight: torch.Tensor) -> torch.Tensor:
    delta = ctx.tensor("trainable_tokens_delta").to(weight.dtype)
    return weight.index_copy(0, ctx.tensor("token_indices"), delta)


def _targeted(gm: fx.GraphModule, options: TrainableTokensOptions) -> list[str]:
    return token_modules(gm, compile_pattern(options.targets) if options.targets else None)


@register_technique
class TrainableTokens(Technique):
    """Train the rows of chosen token ids in an embedding (and the LM head tied to it):
    `W -> W.index_copy(0, ids, delta)`."""

    name = "trainable_tokens"
    half_precision = "float32"
    options = TrainableTokensOptions
    peft_type = "TRAINABLE_TOKENS"
    site_kinds = ("parameter",)
    stage = "output"

    def select(self, gm: fx.GraphModule, options: TrainableTokensOptions) -> list:
        weights = _weights(gm)
        return [(weights[m], m) for m in _targeted(gm, options)]

    def check(self, gm: fx.GraphModule, site: Any, options: TrainableTokensOptions) -> None:
        if not options.token_indices:
            raise OptionError("trainable_tokens: give token_indices, the ids whose rows to train")
        check_rows(site, options.token_indices)

    def params(self, ctx: Context) -> list[Param]:
        return token_params(ctx, ctx.options.token_indices, ctx.options.init)

    def build(self, b: Builder, W: fx.Node) -> fx.Node:
        return replace_rows(b, W)

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return fold_rows(ctx, weight), bias

    def saved(self, options: TrainableTokensOptions, attr: str) -> bool:
        return attr != "token_indices"

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # peft saves the delta once more under each module tied to the embedding
        (key, delta), tied = next(iter(tensors.items())), {}
        for alias in (ctx.site.path, *ctx.site.aliases):
            module = alias.rpartition(".")[0]
            copy = f"base_model.model.{module}.trainable_tokens_delta"
            if copy != key:
                tied[copy] = delta.detach().clone()
        return {**tensors, **tied}

    def to_peft(self, options: TrainableTokensOptions, sites: list[Any]) -> dict[str, Any]:
        return {"target_modules": _targeted(sites[0].node.graph.owning_module, options)}

    def describe(self, options: TrainableTokensOptions, sites: list[Any]) -> str:
        return (
            f"{len(options.token_indices)} trainable token rows at {len(sites)} weights, adapter "
            f"{options.adapter!r}"
        )
