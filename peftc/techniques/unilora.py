"""UniLoRA: every site's A and B are entries of one trainable vector, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + B (A dropout(x)),
    A = theta_d[I_A] * S_A (r x in),   B = theta_d[I_B] * S_B (out x r)

1. One adapter trains one vector `theta_d` (theta_d_length,), uniform in ±init_theta_d_bound
   (peft's `init_weights=true`; false: N(0, 1)). A and B hold no values of their own: each entry
   reads theta_d at a fixed index.
2. The indices are peft's `generate_index`: the adapter's A and B entries, flattened site after
   site in the model's module order (peft's `model.modules()`, A then B at each), get a balanced
   assignment (each index floor or ceil of count / theta_d_length times) shuffled by numpy's
   `default_rng(proj_seed)`. Each entry is scaled by 1 / sqrt(how often its index is used), so
   S_A, S_B are fixed too. They are frozen buffers `<path>.unilora_indices_A.<adapter>` (int64)
   and `<path>.unilora_scales_A.<adapter>`, saved under peft's keys only with `save_indices=true`
   (a checkpoint's own then win), else regenerated from the seed.
3. theta_d lives where peft's in-memory name puts it, at the adapter's first site in module order
   (`<path>.unilora_theta_d.<adapter>`), and every site reads it there; its checkpoint key is
   peft's `base_model.unilora_theta_d`.
4. Linear sites (nn.Linear, GPT-2's Conv1D, NF4 bases), as peft; nn.MultiheadAttention's
   projections are refused (peft wraps out_proj, which MHA never calls). Merge adds B A to W.
Over a float16/bfloat16 base theta_d stays float32 (`autocast_adapter_dtype`) and the scales are
rounded to the base's dtype first, as peft computes them. `bias` other than "none" is refused.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta, qualify
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.technique.adapters import current_sites
from peftc.techniques.lora import multihead_attention

__all__ = ["UniLoraOptions", "UniLora", "generate_index"]

aten = torch.ops.aten
THETA = "unilora_theta_d"
FRAMES = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


@dataclass(frozen=True)
class UniLoraOptions(AdapterOptions):
    r: int = rank_option(4, "rank of A (r x in) and B (out x r), whose entries index theta_d")
    theta_d_length: int = option(
        256, doc="length of the one trained vector theta_d", check=positive, peft="theta_d_length"
    )
    proj_seed: int = option(42, doc="seed of the index assignment (numpy's)", peft="proj_seed")
    dropout: float = dropout_option("unilora_dropout")
    init_theta_d_bound: float = option(
        0.02, doc="theta_d starts uniform in ±bound", check=positive, peft="init_theta_d_bound"
    )
    init_weights: bool = option(
        True, doc="theta_d uniform in ±init_theta_d_bound (false: N(0, 1))", peft="init_weights"
    )
    save_indices: bool = option(
        False,
        doc="save the indices and scales (else regenerated from proj_seed on load)",
        peft="save_indices",
    )


def generate_index(count: int, length: int, seed: int) -> torch.Tensor:
    """peft's balanced assignment of `count` entries to `length` indices, shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


@functools.lru_cache(maxsize=4)  # every site of an adapter asks for the same assignment
def _assignment(count: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, 1 / sqrt(uses) per index), unused indices at 0, as peft."""
    indices = generate_index(count, length, seed)
    counts = torch.bincount(indices, minlength=length)
    inv_sqrt = torch.zeros(length)
    inv_sqrt[counts > 0] = counts[counts > 0].float().rsqrt()
    return indices, inv_sqrt


def _ordered_paths(ctx: Context) -> list[str]:
    """The adapter's linear site paths in the model's module order (graph order where unknown)."""
    order = {path: i for i, path in enumerate(peftc_meta(ctx.gm).get("module_types", {}))}
    paths = list(dict.fromkeys(p for p, kind in ctx.sites if kind == "linear"))
    return sorted(paths, key=lambda p: order.get(p, len(order)))


def _theta_name(ctx: Context) -> str:
    return qualify(_ordered_paths(ctx)[0], THETA, ctx.options.adapter)


def _frames(ctx: Context) -> list[torch.Tensor]:
    """This site's (indices_A, indices_B, scales_A, scales_B): its chunks of the assignment."""
    o = ctx.options
    linear = [ref for ref in ctx.sites if ref[1] == "linear"]
    found = {path: s for (path, _), s in current_sites(ctx.gm, linear).items()}
    shapes = [
        shape
        for path in _ordered_paths(ctx)
        for shape in ((o.r, found[path].in_features), (found[path].out_features, o.r))
    ]
    sizes = [math.prod(shape) for shape in shapes]
    indices, inv_sqrt = _assignment(sum(sizes), o.theta_d_length, o.proj_seed)
    at = 2 * _ordered_paths(ctx).index(ctx.site.path)
    start = sum(sizes[:at])
    chunk_a = indices[start : start + sizes[at]].view(shapes[at])
    chunk_b = indices[start + sizes[at] : start + sizes[at] + sizes[at + 1]].view(shapes[at + 1])
    # peft rounds the scales to the base weight's dtype before any upcast
    scales = [inv_sqrt[chunk].to(ctx.base_dtype) for chunk in (chunk_a, chunk_b)]
    return [chunk_a, chunk_b, *scales]


def _with_theta(ctx: Context) -> Context:
    """`ctx` naming theta_d at every site (merged contexts then read it from the kept tensors)."""
    view = copy.copy(ctx)
    view.names = {**ctx.names, THETA: _theta_name(ctx)}
    return view


@register_technique
class UniLora(Technique):
    """Insert UniLoRA branches: `y = W x + b -> y = W x + b + B (A dropout(x))`, A and B read from
    one trained vector at fixed indices."""

    name = "unilora"
    half_precision = "float32"
    options = UniLoraOptions
    peft_type = "UNILORA"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph
    preserves_outputs = False  # theta_d starts non-zero, so A and B do

    def check(self, gm: fx.GraphModule, site: Any, options: UniLoraOptions) -> None:
        if mha := multihead_attention(site):
            raise OptionError(
                f"unilora: peft does not adapt nn.MultiheadAttention's projections ({mha[1]!r} "
                "reads their weights without calling them); exclude it from targets"
            )

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        frames = [
            Param(attr, value=value, trainable=False, dtype=value.dtype if i < 2 else None)
            for i, (attr, value) in enumerate(zip(FRAMES, _frames(ctx), strict=True))
        ]
        if _ordered_paths(ctx)[0] != ctx.site.path:
            return frames
        bound = o.init_theta_d_bound
        init = (lambda t: nn.init.uniform_(t, -bound, bound)) if o.init_weights else nn.init.normal_
        return [Param(THETA, (o.theta_d_length,), init=init), *frames]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"unilora_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        if b.options.dropout:
            x = b.module("unilora_dropout", x, role="dropout")
        theta = b.get(_theta_name(b.ctx), THETA)
        factors = []
        for side in ("A", "B"):
            picked = b.call(
                aten.index.Tensor, theta, [b.param(f"unilora_indices_{side}")], role=f"theta_{side}"
            )
            scales = b.param(f"unilora_scales_{side}")
            factors.append(b.call(aten.mul.Tensor, picked, scales, role=f"unilora_{side}"))
        h = b.call(aten.linear.default, x, factors[0], role="unilora_A_out")
        return b.call(aten.linear.default, h, factors[1], role="unilora")

    def delta(self, ctx: Context) -> torch.Tensor:
        ctx = _with_theta(ctx)
        theta = ctx.tensor(THETA).float()
        a, b = (
            theta[ctx.tensor(f"unilora_indices_{s}")] * ctx.tensor(f"unilora_scales_{s}").float()
            for s in ("A", "B")
        )
        return b @ a

    def checkpoint_key(self, key: str) -> str:
        # peft saves its model-level vector, not the copy every layer holds
        return f"base_model.{THETA}" if key.endswith(f".{THETA}") else key

    def saved(self, options: UniLoraOptions, attr: str) -> bool:
        return options.save_indices or attr not in FRAMES

    def to_peft(self, options: UniLoraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: UniLoraOptions, sites: list[Any]) -> str:
        return (
            f"UniLoRA r={options.r}, theta_d of {options.theta_d_length} on {len(sites)} sites, "
            f"adapter {options.adapter!r}"
        )
