"""DeFT: decompositional fine-tuning, a subspace of W removed and new content injected, as in HF
peft 0.21.

    y = W x + b  ->  y = W x + b - Q (right^T (W x)) + Q (s R dropout(x))
    i.e. W' = (I - Q right^T) W + s Q R

1. P (out, r) is the trainable projection direction and R (r, in) the injection. `relu` (peft's
   default): Q = P, right = relu(P), a non-orthogonal projector P relu(P)^T; `qr`: Q = qr(P)'s Q
   and right = Q, the orthogonal projector Q Q^T. s = alpha / r, or 1 without alpha.
2. The removal term reads the op's own bias-free output (y - b), as peft's does, so it costs
   two rank-r products and no second pass over W; the injection goes through the dropout.
3. `para=true` (PaRa) keeps only the removal term: no R is created or saved.
4. r is capped at out_features, as peft caps it. P starts normal(0, 0.02); R starts at
   right^T W / s so that the update is zero (`init_weights=false`: normal(0, 0.02 init_scale)).
5. peft computes the whole update in float32 (base output, bias and input cast up, the sum cast
   back once); so does peftc, with the adapter's tensors in float32 over a float16/bfloat16 base.
   There peft computes in float32 even with `autocast_adapter_dtype=false`, which peftc does not
   implement: refused by name.
6. Merging adds Q (s R - right^T W) to W (the bias is unchanged), from the original weight for
   every adapter, as peft.
Linear sites only (nn.Linear, GPT-2's Conv1D), as peft; quantized weights (peft would read the
packed storage), nn.MultiheadAttention and `bias` other than "none" are refused by name.
Tensors: `<path>.deft_P.<adapter>`, `<path>.deft_R.<adapter>`, saved as peft's `<path>.deft_P`.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.sites.formats import format_of
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    option,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["DeftOptions", "Deft"]

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)
INIT_STD = 0.02  # peft's std of P, and of R before init_scale


@dataclass(frozen=True)
class DeftOptions(AdapterOptions):
    r: int = rank_option(8, "rank of P (out x r) and R (r x in); capped at out_features")
    decomposition_method: Literal["relu", "qr"] = option(
        "relu",
        doc="the projector: relu: P relu(P)^T (non-orthogonal); qr: Q Q^T with Q from qr(P)",
        peft="decomposition_method",
    )
    alpha: int | None = option(
        None, doc="the injection is scaled by alpha / r; None: not scaled", peft="alpha"
    )
    para: bool = option(
        False, doc="PaRa: subspace removal alone, no injection matrix R", peft="para"
    )
    init_weights: bool = option(
        True,
        doc="R starts where the update is zero (false: normal, std 0.02 init_scale)",
        peft="init_weights",
    )
    init_scale: float = option(1.0, doc="scales R's std at init_weights=false", peft="init_scale")
    dropout: float = dropout_option("deft_dropout", "dropout on the injection's input")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r if self.alpha else 1.0  # peft: an alpha of 0 scales by 1


def _project(P: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, right), the projector being Q right^T (peft's `_project`, in float32)."""
    P = P.float()
    if method == "qr":
        Q = torch.linalg.qr(P).Q
        return Q, Q
    return P, torch.relu(P)


@register_technique
class Deft(Technique):
    """Insert DeFT: `y -> y - Q right^T (W x) + s Q R dropout(x)`, a subspace of W replaced."""

    name, options, peft_type = "deft", DeftOptions, "DEFT"
    half_precision = "float32"  # peft computes the update in float32, P and R upcast
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph
    preserves_outputs = False  # para and init_weights=false change the model at init

    def check(self, gm: fx.GraphModule, site: Any, options: DeftOptions) -> None:
        if mha := multihead_attention(site):
            raise OptionError(
                f"deft: peft does not support nn.MultiheadAttention ({mha[1]!r}); exclude it "
                "from targets"
            )
        if site.storage != "dense":
            raise OptionError(
                f"deft: {site.path!r} stores its weight as {site.storage!r}; peft's DeFT reads a "
                "dense weight (bitsandbytes' 4-bit storage is not one); keep the site dense or "
                "exclude it"
            )
        if format_of(site).compute_dtype(gm, site) in HALF and not options.autocast_adapter_dtype:
            raise OptionError(
                f"deft: {site.path!r} is float16/bfloat16 and autocast_adapter_dtype=false, where "
                "peft still computes DeFT in float32 from tensors in the base dtype, which peftc "
                "does not implement; keep autocast_adapter_dtype=true"
            )

    def options_at(self, site: Any, options: DeftOptions) -> DeftOptions:
        r = min(options.r, site.out_features)  # peft: the projector has rank <= out_features
        return dataclasses.replace(options, r=r) if r != options.r else options

    def params(self, ctx: Context) -> list[Param]:
        o, site = ctx.options, ctx.site
        W = ctx.weight().float()
        P = torch.empty(site.out_features, o.r, device=W.device).normal_(0.0, INIT_STD)
        params = [Param("deft_P", value=P)]
        if o.para:
            return params
        if o.init_weights:  # R = right^T W / s: the update starts at zero
            R = _project(P, o.decomposition_method)[1].t() @ W / o.scaling
        else:
            R = torch.empty(o.r, site.in_features, device=W.device)
            R.normal_(0.0, INIT_STD * o.init_scale)
        return [*params, Param("deft_R", value=R)]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        o = ctx.options
        return {"deft_dropout": nn.Dropout(o.dropout)} if o.dropout and not o.para else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        Q, right = self._projector(b)
        # bias-free base output, in the adapter's float32 as peft's `base_product`
        product = b.as_adapter(b.base, "base_upcast") if b.ctx.upcast else b.base
        if b.site.bias:
            bias = b.base_bias()
            bias = b.as_adapter(bias, "bias_upcast") if b.ctx.upcast else bias
            product = b.call(aten.sub.Tensor, product, bias, role="base_product")
        removed = b.call(aten.matmul.default, product, right, role="removal_coords")
        removed = b.call(aten.linear.default, removed, Q, role="removal")
        if b.options.para:
            return b.call(aten.neg.default, removed, role="deft")
        if b.options.dropout:
            x = b.module("deft_dropout", x, role="dropout")
        R = b.param("deft_R")
        if b.options.alpha:
            R = b.call(aten.mul.Tensor, R, b.options.scaling, role="R_scaled")
        injected = b.call(aten.linear.default, x, R, role="injection_coords")
        injected = b.call(aten.linear.default, injected, Q, role="injection")
        return b.call(aten.sub.Tensor, injected, removed, role="deft")

    @staticmethod
    def _projector(b: Builder) -> tuple[fx.Node, fx.Node]:
        """(Q, right) as graph values (peft's `_project`)."""
        P = b.param("deft_P")
        if b.options.decomposition_method == "qr":
            qr = b.call(aten.linalg_qr.default, P, "reduced", role="qr")
            Q = b.call(operator.getitem, qr, 0, role="Q")
            return Q, Q
        return P, b.call(aten.relu.default, P, role="right")

    def delta(self, ctx: Context) -> torch.Tensor:
        o = ctx.options
        Q, right = _project(ctx.tensor("deft_P"), o.decomposition_method)
        factor = right.t() @ ctx.weight().float()  # peft's `_merge_factor`
        if o.para:
            return -(Q @ factor)
        return Q @ (ctx.tensor("deft_R").float() * o.scaling - factor)

    def to_peft(self, options: DeftOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: DeftOptions, sites: list[Any]) -> str:
        variant = " PaRa" if options.para else ""
        return (
            f"DeFT{variant} r={options.r} {options.decomposition_method} on {len(sites)} sites, "
            f"adapter {options.adapter!r}"
        )
