"""FRoD: each adapted weight rebuilt on a basis shared by its category, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + U (S + diag(λ)) V^T h - W h,   h = dropout(x)

1. Sites are grouped by category (peft's `_category_from_key`: the path's last two parts,
   `self_attn_q_proj`; the last alone after a number; BERT's `attention.output.dense` is
   `attention_output`). Each category of an adapter shares a frozen basis V (in, in), from its
   weights stacked in layer order (the number after `layers`, else the first number in the path,
   else the position among the sites in module order): an SVD's right vectors where the stack has
   fewer rows than columns, else R^T times the eigenvectors of the mean over layers of
   `inv(Q_i^T Q_i + regularization_alpha I)`, (Q, R) the stack's QR.
2. Each category also shares the positions of S's trainable entries: `sparse_rate` of in * in
   off-diagonal positions (at least one where the rate is positive), drawn with `randperm` from one
   CPU generator seeded with `projection_prng_key`, the categories in sorted order.
3. Per site, W V^{-T} (float64; a pseudo-inverse where V is singular) splits into unit columns U
   (out, in), a frozen buffer peft recomputes rather than saves, and their norms λ (in,), trained
   (`frod_lambda_l`); S's values (`frod_lambda_s_values`) start at zero, so at init the model
   computes what it did up to rounding. `init_weights=false`: S ~ N(0, 0.1²), λ += N(0, 0.1²).
4. The term is peft's whenever its base output is computed (several adapters, dropout in training);
   alone and in eval peft computes `U (S + diag λ) V^T x + b` directly, the same up to rounding.
   Merging adds `U (S + diag λ) V^T - W0`, W0 the weight before any merge, as peft.
5. Dense float32 linear sites (nn.Linear, GPT-2's Conv1D); NF4 linears, nn.MultiheadAttention's
   projections, float16/bfloat16 weights and `bias` other than "none" are refused by name.
Tensors: `<path>.frod_lambda_l.<adapter>`, `<path>.frod_lambda_s_values.<adapter>`, the buffer
`<path>.frod_U.<adapter>` (never saved); shared: `frod_V.<category>.<adapter>`,
`frod_s_indices.<category>.<adapter>`, `frod_s_size.<category>.<adapter>`, saved as peft's
`base_model.frod_V.<category>` with `save_projection=true`, else regenerated from the weights.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.sites.formats import format_of, read_weight
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    dropout_option,
    option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["FrodOptions", "Frod", "category"]

aten = torch.ops.aten
SHARED = ("frod_V", "frod_s_indices", "frod_s_size")


@dataclass(frozen=True)
class FrodOptions(AdapterOptions):
    dropout: float = dropout_option("frod_dropout")
    sparse_rate: float = option(
        0.01,
        doc="fraction of S's in * in entries that train (off the diagonal)",
        check=lambda v: None if 0 <= v <= 1 else "in [0, 1]",
        peft="sparse_rate",
    )
    regularization_alpha: float = option(
        1e-3, doc="ridge term of the shared basis' inverses", peft="regularization_alpha"
    )
    projection_prng_key: int = option(
        0, doc="seed of S's positions (peft's generator)", peft="projection_prng_key"
    )
    save_projection: bool = option(
        True,
        doc="save V and S's positions in the checkpoint (else regenerated from the weights)",
        peft="save_projection",
    )
    init_weights: bool = option(
        True,
        doc="S = 0 (the identity at init); false: S ~ N(0, 0.1²), λ += N(0, 0.1²)",
        peft="init_weights",
    )


def category(path: str) -> str:
    """peft's `_category_from_key`: the role a module plays in every block."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    name = f"{parts[-2]}_{parts[-1]}"
    if name == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return name


def _layer_index(path: str, fallback: int) -> int:
    """peft's `_layer_index_from_key`."""
    parts = path.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    return next((int(p) for p in parts if p.isdigit()), fallback)


def _basis(matrices: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """peft's `_projection_from_weights`: V (in, in) from one category's weights."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim, eye = r.shape[1], torch.eye(r.shape[1], dtype=r.dtype)
    t_pi = torch.zeros((dim, dim), dtype=r.dtype)
    for q_slice in q.split([m.shape[0] for m in matrices]):
        t_pi += torch.linalg.inv(q_slice.T @ q_slice + alpha * eye)
    t_pi /= len(matrices)
    return r.T @ torch.linalg.eigh(t_pi)[1]


def _positions(dim: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """S's trainable positions (2, nnz), drawn as peft draws them."""
    rows, cols = torch.meshgrid(torch.arange(dim), torch.arange(dim), indexing="ij")
    pairs = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    nnz = min(int(dim * dim * rate), pairs.shape[0])
    if rate > 0 and pairs.shape[0] > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    return pairs[torch.randperm(pairs.shape[0], generator=generator)[:nnz]].t().contiguous()


def _u_and_lambda(V: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's `_calculate_frod_u_and_lambda`: W V^{-T} as unit columns and their norms."""
    w, v = W.detach().double().cpu(), V.detach().double().cpu()
    try:
        bi = torch.linalg.solve(v, w.T).T
    except RuntimeError:  # a singular basis
        bi = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(bi, dim=0)
    u, nonzero = torch.zeros_like(bi), norms > 1e-12
    u[:, nonzero] = bi[:, nonzero] / norms[nonzero]
    return u.float(), norms.float()


def _in_module_order(gm: fx.GraphModule, sites: list[Any]) -> list[Any]:
    # peft walks named_modules: its order numbers the layers of paths without a number
    order = {path: i for i, path in enumerate(peftc_meta(gm).get("module_types", {}))}
    return sorted(sites, key=lambda s: order.get(s.path, len(order)))


def _dense_s(call: Any, indices: Any, values: Any, dim: int) -> Any:
    """S (in, in) from its positions and values (`call`: `Builder.call`, or eager)."""
    rows = call(aten.select.int, indices, 0, 0, role="s_rows")
    cols = call(aten.select.int, indices, 0, 1, role="s_cols")
    zeros = call(aten.new_zeros.default, values, [dim, dim], role="s_zeros")
    # duplicates add up, as peft's coalesce
    return call(aten.index_put.default, zeros, [rows, cols], values, True, role="frod_S")


@register_technique
class Frod(Technique):
    """Insert FRoD: `y = W x + b -> y = W x + b + U (S + diag λ) V^T h - W h`, a sparse rotation
    and scaling on a basis shared by each category of weights."""

    name = "frod"
    options = FrodOptions
    peft_type = "FROD"
    peft_fixed = {"bias": "none"}
    # the layout is read from the graph; the others place tensors or draw a bar, nothing more
    peft_ignored = ("fan_in_fan_out", "progressbar", "runtime_offload_base_weight")
    preserves_outputs = False  # init_weights=false draws S; true preserves them up to rounding

    def check(self, gm: fx.GraphModule, site: Any, options: FrodOptions) -> None:
        dtype = format_of(site).compute_dtype(gm, site)
        if multihead_attention(site):
            problem = "a projection of an nn.MultiheadAttention, which peft's FRoD never calls"
        elif getattr(site, "storage", None) == "nf4":
            problem = "an NF4 linear; peft's FRoD decomposes dense nn.Linear and Conv1D weights"
        elif dtype != torch.float32:
            problem = f"stored in {dtype}; peftc implements FRoD on float32 weights only"
        else:
            return
        raise OptionError(f"frod: {site.path!r} is {problem}; exclude it from targets")

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: FrodOptions
    ) -> list[Param]:
        weights: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for fallback, site in enumerate(_in_module_order(gm, sites)):
            weights[_layer_index(site.path, fallback)][category(site.path)] = read_weight(gm, site)
        generator = torch.Generator(device="cpu").manual_seed(options.projection_prng_key)
        params = []
        for name in sorted({c for layer in weights.values() for c in layer}):
            stack = [
                w[name].detach().float().cpu() for _, w in sorted(weights.items()) if name in w
            ]
            V = _basis(stack, options.regularization_alpha)
            indices = _positions(V.shape[0], options.sparse_rate, generator)
            size = torch.tensor([V.shape[0]] * 2)
            params += [
                Param(f"frod_V.{name}", value=V, trainable=False),
                Param(f"frod_s_indices.{name}", value=indices, trainable=False, dtype=torch.long),
                Param(f"frod_s_size.{name}", value=size, trainable=False, dtype=torch.long),
            ]
        return params

    def params(self, ctx: Context) -> list[Param]:
        name = category(ctx.site.path)
        U, L = _u_and_lambda(ctx.tensor(f"frod_V.{name}"), ctx.weight())
        nnz = ctx.tensor(f"frod_s_indices.{name}").shape[1]
        s_init = None
        if not ctx.options.init_weights:
            s_init = lambda t: nn.init.normal_(t, std=0.1)  # noqa: E731
            L = L + torch.randn_like(L) * 0.1
        return [
            Param("frod_lambda_l", value=L),
            Param("frod_lambda_s_values", (nnz,), init=s_init),
            Param("frod_U", value=U, trainable=False),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return {"frod_dropout": nn.Dropout(ctx.options.dropout)} if ctx.options.dropout else {}

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        name, dim = category(b.site.path), b.site.in_features
        if b.options.dropout:
            x = b.module("frod_dropout", x, role="dropout")
        values = b.param("frod_lambda_s_values")
        S = _dense_s(b.call, b.param(f"frod_s_indices.{name}"), values, dim)
        V_t = b.call(aten.t.default, b.param(f"frod_V.{name}"), role="V_t")
        z = b.call(aten.linear.default, x, V_t, role="z")
        z_s = b.call(aten.linear.default, z, S, role="z_S")
        z_l = b.call(aten.mul.Tensor, z, b.param("frod_lambda_l"), role="z_L")
        rotated = b.call(aten.add.Tensor, z_s, z_l, role="z_SL")
        out = b.call(aten.linear.default, rotated, b.param("frod_U"), role="frod_out")
        # the term replaces W h by the rebuilt weight's output
        base = b.call(aten.linear.default, x, b.weight(), role="base_out")
        return b.call(aten.sub.Tensor, out, base, role="frod")

    def delta(self, ctx: Context) -> torch.Tensor:
        # ctx.weight() is the weight before any merge (the core restores it first), peft's W0
        name = category(ctx.site.path)
        values = ctx.tensor("frod_lambda_s_values").float()
        S = _dense_s(eager, ctx.tensor(f"frod_s_indices.{name}"), values, ctx.site.in_features)
        core = S + torch.diag(ctx.tensor("frod_lambda_l").float())
        U, V = ctx.tensor("frod_U").float(), ctx.tensor(f"frod_V.{name}").float()
        return U @ core @ V.T - ctx.weight()

    def saved(self, options: FrodOptions, attr: str) -> bool:
        # peft recomputes U from W and V; V and S's positions only with save_projection
        shared = attr.partition(".")[0] in SHARED
        return attr != "frod_U" and (options.save_projection or not shared)

    def to_peft(self, options: FrodOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: FrodOptions, sites: list[Any]) -> str:
        names = sorted({category(s.path) for s in sites})
        return (
            f"FRoD sparse_rate={options.sparse_rate} on {len(sites)} sites in {len(names)} "
            f"categories, adapter {options.adapter!r}"
        )
