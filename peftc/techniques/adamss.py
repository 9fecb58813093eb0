"""AdaMSS: low-rank updates in subspaces clustered from the weight's SVD, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + P cat_k(B_k A_k (N [x; 1]))

1. [W | b] (the bias as an extra column, where the layer has one) is decomposed by
   `torch.svd_lowrank` (rank R = min(r, out, in + 1), niter=2, seeded by `random_seed` on a forked
   RNG): U (out, R), V^T (R, in + 1). N = V^T is a frozen buffer, saved (peft's `adamss_newB`).
2. The rows of U are clustered by scikit-learn's KMeans (init="random", one run of 10 iterations,
   random_state=123456789) into K = min(num_subspaces, out) subspaces; subspace k owns the output
   rows of its cluster, in increasing order, and P puts each row back in place (peft's scatter).
   Loading a checkpoint recomputes the clustering from the base weight, as peft does.
3. Each subspace trains A_k (r_k, R), started at an orthonormal basis of its rows of U (QR, as
   peft), and B_k (rows_k, r_k), zero (`init_weights="orthogonal"`) or N(0, 0.01^2) (None);
   r_k = min(rows_k, subspace_rank), or with `use_dynamic_rank` the number of singular values of
   the subspace's Gram matrix above `svd_threshold` times the largest (at most subspace_rank).
4. Merging adds P cat_k(B_k A_k N) to [W | b]: its last column to the bias.
5. ASA (`use_asa`), peft's pruning of subspaces while training (`update_and_allocate`), is not
   implemented: its options load and are saved back, and every subspace trains (a warning says so).
Dense nn.Linear sites only, as peft: GPT-2's Conv1D, nn.MultiheadAttention's projections and
quantized weights are refused by name. Over a float16/bfloat16 base peft keeps A and B in float32
and computes in the base dtype, which peftc does not implement (the core refuses it by name);
`autocast_adapter_dtype=false` (every tensor in the base dtype) is exact.
Tensors: `<path>.adamss_A.<adapter>.<k>`, `adamss_B` (saved as peft's `<path>.adamss_A.<k>`),
`adamss_newB`, and `adamss_index` (the inverse of P, not saved: peft recomputes it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.techniques.lora import multihead_attention

__all__ = ["AdamssOptions", "Adamss"]

aten = torch.ops.aten
KMEANS_SEED, KMEANS_ITERATIONS = 123456789, 10  # peft's clustering_Z


def _asa(default: Any, doc: str, peft: str) -> Any:
    return option(default, doc=f"{doc} (ASA, not run by peftc)", peft=peft)


@dataclass(frozen=True)
class AdamssOptions(AdapterOptions):
    r: int = rank_option(100, "rank R of the weight's SVD, clamped to min(r, out, in + bias)")
    num_subspaces: int = option(
        5, doc="subspaces K the SVD's rows are clustered into", check=positive, peft="num_subspaces"
    )
    subspace_rank: int = option(
        1, doc="rank of each subspace's A and B", check=positive, peft="subspace_rank"
    )
    init_weights: Literal["orthogonal"] | None = option(
        "orthogonal",
        doc='"orthogonal": B starts at zero (the identity); None: B ~ N(0, 0.01^2)',
        peft="init_weights",
        decode=lambda v: None if v is False else v,  # peft reads false as None
    )
    use_dynamic_rank: bool = option(
        False, doc="each subspace's rank from its singular values", peft="use_dynamic_rank"
    )
    svd_threshold: float = option(
        0.1,
        doc="use_dynamic_rank: the fraction of the largest singular value kept",
        peft="svd_threshold",
    )
    random_seed: int = option(0, doc="seed of the SVD's random projection", peft="random_seed")
    use_asa: bool = _asa(False, "prune subspaces by importance while training", "use_asa")
    asa_target_subspaces: int = _asa(50, "subspaces left after pruning", "asa_target_subspaces")
    init_warmup: int = _asa(50, "steps before pruning starts", "init_warmup")
    final_warmup: int = _asa(1000, "step at which pruning ends", "final_warmup")
    mask_interval: int = _asa(100, "steps between pruning masks", "mask_interval")
    asa_importance_beta: float = _asa(0.85, "importance smoothing", "asa_importance_beta")
    asa_uncertainty_beta: float = _asa(0.85, "uncertainty smoothing", "asa_uncertainty_beta")
    asa_schedule_exponent: float = _asa(3.0, "pruning schedule's exponent", "asa_schedule_exponent")

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = self.use_asa and (
            self.mask_interval <= 0
            or self.init_warmup >= self.final_warmup
            or self.asa_target_subspaces <= 0
            or self.asa_schedule_exponent <= 0
        )
        if bad:  # peft's AdamssConfig refuses these too
            raise OptionError(
                "adamss: with use_asa, mask_interval, asa_target_subspaces and "
                "asa_schedule_exponent must be positive and init_warmup < final_warmup"
            )


def _kmeans() -> Any:
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise OptionError(
            "adamss: peft's AdaMSS clusters the weight's SVD with scikit-learn's KMeans, which is "
            "not installed; pip install scikit-learn"
        ) from None
    return KMeans


def _svd(weight: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's slice_pca on one matrix: (U (out, R), V^T (R, in)), the projection seeded on a forked
    RNG of the weight's device."""
    device = weight.device
    forked = (
        {"devices": []}
        if device.type == "cpu"
        else {"devices": [device], "device_type": device.type}
    )
    rank = min(r, *weight.shape)
    with torch.random.fork_rng(**forked):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(weight, q=rank, niter=2, M=None)
    return U[:, :rank], V[:, :rank].T


def _clusters(U: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The output rows of each of peft's KMeans clusters of U's rows, in increasing order."""
    k = min(k, U.shape[0])
    kmeans = _kmeans()(
        n_clusters=k, init="random", n_init=1, max_iter=KMEANS_ITERATIONS, random_state=KMEANS_SEED
    )
    labels = torch.from_numpy(kmeans.fit_predict(U.detach().cpu().numpy().astype("float32")))
    return [torch.where(labels == i)[0] for i in range(int(labels.max()) + 1)]


def _rank(rows: torch.Tensor, o: AdamssOptions) -> int:
    """A subspace's rank: min(rows, subspace_rank), or from its Gram matrix's singular values."""
    if not o.use_dynamic_rank:
        return max(min(len(rows), o.subspace_rank), 1)
    gram = rows @ rows.T
    _, S, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)
    return max(min(int((S > o.svd_threshold * S[0]).sum()), o.subspace_rank, len(S)), 1)


def _a_init(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """peft's A: Q^T of the QR of rows^T U_gram, U_gram the top singular vectors of rows rows^T."""
    gram = rows @ rows.T
    U, _, _ = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=2)
    Q, _ = torch.linalg.qr(rows.T @ U[:, :rank], mode="reduced")
    return Q.T.contiguous()


def _weight_with_bias(ctx: Context) -> torch.Tensor:
    weight, bias = ctx.weight().float(), ctx.site.bias
    if not bias:
        return weight
    return torch.cat((weight, get_tensor(ctx.gm, bias).float().unsqueeze(1)), dim=1)


def _subspaces(ctx: Context) -> int:
    return sum(key[0] == "A" and key[1:].isdigit() for key in ctx.names)


def _small_normal(t: torch.Tensor) -> None:
    t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device) * 0.01)


@register_technique
class Adamss(Technique):
    """Insert AdaMSS: `y -> y + P cat_k(B_k A_k N [x; 1])`, subspaces clustered from the weight's
    SVD."""

    name, options, peft_type = "adamss", AdamssOptions, "ADAMSS"
    preserves_outputs = False  # init_weights=None draws B at random

    def check(self, gm: fx.GraphModule, site: Any, options: AdamssOptions) -> None:
        _kmeans()
        mha = multihead_attention(site)
        if site.fan_in_fan_out or mha:
            what = f"nn.MultiheadAttention {mha[1]!r}" if mha else f"GPT-2's Conv1D {site.path!r}"
            raise OptionError(
                f"adamss: peft's AdaMSS adapts nn.Linear layers only, not {what}; exclude it from "
                "targets"
            )
        if site.storage != "dense":
            raise OptionError(
                f"adamss: {site.path!r} stores its weight as {site.storage!r}; peft's AdaMSS "
                "decomposes a dense nn.Linear weight; keep the site dense or exclude it"
            )

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        U, VT = _svd(_weight_with_bias(ctx), o.r, o.random_seed)
        clusters = _clusters(U, o.num_subspaces)
        order = torch.cat(clusters)  # peft's scatter_index: output row of each delta row
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))
        params = [
            Param("adamss_newB", value=VT, trainable=False),
            Param("adamss_index", value=inverse, trainable=False, dtype=torch.long),
        ]
        for k, rows in enumerate(clusters):
            data = U[rows]
            rank = _rank(data, o)
            init = None if o.init_weights == "orthogonal" else _small_normal
            params += [
                Param("adamss_A", value=_a_init(data, rank), suffix=str(k), key=f"A{k}"),
                Param("adamss_B", (len(rows), rank), init, suffix=str(k), key=f"B{k}"),
            ]
        return params

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        n = b.param("adamss_newB")
        inp = b.site.in_features
        if b.site.bias:  # N [x; 1] = N[:, :in] x + N[:, in]
            weight = b.call(aten.slice.Tensor, n, 1, 0, inp, role="newB_weight")
            bias = b.call(aten.select.int, n, 1, inp, role="newB_bias")
            h = b.call(aten.linear.default, x, weight, bias, role="projected")
        else:
            h = b.call(aten.linear.default, x, n, role="projected")
        chunks = []
        for k in range(_subspaces(b.ctx)):
            a = b.call(aten.linear.default, h, b.param(f"A{k}"), role="adamss_A_out")
            chunks.append(b.call(aten.linear.default, a, b.param(f"B{k}"), role="adamss_B_out"))
        delta = b.call(aten.cat.default, chunks, -1, role="subspaces")
        index = b.param("adamss_index")
        return b.call(aten.index_select.default, delta, -1, index, role="adamss")

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = ctx.tensor("adamss_newB").float()
        chunks = [
            ctx.tensor(f"B{k}").float() @ ctx.tensor(f"A{k}").float() @ n
            for k in range(_subspaces(ctx))
        ]
        delta = torch.cat(chunks)[ctx.tensor("adamss_index")]  # (out, in [+ 1])
        weight = weight + delta[:, : weight.shape[1]].to(weight.dtype)
        if bias is not None and delta.shape[1] > weight.shape[1]:
            bias = bias + delta[:, -1].to(bias.dtype)
        return weight, bias

    def saved(self, options: AdamssOptions, attr: str) -> bool:
        return attr != "adamss_index"  # peft recomputes the clustering

    def after_insert(self, gm: fx.GraphModule, sites: list[Any], options: AdamssOptions) -> None:
        if options.use_asa:
            warnings.warn(
                "adamss: use_asa is set, and peftc does not run ASA (peft's update_and_allocate "
                "pruning of subspaces while training): every subspace stays trainable; the adapter "
                "loads, runs, merges and saves as peft's",
                stacklevel=2,
            )

    def describe(self, options: AdamssOptions, sites: list[Any]) -> str:
        return (
            f"AdaMSS r={options.r} num_subspaces={options.num_subspaces} subspace_rank="
            f"{options.subspace_rank} on {len(sites)} sites, adapter {options.adapter!r}"
        )
