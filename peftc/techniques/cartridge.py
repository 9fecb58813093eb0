"""Cartridge: a trainable key/value cache of length `n` in front of every attention's own, as HF
peft's CARTRIDGE; prefix tuning's rewrite without the projection, its first rows frozen.

    sdpa(q, k, v, mask)  ->  sdpa(q, cat(P_k, k), cat(P_v, v), pad(mask, n visible key columns))
    positions 0..L-1     ->  positions n..n+L-1
    P = cat(frozen (k, W), trainable (n - k, W)),  W = 2 * layers * kv_heads * head_dim

1. Sites, key/value layout, GQA, masks and positions are prefix tuning's
   (`peftc.techniques.prefix`, cases 1-5).
2. The tensors, shared by the adapter's sites, are peft's
   `prompt_encoder.<adapter>.frozen_embedding` (k = `num_frozen_tokens` rows, a frozen buffer;
   absent at k = 0) and `prompt_encoder.<adapter>.trainable_embedding` (n - k rows), both N(0, 1)
   and float32, as peft's.
3. Checkpoints are peft's: `prompt_embeddings` (n, W), the two joined; loading splits it at k.
4. Refused: merge (peft has none; it is not a weight update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.sites.regions import AttentionSite
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    non_negative,
    option,
    pattern,
    positive,
    register_technique,
)
from peftc.technique.options import peft_task_type
from peftc.techniques.prefix import (
    Prefix,
    kv_shape,
)

__all__ = ["CartridgeOptions", "Cartridge"]

aten = torch.ops.aten

FROZEN, TRAINABLE = "frozen_embedding", "trainable_embedding"


@dataclass(frozen=True)
class CartridgeOptions(AdapterOptions):
    targets: str | None = option(
        None, doc="the attention modules that get the cache (all by default)", check=pattern
    )
    n: int = option(
        20,
        doc="virtual tokens: keys and values in front of every attention's",
        check=positive,
        aliases=("num_virtual_tokens",),
        peft="num_virtual_tokens",
    )
    num_frozen_tokens: int = option(
        1,
        doc="the first virtual tokens, kept frozen (the paper's attention sink)",
        check=non_negative,
        peft="num_frozen_tokens",
    )
    seed: int | None = option(None, doc="seed of the init (None: the global generator)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frozen_tokens > self.n:
            raise OptionError(
                f"cartridge: num_frozen_tokens={self.num_frozen_tokens} exceeds n={self.n}; "
                "freeze at most n tokens"
            )


@register_technique
class Cartridge(Prefix):
    """Cartridge: `n` keys and values in front of each attention's, the first
    `num_frozen_tokens` frozen, as peft's CARTRIDGE (prefix tuning's sites and rewrite)."""

    name = "cartridge"
    options = CartridgeOptions
    peft_type = "CARTRIDGE"

    def shared_params(
        self, gm: fx.GraphModule, sites: list[AttentionSite], options: CartridgeOptions
    ) -> list[Param]:
        kv_heads, head_dim = kv_shape(sites)
        width, k = 2 * len(sites) * kv_heads * head_dim, options.num_frozen_tokens
        generator = (
            torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        )
        # peft draws the frozen rows first; float32 whatever the model's dtype, as peft's
        frozen = torch.randn((k, width), generator=generator)
        trainable = torch.randn((options.n - k, width), generator=generator)
        # key "embedding": prefix's join reads the adapter dtype from it
        params = [Param("prompt_encoder", value=trainable, suffix=TRAINABLE, key="embedding")]
        if k:
            params.insert(
                0,
                Param("prompt_encoder", value=frozen, suffix=FROZEN, key="frozen", trainable=False),
            )
        return params

    def rows(self, b: Builder) -> fx.Node:
        """The frozen rows, then the trained ones, as prefix tuning's flat keys and values."""
        flat = b.param("embedding")
        if b.options.num_frozen_tokens:
            flat = b.call(aten.cat.default, [b.param("frozen"), flat], 0, role="cartridge_flat")
        return flat

    def checkpoint_key(self, key: str) -> str:
        return key

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # peft saves the two joined (its encoder's output)
        parts = [
            t
            for suffix in (FROZEN, TRAINABLE)
            for key, t in tensors.items()
            if key.endswith(suffix)
        ]
        return {"prompt_embeddings": torch.cat(parts, 0)}

    def from_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if "prompt_embeddings" not in tensors:
            return tensors  # the key check names what is missing
        rest = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
        joined, k = tensors["prompt_embeddings"], ctx.options.num_frozen_tokens
        split = {FROZEN: joined[:k], TRAINABLE: joined[k:]} if k else {TRAINABLE: joined}
        return {**rest, **{f"base_model.prompt_encoder.{s}": t for s, t in split.items()}}

    def to_peft(self, options: CartridgeOptions, sites: list[AttentionSite]) -> dict[str, Any]:
        kv_heads, head_dim = kv_shape(sites)
        return {
            "task_type": peft_task_type(sites[0].node.graph.owning_module),
            "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads,
            "num_layers": len(sites),
        }
