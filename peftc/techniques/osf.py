"""OSF: orthogonal subspace fine-tuning, training the low singular directions of W, as HF peft 0.21.

    y = W x + b  ->  y = W x + b + (U S V - U0 S0 V0) x,   W = Uh Sh Vh + U0 S0 V0  (its SVD)

1. W's SVD (in float32) is split at k = effective_rank: the top k directions (Uh, Sh, Vh) stay
   frozen, the rest start the trainable U (out, m), S (m,), V (m, in), m = min(out, in) - k, and
   are also kept frozen as U0, S0, V0 (peft's non-persistent buffers, recomputed from W on load).
2. k: `effective_rank` (None: half of min(out, in); a float in (0, 1]: that fraction of it), or the
   value of the first `rank_pattern` regex found in the site's path (`re.search`, peft's rule),
   clipped to min(out, in). A k of 0 is refused, as peft refuses it.
3. Gradients: peft projects U's and V's gradients off the frozen subspace with tensor hooks. Here
   the term reads U as `U + (P(U) - P(U).detach())`: the value is U exactly and its gradient is
   P's adjoint, which is P, so the gradients are peft's. P(U) = U - Uh (Uh^T U) when out > in,
   else U0 (U0^T U); P(V) = V - (V Vh^T) Vh when in > out, else (V V0^T) V0 (peft's choice).
4. The term is computed as peft does: linear(linear(x, [V; V0]), [U S, -U0 S0]).
5. Merging adds U S V - U0 S0 V0 to W. peft refuses to unmerge OSF; peftc's unmerge gives back the
   kept base weight exactly.
6. Over a float16/bfloat16 base the tensors are in its dtype (`autocast_adapter_dtype=false`).
   With peft's default `autocast_adapter_dtype=true` peft replaces U and V by float32 copies and
   the projection hooks stay on the old tensors: it trains without the projection, which is not
   OSF, so peftc refuses it there.
Dense nn.Linear sites only, one active OSF adapter per site (peft runs only the first active one,
so a second is refused): GPT-2's Conv1D and quantized weights are refused by name.
Tensors: `<path>.osf_svd_params.<adapter>.U_low`, `.S_low`, `.V_low`; buffers
`<path>._osf_U_low_init.<adapter>` (and `_osf_S_low_init`, `_osf_V_low_init`, `_osf_U_high` or
`_osf_V_high`), not saved.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    register_technique,
)

__all__ = ["OsfOptions", "Osf"]

aten = torch.ops.aten
TRAINED = ("U_low", "S_low", "V_low")
FROZEN = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high")


def _pairs(value: tuple) -> str | None:
    ok = all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value)
    return None if ok else "[regex, rank] pairs (peft: a dict)"


@dataclass(frozen=True)
class OsfOptions(AdapterOptions):
    effective_rank: int | float | None = option(
        None,
        doc="singular directions kept frozen: an int, a float in (0, 1] (a fraction of "
        "min(out, in)), or None (half of it); the rest are trained",
        peft="effective_rank",
    )
    rank_pattern: tuple[tuple[str, int | float], ...] = option(
        (),
        doc="[regex, effective_rank] pairs: a site whose path contains the regex (the first that "
        "does) takes that effective_rank, as peft's rank_pattern",
        check=_pairs,
        peft="rank_pattern",
        encode=lambda v: dict(v) or None,
        decode=lambda v: tuple((v or {}).items()),
    )


def frozen_rank(value: int | float | None, min_dim: int) -> int:
    """peft's `_resolve_rank`: the number of frozen directions at a site."""
    if value is None:
        return min_dim // 2
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


def _split(ctx: Context) -> dict[str, torch.Tensor]:
    """peft's decompose_weight_matrix: W's SVD in float32, split at the frozen rank."""
    site = ctx.site
    weight = ctx.weight().to(ctx.base_dtype).float()  # peft: weight.to(float32)
    U, S, Vt = torch.linalg.svd(weight, full_matrices=False)
    k = frozen_rank(ctx.options.effective_rank, min(site.out_features, site.in_features))
    return {
        "U_low": U[:, k:],
        "S_low": S[k:],
        "V_low": Vt[k:, :],
        "_osf_U_high": U[:, :k],
        "_osf_V_high": Vt[:k, :],
    }


def _projection(b: Builder, name: str, value: fx.Node) -> fx.Node:
    """P(value), in peft's order of operations (case 3)."""
    left = name == "U_low"

    def mm(a: fx.Node, c: fx.Node) -> fx.Node:
        return b.call(aten.mm.default, a, c, role=f"{name}_projection")

    def t(a: fx.Node) -> fx.Node:
        return b.call(aten.t.default, a, role=f"{name}_basis_t")

    high = "_osf_U_high" if left else "_osf_V_high"
    if high in b.ctx.names:  # non-square factor: remove the frozen directions
        H = b.param(high)
        inner = mm(H, mm(t(H), value)) if left else mm(mm(value, t(H)), H)
        return b.call(aten.sub.Tensor, value, inner, role=f"{name}_projected")
    L = b.param("_osf_U_low_init" if left else "_osf_V_low_init")  # square: the low directions
    return mm(L, mm(t(L), value)) if left else mm(mm(value, t(L)), L)


def _projected(b: Builder, name: str) -> fx.Node:
    """Tensor `name` exactly, its gradient projected off the frozen subspace:
    value.detach() + (P(value) - P(value).detach())."""
    value = b.param(name)
    projection = _projection(b, name, value)
    detached = b.call(aten.detach.default, projection, role=f"{name}_projected_detached")
    zero = b.call(aten.sub.Tensor, projection, detached, role=f"{name}_zero")
    value = b.call(aten.detach.default, value, role=f"{name}_detached")
    return b.call(aten.add.Tensor, value, zero, role=f"{name}_with_projected_gradient")


@register_technique
class Osf(Technique):
    """Insert OSF: `y = W x + b -> y = W x + b + (U S V - U0 S0 V0) x`, training W's low singular
    directions with gradients kept off its top ones."""

    name, options, peft_type = "osf", OsfOptions, "OSF"
    exclusive = True  # peft's forward runs only the first active adapter
    # peft's upcast replaces U and V, dropping its projection hooks (case 6): refused there
    half_precision = None
    # a checkpoint brings its own U, S, V; target_svd_config is accepted and ignored by peft too
    peft_fixed = {"init_weights": True}
    peft_ignored = ("init_weights", "target_svd_config")

    def check(self, gm: fx.GraphModule, site: Any, options: OsfOptions) -> None:
        if site.fan_in_fan_out:
            raise OptionError(
                f"osf: {site.path!r} is a GPT-2 Conv1D, which peft's OSF does not adapt "
                "(nn.Linear only); exclude it from targets"
            )
        if site.storage != "dense":
            raise OptionError(
                f"osf: {site.path!r} stores its weight as {site.storage!r}; OSF takes the SVD of a "
                "dense weight; keep the site dense or exclude it"
            )
        min_dim = min(site.out_features, site.in_features)
        if frozen_rank(options.effective_rank, min_dim) <= 0:
            raise OptionError(
                f"osf: effective_rank={options.effective_rank!r} keeps no direction of "
                f"{site.path!r} (min(out, in) = {min_dim}) frozen, which peft refuses; give a "
                "positive effective_rank"
            )

    def options_at(self, site: Any, options: OsfOptions) -> OsfOptions:
        key = self.peft_key(site)
        rank = next((r for p, r in options.rank_pattern if re.search(p, key)), None)
        return options if rank is None else dataclasses.replace(options, effective_rank=rank)

    def params(self, ctx: Context) -> list[Param]:
        parts = _split(ctx)
        trained = [Param("osf_svd_params", value=parts[a], suffix=a, key=a) for a in TRAINED]
        frozen = [Param(f"_osf_{a}_init", value=parts[a], trainable=False) for a in TRAINED]
        # peft keeps only the high factor a low one cannot stand in for (case 3)
        out, inp = ctx.site.out_features, ctx.site.in_features
        if out > inp:
            frozen.append(Param("_osf_U_high", value=parts["_osf_U_high"], trainable=False))
        if inp > out:
            frozen.append(Param("_osf_V_high", value=parts["_osf_V_high"], trainable=False))
        return trained + frozen

    def saved(self, options: OsfOptions, attr: str) -> bool:
        return attr not in FROZEN  # peft recomputes them from W

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        U = _projected(b, "U_low")
        V = _projected(b, "V_low")
        US = b.call(aten.mul.Tensor, U, b.param("S_low"), role="US")
        US0 = b.call(
            aten.mul.Tensor, b.param("_osf_U_low_init"), b.param("_osf_S_low_init"), role="US0"
        )
        A = b.call(
            aten.cat.default, [US, b.call(aten.neg.default, US0, role="minus_US0")], 1, role="A"
        )
        B = b.call(aten.cat.default, [V, b.param("_osf_V_low_init")], 0, role="B")
        h = b.call(aten.linear.default, x, B, role="osf_B_out")
        return b.call(aten.linear.default, h, A, role="osf")

    def delta(self, ctx: Context) -> torch.Tensor:
        current = (ctx.tensor("U_low") * ctx.tensor("S_low")) @ ctx.tensor("V_low")
        initial = (ctx.tensor("_osf_U_low_init") * ctx.tensor("_osf_S_low_init")) @ ctx.tensor(
            "_osf_V_low_init"
        )
        return (current - initial).float()

    def describe(self, options: OsfOptions, sites: list[Any]) -> str:
        rank = "half" if options.effective_rank is None else options.effective_rank
        return f"OSF effective_rank={rank} on {len(sites)} sites, adapter {options.adapter!r}"
