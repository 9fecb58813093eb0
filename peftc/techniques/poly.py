"""Poly (Polytropon): per task, a mixture of LoRA skills (peft's `PolyConfig`, PeftType POLY).

    y = W x + b + x A_t B_t / r,  A_t = sum_s w[t, q, s] A[q, s],  B_t likewise

with `w` peft's router: per task, a sigmoid over skill logits (a relaxed Bernoulli draw in
training) in each of `n_splits` heads (Multi-Head Routing where above 1), normalised over skills.
The graph takes a new input, `task_ids` (one per row), as peft's model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from peftc.errors import OptionError
from peftc.ir.graph import add_input
from peftc.technique import (
    AdapterOptions,
    Context,
    Param,
    Technique,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["Poly", "PolyOptions", "PolyRouter"]

aten = torch.ops.aten
TASK_IDS = "task_ids"
EPS = 1e-12  # peft's router's


@dataclass(frozen=True)
class PolyOptions(AdapterOptions):
    r: int = rank_option(8, "rank of each skill's LoRA")
    n_tasks: int = option(1, doc="tasks the router has weights for", check=positive, peft="n_tasks")
    n_skills: int = option(4, doc="LoRA skills at each site", check=positive, peft="n_skills")
    n_splits: int = option(
        1,
        doc="heads each skill is split into (Multi-Head Routing)",
        check=positive,
        peft="n_splits",
    )


class PolyRouter(nn.Module):
    """peft's PolyRouter: per row's task, skill weights in each split summing to one."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int):
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("poly: give the graph task_ids (one task id per row), as peft needs")
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        logits = logits.view(-1, self.n_splits, self.n_skills)
        if self.training:  # the same draw as peft's, so one RNG state gives the same weights
            logits = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            logits = torch.sigmoid(logits)
        return logits / (logits.sum(dim=-1, keepdim=True) + EPS)


@register_technique
class Poly(Technique):
    """Poly: `y = W x + b + x A_t B_t / r`, the skills mixed per row by its task (`task_ids`)."""

    name, options, peft_type = "poly", PolyOptions, "POLY"
    # a checkpoint brings its own weights, so any init loads; "poly" is peft's only router
    peft_fixed = {"init_weights": True, "poly_type": "poly"}
    peft_ignored = ("init_weights",)
    mergeable = False  # each row mixes its own task's weights: no one W to fold into (peft neither)

    def check(self, gm: fx.GraphModule, site: Any, options: PolyOptions) -> None:
        problem = _unsupported(site, options)
        if problem:
            raise OptionError(f"poly: {site.path!r} {problem}; exclude it from targets")

    def params(self, ctx: Context) -> list[Param]:
        o, site = ctx.options, ctx.site
        q, s = o.n_splits, o.n_skills
        A = Param("poly_lora_A", (q, s, site.in_features // q, o.r), init=_transposed_kaiming)
        return [A, Param("poly_lora_B", (q, s, o.r, site.out_features // q))]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        o = ctx.options
        return {"poly_router": PolyRouter(o.n_tasks, o.n_splits, o.n_skills)}

    def build(self, b: Any, x: Any) -> Any:
        r, site = b.options.r, b.site
        weights = b.module("poly_router", _task_ids(b.gm), role="router")
        A = b.call(
            aten.einsum.default, "bqs,qsdr->bqdr", [weights, b.param("poly_lora_A")], role="mix_A"
        )
        B = b.call(
            aten.einsum.default, "bqs,qsrd->bqrd", [weights, b.param("poly_lora_B")], role="mix_B"
        )
        A = b.call(aten.reshape.default, A, [-1, site.in_features, r], role="rows_A")
        B = b.call(aten.transpose.int, B, 1, 2, role="heads_B")
        B = b.call(aten.reshape.default, B, [-1, r, site.out_features], role="rows_B")
        down = b.call(aten.bmm.default, x, A, role="down")
        up = b.call(aten.bmm.default, down, B, role="up")
        return b.call(aten.div.Tensor, up, r, role="poly")


def _unsupported(site: Any, options: PolyOptions) -> str | None:
    """Why peft's Poly cannot adapt `site` as peftc computes it, or None."""
    if multihead_attention(site):
        return "is a projection of an nn.MultiheadAttention, which peft's Poly does not adapt"
    if site.fan_in_fan_out or site.storage != "dense":
        return "is not an nn.Linear (peft's Poly adapts only those)"
    q = options.n_splits
    if site.in_features % q or site.out_features % q:
        return (
            f"has {site.in_features} inputs and {site.out_features} outputs, not both divisible "
            f"by n_splits={q}"
        )
    value = site.input.meta.get("val")
    if value is not None and value.dim() != 3:
        return f"takes a {value.dim()}-d input; peft's Poly batches (batch, sequence, features)"
    return None


def _transposed_kaiming(tensor: torch.Tensor) -> None:
    """peft's init of A: each (split, skill) block is nn.Linear's (r, d) init, transposed."""
    n_splits, n_skills, d, r = tensor.shape
    for skill in range(n_skills):  # peft's order, so one seed draws the same blocks
        for split in range(n_splits):
            weight = torch.empty(r, d)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            tensor[split, skill] = weight.T


def _task_ids(gm: fx.GraphModule) -> fx.Node:
    """The graph's `task_ids` input (one task per row), added after its other inputs the first
    time; every Poly adapter reads it, and it stays when they go, so the signature is stable."""
    found = next((n for n in gm.graph.find_nodes(op="placeholder") if n.target == TASK_IDS), None)
    if found is not None:
        return found
    node = add_input(gm.graph, TASK_IDS, pass_name="poly", role=TASK_IDS)
    if any(n.args for n in gm.graph.find_nodes(op="placeholder") if n is not node):
        node.args = (None,)  # after inputs with defaults it needs one; the router refuses None
    rows = next(
        (
            v
            for n in gm.graph.find_nodes(op="placeholder")
            if isinstance(v := n.meta.get("val"), torch.Tensor)
        ),
        None,
    )
    if rows is not None:  # keeps shape propagation between passes: one id per row
        node.meta["val"] = rows.new_empty((rows.shape[0],), dtype=torch.long)
    return node
