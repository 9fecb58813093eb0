"""Prefix tuning: trainable keys and values of length `n` in front of every attention's own, as in
HF peft.

    sdpa(q, k, v, mask)  ->  sdpa(q, cat(P_k, k), cat(P_v, v), pad(mask, n visible key columns))
    positions 0..L-1     ->  positions n..n+L-1

1. Sites are `attention_sites(gm, targets)` in graph order (kind `sdpa`); site i is peft's layer i.
   Every site must have the same key/value heads and head_dim (token_dim = kv_heads * head_dim, as
   peft sets it for GQA models).
2. The parameter, shared by the adapter's sites, is peft's
   `prompt_encoder.<adapter>.embedding.weight`, (n, 2 * sites * token_dim); row t viewed as (2 *
   sites, kv_heads, head_dim): entry 2i is site i's key, 2i + 1 its value (peft's view (B, n, 2L,
   heads, hd) and permute to (2L, B, heads, n, hd)). With `prefix_projection=True` it is
   Embedding(n, token_dim) -> Linear -> Tanh -> Linear, at peft's names
   `prompt_encoder.<adapter>.transform.{0,2}.{weight,bias}`, computed once for all sites.
3. GQA: where the graph repeats key and value per query head (`repeat_kv`), the prefix heads are
   repeated the same way (`repeat_interleave`) and joined after the repeat; with SDPA's
   `enable_gqa=True` they are joined as they are.
4. Masks: a bool or float mask gets n visible columns in front (True / 0.0), once per mask; SDPA
   without a mask and `is_causal=True` gets an explicit causal mask whose first n columns are
   visible.
5. Positions: peft runs the model with a cache of n entries, so the user's tokens are numbered
   n..n+L-1 (rotary and learned absolute positions alike): every position-id source found by
   `regions.position_ids` is shifted by n.
6. Checkpoints are peft's PREFIX_TUNING (`peftc.save_adapter`): `prompt_embeddings`, the flat prefix
   (n, 2 * layers * token_dim) after any projection (what peft saves). A loaded prefix is the flat
   parameter, as peft's `inference_mode`: a projection cannot be recovered from its output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError, PassError
from peftc.sites.regions import AttentionSite, attention_call, attention_sites, position_ids
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    one_of,
    option,
    pattern,
    positive,
    register_technique,
)
from peftc.technique.options import peft_task_type

__all__ = ["PrefixOptions", "Prefix", "extend_mask", "kv_shape"]

aten = torch.ops.aten


@dataclass(frozen=True)
class PrefixOptions(AdapterOptions):
    targets: str | None = option(
        None, doc="the attention modules that get a prefix (all by default)", check=pattern
    )
    n: int = option(
        20,
        doc="virtual tokens: keys and values in front of every attention's",
        check=positive,
        aliases=("num_virtual_tokens",),
        peft="num_virtual_tokens",
    )
    prefix_projection: bool = option(
        False,
        doc="compute the prefix with peft's Embedding-Linear-Tanh-Linear "
        "(a checkpoint holds its output, so it loads without)",
        peft="prefix_projection",
        decode=lambda _: False,
    )
    encoder_hidden_size: int | None = option(
        None,
        doc="the projection's hidden size (None: token_dim, as peft)",
        check=positive,
        peft="encoder_hidden_size",
        decode=lambda _: None,
    )
    init: str = option(
        "normal",
        doc="`normal`: nn.Embedding's N(0, 1), as peft; `zero`: peft's init_weights=\"zero\"",
        check=one_of("normal", "zero"),
    )
    seed: int | None = option(None, doc="seed of the init (None: the global generator)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise OptionError(
                "prefix: encoder_hidden_size only applies with prefix_projection=True; set it or "
                "drop encoder_hidden_size"
            )


def kv_shape(sites: list[AttentionSite]) -> tuple[int, int]:
    shapes = {(s.num_kv_heads, s.head_dim) for s in sites}
    if len(shapes) != 1 or None in next(iter(shapes)):
        raise PassError(
            "prefix: attention sites differ in key/value heads or head_dim, or they are unknown "
            f"({sorted(map(str, shapes))}); select sites of one shape with targets="
        )
    return next(iter(shapes))  # type: ignore[return-value]


@register_technique
class Prefix(Technique):
    """Prefix tuning: `n` trainable keys and values in front of each attention's, as peft's
    PREFIX_TUNING.

    1. One flat parameter `prompt_encoder.<adapter>.embedding.weight` (n, 2 * layers * kv_heads *
       head_dim),
       or with `prefix_projection=True` peft's Embedding -> Linear -> Tanh -> Linear.
    2. Masks get n visible columns in front; position ids are shifted by n, as peft's cache of n
       numbers them.
    """

    prompt_learning = True
    name = "prefix"
    # its tensors are float32 whatever the model's dtype, as peft's (cast where they are read)
    half_precision = "base"
    options = PrefixOptions
    peft_type = "PREFIX_TUNING"
    peft_fixed = {"num_transformer_submodules": 1}
    # the model's sizes: the tensor's shape says
    peft_ignored = (
        "token_dim",
        "num_attention_heads",
        "num_layers",
    )
    site_kinds = ("sdpa",)
    stage = "input"
    exclusive = True
    mergeable = False
    preserves_outputs = False  # a random prefix changes what attention sees

    def select(self, gm: fx.GraphModule, options: PrefixOptions) -> list[tuple[Any, str]]:
        sites = attention_sites(gm, options.targets)
        if not sites:
            raise PassError(
                "prefix: the graph has no attention sites (scaled_dot_product_attention); capture "
                "the model with attn_implementation='sdpa' to use prefix tuning"
            )
        kv_shape(sites)
        return [(site, site.path) for site in sites]

    def shared_params(
        self, gm: fx.GraphModule, sites: list[AttentionSite], options: PrefixOptions
    ) -> list[Param]:
        kv_heads, head_dim = kv_shape(sites)
        token_dim, n = kv_heads * head_dim, options.n
        width = 2 * len(sites) * token_dim
        generator = (
            torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        )

        def param(
            suffix: str, shape: tuple[int, ...], key: str, zero: bool = False, fan_in: int = 0
        ) -> Param:
            if zero:
                value = torch.zeros(shape)
            elif fan_in:  # nn.Linear's default init
                value = torch.empty(shape).uniform_(
                    -(fan_in**-0.5), fan_in**-0.5, generator=generator
                )
            else:
                value = torch.randn(shape, generator=generator)
            # float32 whatever the model's dtype, as peft's PrefixEncoder (cast where it is read)
            return Param("prompt_encoder", value=value, suffix=suffix, key=key, dtype=torch.float32)

        zero = options.init == "zero"
        if not options.prefix_projection:
            return [param("embedding.weight", (n, width), "embedding", zero)]
        hidden = options.encoder_hidden_size or token_dim
        return [
            param("embedding.weight", (n, token_dim), "embedding"),
            param("transform.0.weight", (hidden, token_dim), "w0", fan_in=token_dim),
            param("transform.0.bias", (hidden,), "b0", fan_in=token_dim),
            param("transform.2.weight", (width, hidden), "w2", zero, hidden),
            param("transform.2.bias", (width,), "b2", zero, hidden),
        ]

    def build(self, b: Builder, sdpa: fx.Node) -> fx.Node:
        site: AttentionSite = b.site
        n, layers = b.options.n, len(b.ctx.sites)
        kv = b.once("kv", lambda: _kv(b, self.rows(b), n, layers, *kv_shape([site])))
        b.once("positions", lambda: shift_positions(b, n))
        mask = extend_mask(site, n, b.once("masks", dict), node_caller(b))
        b.rewrite(*attention_call(site, *join_prefix(b, site, kv, b.ctx.index), mask))
        return sdpa

    def rows(self, b: Builder) -> fx.Node:
        """The (n, 2 * layers * kv_heads * head_dim) keys and values, flat: the embedding, or its
        projection (case 2)."""
        if not b.options.prefix_projection:
            return b.param("embedding")
        hidden = b.call(
            aten.tanh.default,
            b.call(
                aten.linear.default,
                b.param("embedding"),
                b.param("w0"),
                b.param("b0"),
                role="transform_0",
            ),
            role="tanh",
        )
        return b.call(aten.linear.default, hidden, b.param("w2"), b.param("b2"), role="prefix_flat")

    def checkpoint_key(self, key: str) -> str:
        return "prompt_embeddings" if key.endswith("prompt_encoder.embedding.weight") else key

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if not ctx.options.prefix_projection:
            return tensors
        t = {key: ctx.tensor(key).detach() for key in ("embedding", "w0", "b0", "w2", "b2")}
        hidden = torch.tanh(torch.nn.functional.linear(t["embedding"], t["w0"], t["b0"]))
        # what peft saves
        return {"prompt_embeddings": torch.nn.functional.linear(hidden, t["w2"], t["b2"])}

    def to_peft(self, options: PrefixOptions, sites: list[AttentionSite]) -> dict[str, Any]:
        kv_heads, head_dim = kv_shape(sites)
        return {
            "task_type": peft_task_type(sites[0].node.graph.owning_module),
            "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads,
            "num_layers": len(sites),
            "encoder_hidden_size": options.encoder_hidden_size or kv_heads * head_dim,
        }

    def describe(self, options: PrefixOptions, sites: list[Any]) -> str:
        return (
            f"{options.n} virtual tokens at {len(sites)} attention sites, adapter "
            f"{options.adapter!r}"
        )


def node_caller(b: Builder) -> Any:
    def call(target: Any, *args: Any, role: str, **kwargs: Any) -> fx.Node:
        return b.call(target, *args, role=role, **kwargs)

    return call


def _kv(b: Builder, flat: fx.Node, n: int, layers: int, kv_heads: int, head_dim: int) -> fx.Node:
    """(2L, kv_heads, n, head_dim): entry 2i keys, 2i + 1 values of site i (case 2)."""
    view = b.call(
        aten.reshape.default, flat, [n, 2 * layers, kv_heads, head_dim], role="prefix_view"
    )
    return b.call(aten.permute.default, view, [1, 2, 0, 3], role="prefix_kv")


def join_prefix(b: Builder, site: AttentionSite, kv: fx.Node, i: int) -> list[fx.Node]:
    """The site's key and value with the prefix's in front (case 3)."""
    kv_heads = kv_shape([site])[0]
    key_val = site.key.meta.get("val")
    heads = key_val.shape[-3] if isinstance(key_val, torch.Tensor) else kv_heads
    rep = int(heads) // kv_heads  # 1 without GQA or with enable_gqa=True
    batch = b.call(aten.sym_size.int, site.query, 0, role="batch")
    joined = []
    for index, tensor, name in ((2 * i, site.key, "key"), (2 * i + 1, site.value, "value")):
        p = b.call(aten.select.int, kv, 0, index, role=f"prefix_{name}")
        if rep > 1:  # transformers' repeat_kv gives query head h the kv head h // rep
            p = b.call(aten.repeat_interleave.self_int, p, rep, 0, role=f"prefix_{name}_repeat")
        val = tensor.meta.get("val")
        # peft casts to the model's
        if isinstance(val, torch.Tensor) and val.dtype != b.ctx.tensor("embedding").dtype:
            p = b.call(aten._to_copy.default, p, role=f"prefix_{name}_cast", dtype=val.dtype)
        p = b.call(
            aten.expand.default,
            b.call(aten.unsqueeze.default, p, 0, role=f"prefix_{name}_1"),
            [batch, -1, -1, -1],
            role=f"prefix_{name}_batch",
        )
        joined.append(b.call(aten.cat.default, [p, tensor], 2, role=f"{name}_with_prefix"))
    return joined


def extend_mask(site: AttentionSite, n: int, masks: dict, call: Any) -> fx.Node | None:
    """The site's mask with n visible key columns in front (case 4); a mask several sites share is
    extended once (`masks` keeps them). `call(target, *args, role=...)` inserts a node. Generation's
    key/value cache uses it too."""
    if site.mask is not None:
        # peft prepends n ones to attention_mask: every query sees the prefix
        if site.mask not in masks:
            masks[site.mask] = _pad(site.mask, n, call)
        return masks[site.mask]
    if not site.is_causal:
        return None
    # is_causal without a mask: query i (numbered n + i) sees keys 0..n + i of the joined sequence
    length = call(aten.sym_size.int, site.query, -2, role="query_length")
    total = call(operator.add, length, n, role="key_length")
    rows = call(
        aten.unsqueeze.default,
        call(aten.arange.default, length, role="query_positions"),
        1,
        role="rows",
    )
    cols = call(aten.arange.default, total, role="key_positions")
    return call(
        aten.le.Tensor,
        cols,
        call(aten.add.Tensor, rows, n, role="rows_shifted"),
        role="causal_mask",
    )


def _pad(mask: fx.Node, n: Any, call: Any) -> fx.Node:
    """`mask` with n visible columns in front (ones, or zeros in an additive mask), joined by cat:
    constant_pad_nd would specialize the symbolic batch and length in fake propagation."""
    val = mask.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else 4
    additive = isinstance(val, torch.Tensor) and val.dtype != torch.bool
    first = call(aten.slice.Tensor, mask, -1, 0, 1, role="mask_column")
    fill = aten.zeros_like.default if additive else aten.ones_like.default
    visible = call(fill, first, role="visible_column")
    columns = call(aten.expand.default, visible, [-1] * (rank - 1) + [n], role="visible_columns")
    return call(aten.cat.default, [columns, mask], -1, role="mask_with_prefix")


def shift_positions(b: Builder, n: int) -> list[fx.Node]:
    """Every position-id source shifted by n (case 5), its users rerouted."""
    shifted = []
    for source in position_ids(b.gm):
        with b.at(source):
            shifted.append(
                b.reroute(source, b.call(aten.add.Tensor, source, n, role="positions_shifted"))
            )
    return shifted
