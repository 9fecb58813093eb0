"""DeLoRA: a low-rank update whose norm is bounded by a trainable λ, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + B (s ⊙ (A (n ⊙ dropout(x)))),   s = (λ / r) / (‖A_i‖ ‖B^i‖)

1. A (r, in) is Kaiming-uniform and B (out, r) zero (`init_weights=false`: Kaiming-uniform too, so
   the model changes at init); λ (1,) starts at `delora_lambda`. s divides by the norm of each row
   of A and each column of B, each clamped below at 1e-4.
2. n (in,) is the norm of each column of W when the adapter is created, a frozen buffer saved in the
   checkpoint (peft's `delora_w_norm`), so the update is scaled by the weight it adapts.
3. `rank_pattern` and `lambda_pattern` give a site its own r and λ (peft's `get_pattern_key`: the
   first key the path ends with, after a dot).
4. Merging adds `B diag(s) A ⊙ n` (n over the columns) to W; the bias is unchanged.
5. Over a float16/bfloat16 base the four tensors are float32 (peft's autocast_adapter_dtype) and
   the term is rounded to the base's dtype before it is added, as peft sums it.
Dense linear sites only, as peft (nn.Linear): GPT-2's Conv1D, quantized weights (peft cannot take
the norm of a packed 4-bit weight) and `bias` other than "none" are refused by name.
Tensors: `<path>.delora_A.<adapter>`, `delora_B`, `delora_lambda`, `delora_w_norm` (a buffer).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Any

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

__all__ = ["DeloraOptions", "Delora"]

aten = torch.ops.aten
NORM_FLOOR = 1e-4  # peft clamps the norms of A's rows and B's columns to this


def _ranks(value: tuple) -> str | None:
    return None if all(r > 0 for _, r in value) else "[regex, positive rank] pairs"


def _per_site(peft: str, what: str, check: Any) -> Any:
    return option(
        (),
        doc=f"[regex, {what}] pairs: a site whose path ends with the regex (the first that "
        f"matches) takes that {what}, as peft's {peft}",
        check=check,
        peft=peft,
        encode=dict,
        decode=lambda v: tuple((v or {}).items()),
    )


def _matching(pairs: tuple, path: str) -> Any:
    """peft's get_pattern_key: the value of the first pattern `path` ends with (after a dot)."""
    return next((v for p, v in pairs if re.match(rf"(.*\.)?({p})$", path)), None)


@dataclass(frozen=True)
class DeloraOptions(AdapterOptions):
    r: int = rank_option(8, "rank of A (r x in) and B (out x r)")
    delora_lambda: float = option(
        15.0, doc="initial λ, the bound on the update's norm", peft="delora_lambda"
    )
    dropout: float = dropout_option("module_dropout", "dropout on the branch's input")
    init_weights: bool = option(
        True, doc="B starts at zero (false: Kaiming-uniform, as A)", peft="init_weights"
    )
    rank_pattern: tuple[tuple[str, int], ...] = _per_site("rank_pattern", "rank", _ranks)
    lambda_pattern: tuple[tuple[str, float], ...] = _per_site("lambda_pattern", "λ", None)


@register_technique
class Delora(Technique):
    """Insert DeLoRA branches: `y = W x + b -> y = W x + b + B (s ⊙ A (n ⊙ dropout(x)))`, the
    update's norm bounded by the trainable λ."""

    name, options, peft_type = "delora", DeloraOptions, "DELORA"
    half_precision = "float32"  # peft upcasts all four tensors, the buffer too
    peft_fixed = {"bias": "none"}
    preserves_outputs = False  # init_weights=false changes the model at init

    def check(self, gm: fx.GraphModule, site: Any, options: DeloraOptions) -> None:
        if site.fan_in_fan_out:
            raise OptionError(
                f"delora: {site.path!r} is a GPT-2 Conv1D, which peft's DeLoRA does not support "
                "(nn.Linear only); exclude it from targets"
            )
        if site.storage != "dense":
            raise OptionError(
                f"delora: {site.path!r} stores its weight as {site.storage!r}; peft's DeLoRA takes "
                "the norm of a dense nn.Linear weight (bitsandbytes' 4-bit layers fail); keep the "
                "site dense or exclude it"
            )

    def options_at(self, site: Any, options: DeloraOptions) -> DeloraOptions:
        r = _matching(options.rank_pattern, self.peft_key(site))
        lam = _matching(options.lambda_pattern, self.peft_key(site))
        changed = {k: v for k, v in (("r", r), ("delora_lambda", lam)) if v is not None}
        return dataclasses.replace(options, **changed) if changed else options

    def check_options_at(self, gm: fx.GraphModule, options: DeloraOptions, sites: list) -> None:
        keys = [self.peft_key(s) for s in sites]
        pairs = options.rank_pattern + options.lambda_pattern
        unmatched = [p for p, _ in pairs if not any(_matching(((p, 1),), k) for k in keys)]
        if unmatched:
            warnings.warn(
                f"delora: rank_pattern / lambda_pattern keys {unmatched} match no site and are "
                "ignored, as peft ignores them",
                stacklevel=2,
            )

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        # peft's torch.norm(W, dim=0), in the weight's own dtype
        w_norm = torch.linalg.vector_norm(ctx.weight().to(ctx.base_dtype), dim=0)
        return [
            Param("delora_A", (o.r, site.in_features), init=kaiming_uniform),
            Param(
                "delora_B",
                (site.out_features, o.r),
                init=None if o.init_weights else kaiming_uniform,
            ),
            Param("delora_lambda", (1,), init=lambda t: t.fill_(float(o.delora_lambda))),
            Param("delora_w_norm", value=w_norm, trainable=False),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"delora_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        if b.options.dropout:
            x = b.module("delora_dropout", x, role="dropout")
        # peft's order: B ((lambda / r) / (|A_i| |B^i|) * A (x * w_norm))
        x = b.call(aten.mul.Tensor, x, b.param("delora_w_norm"), role="x_scaled")
        h = b.call(aten.linear.default, x, b.param("delora_A"), role="delora_A_out")
        A_norm = b.call(aten.linalg_vector_norm.default, b.param("delora_A"), 2, [1], role="A_norm")
        B_norm = b.call(aten.linalg_vector_norm.default, b.param("delora_B"), 2, [0], role="B_norm")
        norms = b.call(
            aten.mul.Tensor,
            b.call(aten.clamp.default, A_norm, NORM_FLOOR, role="A_norm_clamped"),
            b.call(aten.clamp.default, B_norm, NORM_FLOOR, role="B_norm_clamped"),
            role="norms",
        )
        lam = b.call(aten.div.Tensor, b.param("delora_lambda"), b.options.r, role="lambda_r")
        scaling = b.call(aten.div.Tensor, lam, norms, role="scaling")
        h = b.call(aten.mul.Tensor, h, scaling, role="scaled")
        h = b.call(aten.linear.default, h, b.param("delora_B"), role="delora_B_out")
        if b.ctx.upcast:  # peft sums the terms in the base's dtype (add_out = zeros_like(base_out))
            h = b.call(aten._to_copy.default, h, dtype=b.ctx.base_dtype, role="term_downcast")
        return h

    def delta(self, ctx: Context) -> torch.Tensor:
        A, B = ctx.tensor("delora_A").float(), ctx.tensor("delora_B").float()
        norms = A.norm(dim=1).clamp(min=NORM_FLOOR) * B.norm(dim=0).clamp(min=NORM_FLOOR)
        scaling = ctx.tensor("delora_lambda").float() / ctx.options.r / norms
        return (B * scaling) @ A * ctx.tensor("delora_w_norm").float()

    def describe(self, options: DeloraOptions, sites: list[Any]) -> str:
        return (
            f"DeLoRA r={options.r} lambda={options.delora_lambda} on {len(sites)} sites, adapter "
            f"{options.adapter!r}"
        )
