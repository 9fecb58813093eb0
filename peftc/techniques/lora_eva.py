"""EVA (explained variance adaptation), peft's `init_lora_weights="eva"`: A from the principal
components of each linear site's inputs on calibration data, the ranks redistributed by explained
variance.

    X: a site's inputs, one row per token (the rows `attention_mask` keeps, and with
       `eva_label_mask` those whose label is not `eva_label_mask_value`)
    incremental PCA of X (peft's: randomised SVD, q = 2k, 4 iterations, seed 42), k = round(rho r),
    one batch at a time until the components a site's rank needs turn no more (cosine >= tau)
    ranks: the budget (the sum of the sites' r) goes to the largest explained-variance ratios
    A = the first rank components (/ sqrt(singular value) with `eva_whiten`), B = 0,
    alpha *= rank / r (`eva_adjust_scaling`); a site whose rank is 0 is dropped

1. `lora(init="eva", ...)` adds the adapter as plain LoRA; `initialize(gm, batches)` (peft's
   `initialize_lora_eva_weights`) computes the above with the adapters disabled, then adds the
   adapter again with the new ranks (`rank_pattern`, `alpha_pattern`, as peft writes them) and the
   components as A. Sites EVA does not cover (embeddings, convolutions, nn.MultiheadAttention) are
   initialised afresh, as in peft.
2. Sites that read one input share its PCA (peft finds them by hashing their inputs); the budget is
   split as peft splits it, ties included.
3. peft loops over the batches until every site converges; `max_steps` bounds that here, with an
   error naming the sites that did not converge.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable
from itertools import cycle
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta, set_tensor
from peftc.technique.adapters import (
    active_adapters,
    adapters,
    add_adapter,
    current_sites,
    delete,
    set_active,
)
from peftc.technique.registry import technique

__all__ = ["IncrementalPCA", "initialize"]


class IncrementalPCA:
    """peft's IncrementalPCA (scikit-learn's, in torch) as EVA runs it: `partial_fit` by the
    randomised SVD (q = 2 n_components, 4 iterations, seeded), signs fixed by the components."""

    def __init__(self, n_components: int, seed: int = 42) -> None:
        self.n_components, self.seed = n_components, seed
        self.components_: torch.Tensor | None = None

    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.clone()
        n = X.shape[0]
        first = self.components_ is None
        if first:
            self.mean_, self.var_, self.n_samples_seen_ = None, None, torch.tensor([0])
        mean, var, total = _mean_and_var(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n)
            correction = factor * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X, correction))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            _, S, V = torch.svd_lowrank(X, q=2 * self.n_components, niter=4)
        Vt = V.mH
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])
        Vt *= signs.view(-1, 1)
        self.n_samples_seen_, self.mean_, self.var_ = total, mean, var
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * total))[: self.n_components]


def _mean_and_var(
    X: torch.Tensor, last_mean: Any, last_var: Any, last_count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's `_incremental_mean_and_var`, in float64 sums."""
    new_count = torch.tensor([X.shape[0]])
    count = last_count + new_count
    last_sum = (
        torch.zeros(X.shape[1], dtype=torch.float64)
        if last_mean is None
        else last_mean * last_count
    )
    new_sum = X.sum(dim=0, dtype=torch.float64)
    centred = X - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    new_var = centred.square().sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_var is None:
        return (last_sum + new_sum) / count, new_var / count, count
    ratio = last_count.double() / new_count
    spread = (last_sum / ratio - new_sum).square()
    total_var = last_var * last_count + new_var + ratio / count * spread
    return (last_sum + new_sum) / count, total_var / count, count


@dataclasses.dataclass
class _Group:
    """The sites that read one input node, and the PCA of that input."""

    node: fx.Node
    paths: list[str]
    pca: IncrementalPCA
    tau: float
    converged: torch.Tensor

    def update(self, rows: torch.Tensor) -> None:
        if rows.shape[0] < self.pca.n_components:
            return  # peft skips a batch with fewer rows than components
        previous = None if self.pca.components_ is None else self.pca.components_.clone()
        self.pca.partial_fit(rows.float())
        if previous is not None:
            similarity = torch.nn.functional.cosine_similarity(self.pca.components_, previous)
            self.converged = similarity >= self.tau


@torch.no_grad()
def initialize(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    adapter: str = "default",
    *,
    max_steps: int = 1000,
) -> dict[str, int]:
    """EVA's A and ranks for `adapter` (added with `lora(init="eva")`) from `batches`: dicts of the
    graph's inputs by name (`labels` read for the label mask, never passed), or tuples of its
    positional inputs (every token used). Returns each site's rank (0: dropped)."""
    record = adapters(gm).get(adapter)
    if record is None or record.technique != "lora" or record.options.init != "eva":
        raise OptionError(f"eva: no adapter {adapter!r} added with lora(init='eva'); add one first")
    batches = list(batches)
    if not batches:
        raise OptionError("eva: initialize needs at least one calibration batch")
    options = record.options
    method = technique("lora")
    active = active_adapters(gm)
    set_active(gm, [])
    try:
        groups, budget, limits = _groups(gm, record, method)
        ranks = _fit(gm, groups, batches, budget, limits, options, max_steps)
    finally:
        set_active(gm, active)
    components = {
        path: _components(group, ranks[path], options.eva_whiten)
        for group in groups
        for path in group.paths
    }
    _add_again(gm, record, ranks, components)
    return ranks


def _groups(gm: fx.GraphModule, record: Any, method: Any) -> tuple[list[_Group], int, dict]:
    """The linear sites of `record` grouped by the input they read (in the model's module order);
    the rank budget; each site's component count round(rho r)."""
    options = record.options
    sites = current_sites(gm, [(p, k) for p, k in record.sites if k == "linear"])
    order = {path: i for i, path in enumerate(peftc_meta(gm).get("module_types", {}))}
    rank = {s.path: method.options_at(s, options).r for s in sites.values()}
    rho = options.eva_rho
    if rho > 1000:  # peft's cap on a very large rho
        rho = min(rho, max(max(p.shape) for p in gm.parameters() if p.dim()) // options.r)
    limits = {path: round(r * rho) for path, r in rank.items()}
    by_node: dict[fx.Node, list[Any]] = {}
    for site in sorted(sites.values(), key=lambda s: order.get(s.path, 0)):
        if limits[site.path] > site.in_features:
            raise OptionError(
                f"eva: {site.path!r} has {site.in_features} input features, fewer than the "
                f"{limits[site.path]} components round(r * eva_rho) asks; lower r or eva_rho"
            )
        by_node.setdefault(site.input, []).append(site.path)
    groups = []
    for node, paths in by_node.items():
        k = max(limits[p] for p in paths)
        limits.update(dict.fromkeys(paths, k))
        converged = torch.zeros(k, dtype=torch.bool)
        groups.append(_Group(node, paths, IncrementalPCA(k), options.eva_tau, converged))
    return groups, sum(rank.values()), limits


def _fit(
    gm: fx.GraphModule,
    groups: list[_Group],
    batches: list[Any],
    budget: int,
    limits: dict[str, int],
    options: Any,
    max_steps: int,
) -> dict[str, int]:
    """peft's loop: a group stops taking batches once the components its rank needs converge (and
    takes them again if the redistribution asks for more); returns each site's rank."""
    ranks = dict(limits)
    for step, batch in enumerate(cycle(batches)):
        done = [bool(torch.all(g.converged[: ranks[g.paths[0]]])) for g in groups]
        if all(done):
            return ranks
        if step == max_steps:
            stuck = [g.paths[0] for g, d in zip(groups, done, strict=True) if not d]
            raise OptionError(
                f"eva: the components of {', '.join(stuck)} did not converge in {max_steps} steps "
                "(cosine >= eva_tau between steps); give more or larger batches, lower eva_tau, "
                "or raise max_steps"
            )
        if step == len(batches) and any(g.pca.components_ is None for g in groups):
            raise OptionError(_too_few_rows(groups))
        _run(gm, batch, [g for g, d in zip(groups, done, strict=True) if not d], options)
        if all(g.pca.components_ is not None for g in groups):
            ranks = _distribute(groups, budget, limits)
    raise AssertionError("unreachable")


def _too_few_rows(groups: list[_Group]) -> str:
    group = next(g for g in groups if g.pca.components_ is None)
    return (
        f"eva: no batch gives {group.paths[0]!r} the {group.pca.n_components} token rows its "
        f"round(r * eva_rho) components need (peft would loop forever); give larger batches, "
        "or lower r or eva_rho"
    )


def _distribute(groups: list[_Group], budget: int, limits: dict[str, int]) -> dict[str, int]:
    """peft's `_get_rank_distribution`: the budget to the largest explained-variance ratios over
    all sites (a site sharing its input counts its group's ratios too), the larger share of a group
    to the site its PCA belongs to."""
    owner = {g.paths[0]: g for g in groups} | {p: g for g in groups for p in g.paths[1:]}
    keys, values = zip(
        *[
            (path, ratio)
            for path, g in owner.items()
            for ratio in g.pca.explained_variance_ratio_[: limits[g.paths[0]]]
        ],
        strict=True,
    )
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {path: counts.get(path, 0) for path in owner}
    for g in groups:
        for path in g.paths[1:]:
            if ranks[g.paths[0]] < ranks[path]:
                ranks[g.paths[0]], ranks[path] = ranks[path], ranks[g.paths[0]]
    return ranks


def _run(gm: fx.GraphModule, batch: Any, groups: list[_Group], options: Any) -> None:
    """Run the graph on `batch` in eval mode, feeding each group the rows of its input."""
    args, mask = _inputs(gm, batch, options)
    feeding = {g.node: g for g in groups}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n in feeding:
                rows = value[mask] if mask is not None and value.dim() == 3 else value
                feeding[n].update(rows.reshape(-1, value.shape[-1]))
            return value

    was_training = gm.training
    gm.eval()
    try:
        Recorder(gm).run(*args)
    finally:
        gm.train(was_training)


def _inputs(gm: fx.GraphModule, batch: Any, options: Any) -> tuple[tuple, Any]:
    """The graph's positional inputs and the (batch, tokens) mask of the rows used, as peft's
    `prepare_model_inputs_fn_language_modeling`: `attention_mask`, and with `eva_label_mask` the
    tokens whose label is not `eva_label_mask_value`."""
    if not isinstance(batch, dict):
        return tuple(batch), None
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = sorted(set(batch) - set(names) - {"labels"})
    missing = [name for name in names if name not in batch]
    if unknown or missing:
        raise OptionError(
            f"eva: a batch must hold the graph's inputs {names} (and optionally labels); "
            f"it has {sorted(batch)}"
        )
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.bool()
    if options.eva_label_mask and "labels" in batch:
        keep = batch["labels"] != options.eva_label_mask_value
        mask = keep if mask is None else mask & keep
    return tuple(batch[name] for name in names), mask


def _components(group: _Group, rank: int, whiten: bool) -> torch.Tensor:
    if not torch.all(group.converged[:rank]):
        raise OptionError(
            f"eva: {', '.join(group.paths)} got rank {rank} before its components converged"
        )
    A = group.pca.components_[:rank]
    return A / group.pca.singular_values_[:rank].sqrt().reshape(-1, 1) if whiten else A


def _add_again(
    gm: fx.GraphModule, record: Any, ranks: dict[str, int], components: dict[str, torch.Tensor]
) -> None:
    """Replace the adapter by one with EVA's ranks (and alphas, scaled), without its rank-0 sites,
    and the components as A."""
    options, method = record.options, technique("lora")
    rank_pattern, alpha_pattern, dropped = [], [], []
    for site in current_sites(gm, record.sites).values():
        if site.path in record.saved_modules:
            continue
        here = method.options_at(site, options)
        r, alpha = here.r, here.alpha
        new = ranks.get(site.path, r)
        if new == 0:
            dropped.append(site.path)
            continue
        if new != r and options.eva_adjust_scaling:
            alpha *= new / r
        if new != options.r:
            rank_pattern.append((method.peft_key(site), new))
        if alpha != options.alpha:
            alpha_pattern.append((method.peft_key(site), alpha))
    new_options = dataclasses.replace(
        options,
        rank_pattern=tuple(rank_pattern),
        alpha_pattern=tuple(alpha_pattern),
        exclude_modules=_excluding(options.exclude_modules, dropped),
    )
    delete(gm, record.name)
    add_adapter(gm, method, new_options)
    names = adapters(gm)[record.name].names
    for path, A in components.items():
        if ranks[path]:
            set_tensor(gm, names[path]["lora_A"], _like(gm, names[path]["lora_A"], A))


def _excluding(exclude: Any, paths: list[str]) -> Any:
    if not paths:
        return exclude
    if isinstance(exclude, str):  # a regex: add the paths as alternatives
        return "|".join([f"(?:{exclude})", *(re.escape(p) for p in paths)])
    return tuple(exclude or ()) + tuple(paths)


def _like(gm: fx.GraphModule, name: str, value: torch.Tensor) -> torch.nn.Parameter:
    current = gm.get_parameter(name)
    return torch.nn.Parameter(value.to(current), requires_grad=current.requires_grad)
