"""TinyLoRA: a tiny trained vector projected through frozen random tensors between the frozen
factors of the weight's own SVD, as in HF peft 0.21 (LoRA-XS with R = sum_i v_i P_i).

    y = W x + b  ->  y = W x + b + B (R (A dropout(x))),       R = einsum("i,ijk->jk", v, P)
    e = E[ids]   ->  e = E[ids] + (dropout(B[ids]) R) A          (embedding sites)

1. At each site the truncated SVD of the base weight (float32; (out, in), or E itself for
   embeddings) gives the frozen `tinylora_A = sqrt(S) V^T` (r', in) and `tinylora_B = U sqrt(S)`
   (out, r'), r' = min(r, out, in), rounded to the weight's dtype before the square root as peft.
2. `tinylora_P` (u, r', r') is frozen, N(0, 1 / r') from a CPU generator seeded with
   `projection_seed + k`, k the site's position among the adapter's sites in module order (peft's
   layer index); saved with `save_projection=true`, else regenerated from the seed on load.
3. The trained vectors v (u,) are shared by groups of sites: of n sites, with
   `groups = max(1, round(n (1 - weight_tying)))`, site k reads group
   `min(k // max(1, n // groups), groups - 1)`. v starts at zero (`init_weights=true`, the
   identity), uniform in ±init_v_bound (`"uniform"`), or at zero for `false`, which peft leaves
   uninitialized. They live where peft's in-memory names put them, under the adapter's first site
   (`<path>.tinylora_v.<adapter>.<group>`); their checkpoint keys are
   `base_model.tinylora_v.<group>`.
4. Linear sites (nn.Linear, GPT-2's Conv1D) and embedding sites, as peft dispatches; merge adds
   B R A to W. NF4 and other non-dense weights and nn.MultiheadAttention's projections are refused
   (peft's SVD reads a dense nn.Linear / nn.Embedding weight), so is `bias` other than "none".
Over a float16/bfloat16 base only `autocast_adapter_dtype=false` is implemented (everything in the
base's dtype; peft's autocast upcasts v alone). peft seeds P of a layer a second adapter shares with
an earlier one by the earlier one's index; peftc always by the adapter's own, so only such
checkpoints without their projections load differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
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
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["TinyLoraOptions", "TinyLora", "svd_factors"]

aten = torch.ops.aten
KINDS = ("linear", "embedding")
FROZEN = ("tinylora_A", "tinylora_B", "tinylora_P")


def _unit(value: Any) -> str | None:
    return None if 0.0 <= value <= 1.0 else "in [0, 1]"


@dataclass(frozen=True)
class TinyLoraOptions(AdapterOptions):
    r: int = rank_option(2, "rank of the frozen truncated SVD (peft recommends 2)")
    u: int = option(64, doc="length of each trained vector v", check=positive, peft="u")
    weight_tying: float = option(
        0.0,
        doc="share v across sites: 0 one per site, 1 one for all, between: groups of neighbours",
        check=_unit,
        peft="weight_tying",
    )
    projection_seed: int = option(
        42, doc="seed of P (plus the site's index)", peft="projection_seed"
    )
    save_projection: bool = option(
        True,
        doc="save P in the checkpoint (else regenerated from projection_seed)",
        peft="save_projection",
    )
    init_v_bound: float = option(
        0.02, doc='v starts uniform in ±bound with init_weights="uniform"', peft="init_v_bound"
    )
    dropout: float = dropout_option("tinylora_dropout")
    init_weights: bool | Literal["uniform"] = option(
        True,
        doc='v = 0 (the identity); "uniform": ±init_v_bound; false: 0 (peft: uninitialized)',
        peft="init_weights",
    )


def svd_factors(weight: torch.Tensor, r: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """peft's `_init_svd`: (A, B) of the truncated SVD of `weight`, rounded to `dtype` first."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    rank = min(r, *weight.shape)
    u_r, s_r, v_r = U[:, :rank].to(dtype), S[:rank].to(dtype), Vh[:rank].to(dtype)
    root = torch.sqrt(s_r)
    return (root.unsqueeze(1) * v_r).contiguous(), (u_r * root.unsqueeze(0)).contiguous()


def _ordered(gm: fx.GraphModule, paths: list[str]) -> list[str]:
    """The adapter's site paths in the model's module order (peft's layer indices)."""
    order = {path: i for i, path in enumerate(peftc_meta(gm).get("module_types", {}))}
    return sorted(dict.fromkeys(paths), key=lambda p: order.get(p, len(order)))


def _group(index: int, count: int, tying: float) -> int:
    """peft's group of the site at `index` among `count` (`_create_and_replace`)."""
    groups = max(1, round(count * (1.0 - tying)))
    return min(index // max(1, count // groups), groups - 1)


def _place(ctx: Context) -> tuple[int, str]:
    """(the site's index, the key of the v it reads)."""
    paths = _ordered(ctx.gm, [path for path, kind in ctx.sites if kind in KINDS])
    index = paths.index(ctx.site.path)
    return index, f"tinylora_v_{_group(index, len(paths), ctx.options.weight_tying)}"


def _rotation(call: Any, v: Any, P: Any) -> Any:
    """R = sum_i v_i P_i (r', r'), in peft's op (`call`: `Builder.call`, or `eager` to merge)."""
    return call(aten.einsum.default, "i,ijk->jk", [v, P], role="tinylora_R")


@register_technique
class TinyLora(Technique):
    """Insert TinyLoRA branches: `y = W x + b -> y = W x + b + B R A dropout(x)`, A and B the frozen
    SVD factors of W, R a trained vector's mix of frozen random matrices."""

    name = "tinylora"
    options = TinyLoraOptions
    peft_type = "TINYLORA"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph
    site_kinds = KINDS
    preserves_outputs = False  # init_weights="uniform" draws v at random

    def check(self, gm: fx.GraphModule, site: Any, options: TinyLoraOptions) -> None:
        if mha := multihead_attention(site):
            raise OptionError(
                f"tinylora: peft adapts nn.Linear, Conv1D and nn.Embedding only, not the "
                f"nn.MultiheadAttention {mha[1]!r}; exclude it from targets"
            )
        if site.storage != "dense":
            raise OptionError(
                f"tinylora: {site.path!r} stores its weight as {site.storage!r}; peft's TinyLoRA "
                "takes the SVD of a dense weight; keep the site dense or exclude it"
            )

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: TinyLoraOptions
    ) -> list[Param]:
        paths = _ordered(gm, [s.path for s in sites])
        groups = sorted({_group(i, len(paths), options.weight_tying) for i in range(len(paths))})
        bound = options.init_v_bound
        uniform = options.init_weights == "uniform"
        init = (lambda t: nn.init.uniform_(t, -bound, bound)) if uniform else None
        # peft's layers all hold the model's dict of vectors: named under the first one
        attr = f"{paths[0]}.tinylora_v" if paths[0] else "tinylora_v"
        return [
            Param(attr, (options.u,), init=init, suffix=str(g), key=f"tinylora_v_{g}")
            for g in groups
        ]

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        A, B = svd_factors(ctx.weight(), o.r, ctx.base_dtype)
        rank = A.shape[0]
        index, _ = _place(ctx)
        generator = torch.Generator().manual_seed(o.projection_seed + index)
        P = torch.normal(0.0, 1.0 / rank**0.5, size=(o.u, rank, rank), generator=generator)
        return [
            Param(attr, value=value, trainable=False)
            for attr, value in zip(FROZEN, (A, B, P), strict=True)
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        o = ctx.options
        return {"tinylora_dropout": nn.Dropout(o.dropout)} if o.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        R = _rotation(b.call, b.param(_place(b.ctx)[1]), b.param("tinylora_P"))
        A, B = b.param("tinylora_A"), b.param("tinylora_B")
        if b.site.kind == "embedding":  # peft looks B up, then drops out in the rank space
            h = b.call(aten.embedding.default, B, x, role="tinylora_B_out")
            if b.options.dropout:
                h = b.module("tinylora_dropout", h, role="dropout")
            h = b.call(aten.matmul.default, h, R, role="tinylora_R_out")
            return b.call(aten.matmul.default, h, A, role="tinylora")
        if b.options.dropout:
            x = b.module("tinylora_dropout", x, role="dropout")
        h = b.call(aten.linear.default, x, A, role="tinylora_A_out")
        h = b.call(aten.linear.default, h, R, role="tinylora_R_out")
        return b.call(aten.linear.default, h, B, role="tinylora")

    def delta(self, ctx: Context) -> torch.Tensor:
        # peft mixes R in v's dtype, the product in float32
        R = _rotation(eager, ctx.tensor(_place(ctx)[1]), ctx.tensor("tinylora_P")).float()
        return ctx.tensor("tinylora_B").float() @ R @ ctx.tensor("tinylora_A").float()

    def checkpoint_key(self, key: str) -> str:
        # peft saves its model-level vectors once, as base_model.tinylora_v.<group>
        _, found, group = key.rpartition(".tinylora_v.")
        return f"base_model.tinylora_v.{group}" if found else key

    def saved(self, options: TinyLoraOptions, attr: str) -> bool:
        return options.save_projection or attr != "tinylora_P"

    def to_peft(self, options: TinyLoraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: TinyLoraOptions, sites: list[Any]) -> str:
        return (
            f"TinyLoRA r={options.r}, u={options.u}, weight_tying={options.weight_tying} on "
            f"{len(sites)} sites, adapter {options.adapter!r}"
        )
