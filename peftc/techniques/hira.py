"""HiRA: a high-rank update, the base weight times a low-rank product, as in HF peft 0.21.

    y = W x + b   ->  y = W x + b + (W ⊙ B A) dropout(x)                          (linear)
    e = E[ids]    ->  e = E[ids] + (E ⊙ (B A)^T)[ids]                             (embedding)
    y = conv(x)   ->  y = conv(x) + conv(dropout(x), W ⊙ D),  D[o, i] = Σ_r B[o, r] A[r, i]
                                                                          (1d/2d/3d convolution)

1. Linear sites (`nn.Linear`, GPT-2's `Conv1D`, NF4 linears as peft's bitsandbytes layers):
   `hira_A` (r, in), `hira_B` (out, r); the product in peft's order, `(A^T B^T)^T`.
2. Embedding sites: `hira_embedding_A` (r, num_embeddings), `hira_embedding_B` (dim, r), no
   dropout; the lookup has no padding index (peft's), so the padding row trains A and B too.
3. Convolution sites: `hira_A` (r, in, *kernel), `hira_B` (out, r, 1, ...); the convolution keeps
   the base's stride, padding and dilation. peft refuses grouped ones; its product fails on a Conv3d
   whose kernel starts (1, 1), and its branch pads with zeros whatever the base's padding mode:
   all three are refused. So are nn.MultiheadAttention's projections (peft never calls them).
4. Inits (`init_weights`, peft's per layer kind): true: A Kaiming-uniform (embedding: A zero, B
   N(0, 1)), B zero, so the model computes what it did; "gaussian": linear A ~ N(0, 1/r); false:
   A, B ~ N(0, 1) everywhere; None: N(0, 1) but on embeddings, which take true's.
5. Merging adds W0 ⊙ (B A) to W, W0 the weight before any merge, as peft's merge.
6. `rank_pattern` is refused by name: peft 0.21 ignores it where a module gets its first HiRA
   adapter (dispatch_default reads `config.r`) and applies it to later ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    kaiming_uniform,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention, refuse_convolution
from peftc.techniques.oft import eager

__all__ = ["HiraOptions", "Hira"]

aten = torch.ops.aten


@dataclass(frozen=True)
class HiraOptions(AdapterOptions):
    r: int = rank_option(32, "rank of A and B; W ⊙ B A is high-rank all the same")
    dropout: float = dropout_option("hira_dropout")
    init_weights: bool | Literal["gaussian"] | None = option(
        True,
        doc="true: B zero (the identity at init); 'gaussian': A ~ N(0, 1/r) on linears; false: "
        "A, B ~ N(0, 1); None: as false but on embeddings (peft's rules)",
        peft="init_weights",
    )


def _attrs(site: Any) -> tuple[str, str]:
    prefix = "hira_embedding_" if site.kind == "embedding" else "hira_"
    return prefix + "A", prefix + "B"


def _inits(site: Any, o: HiraOptions) -> tuple[Any, Any]:
    """(init of A, init of B): peft's update_layer and reset_hira_parameters per layer kind."""
    normal = nn.init.normal_
    if site.kind == "embedding":
        return (normal, normal) if o.init_weights is False else (None, normal)
    if o.init_weights is False or o.init_weights is None:
        return normal, normal
    if o.init_weights == "gaussian" and site.kind == "linear":
        return (lambda t: nn.init.normal_(t, std=1 / o.r)), None
    return kaiming_uniform, None  # conv layers take any truthy value as true


def _shapes(site: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if site.kind == "embedding":
        return (r, site.num_embeddings), (site.embedding_dim, r)
    if site.kind == "conv":
        ones = (1,) * site.dims
        return (r, site.in_channels, *site.kernel_size), (site.out_channels, r, *ones)
    return (r, site.in_features), (site.out_features, r)


def _product(call: Any, site: Any, A: Any, B: Any) -> Any:
    """B A in the site's weight layout, in peft's order of operations (`call`: `Builder.call` in
    the graph, `eager` for merging)."""
    t = aten.t.default
    if site.kind == "embedding":
        return call(t, call(aten.mm.default, B, A, role="BA"), role="BA_t")
    if site.kind == "linear":
        At, Bt = call(t, A, role="A_t"), call(t, B, role="B_t")
        return call(t, call(aten.mm.default, At, Bt, role="AB_t"), role="BA")
    if site.dims == 2 and tuple(site.kernel_size) == (1, 1):  # peft's 1x1 case: a matmul
        flat_b = call(aten.reshape.default, B, [site.out_channels, -1], role="B_flat")
        flat_a = call(aten.reshape.default, A, [-1, site.in_channels], role="A_flat")
        flat = call(aten.mm.default, flat_b, flat_a, role="BA_flat")
        return call(
            aten.reshape.default, flat, [site.out_channels, site.in_channels, 1, 1], role="BA"
        )
    conv = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[site.dims].default
    At = call(aten.transpose.int, A, 0, 1, role="A_t")
    return call(aten.transpose.int, call(conv, At, B, role="AB_t"), 0, 1, role="BA")


@register_technique
class Hira(Technique):
    """Insert HiRA at the selected linear, convolution and embedding sites: the op's own update
    `W ⊙ B A` applied beside it."""

    name = "hira"
    half_precision = "float32"  # peft upcasts A and B; W ⊙ B A is then computed in float32
    options = HiraOptions
    peft_type = "HIRA"
    peft_ignored = ("fan_in_fan_out",)  # peft sets it per layer type; the layout is the graph's
    site_kinds = ("linear", "conv", "embedding")
    preserves_outputs = False  # init_weights=false (or None off embeddings) draws B at random

    def check(self, gm: fx.GraphModule, site: Any, options: HiraOptions) -> None:
        if site.kind == "linear" and multihead_attention(site):
            raise OptionError(
                f"hira: {site.path!r} is a projection of an nn.MultiheadAttention, which peft's "
                "HiRA does not adapt (it never calls out_proj, and refuses the attention itself); "
                "exclude it from targets"
            )
        if site.kind != "conv":
            return
        refuse_convolution("hira", site)
        if site.groups > 1:
            problem = f"a grouped convolution (groups={site.groups})"
        elif site.dims == 3 and tuple(site.kernel_size[:2]) == (1, 1):
            # peft's 1x1 test reads kernel dims 0 and 1 and squeezes a Conv3d's factors wrongly
            problem = f"a Conv3d with kernel {tuple(site.kernel_size)}, on which peft's HiRA fails"
        else:
            return
        raise OptionError(
            f"hira: {site.path!r} is {problem}; peft's HiRA does not support it, exclude it from "
            "targets"
        )

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        factors = zip(_attrs(site), _shapes(site, o.r), _inits(site, o), strict=True)
        return [Param(attr, shape, init=init) for attr, shape, init in factors]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        # peft's embedding layer never calls its dropout
        if ctx.options.dropout > 0 and ctx.site.kind != "embedding":
            return {"hira_dropout": nn.Dropout(ctx.options.dropout)}
        return {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site = b.site
        a, b_attr = _attrs(site)
        product = _product(b.call, site, b.param(a), b.param(b_attr))
        update = b.call(aten.mul.Tensor, b.weight(), product, role="hira_weight")
        if site.kind == "embedding":  # no padding index, as peft's F.embedding(x, weight)
            return b.call(aten.embedding.default, update, x, role="hira_out")
        if b.options.dropout > 0:
            x = b.module("hira_dropout", x, role="dropout")
        target, args = site.functional(x, update, None)
        return b.call(target, *args, role="hira_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        # ctx.weight() is the weight before any merge (the core restores it first), peft's W0
        A, B = (ctx.tensor(attr).float() for attr in _attrs(ctx.site))
        return ctx.weight() * _product(eager, ctx.site, A, B)

    def to_peft(self, options: HiraOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: HiraOptions, sites: list[Any]) -> str:
        return f"HiRA r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"
