"""P-tuning as peft does it: n virtual tokens whose embeddings an encoder computes from a trainable
table.

    prompt = mlp_head(embedding.weight)               encoder="mlp": Linear-ReLU-Linear-ReLU-Linear
    prompt = mlp_head(lstm_head(embedding.weight))    encoder="lstm": a bidirectional LSTM,
                                                                      then Linear-ReLU-Linear

1. The encoder is peft's `PromptEncoder` (same submodules, names and init order, so a seed gives
   peft's weights), registered at `prompt_encoder.<adapter>`; the graph computes it as aten ops on
   its parameters. Inputs, virtual ids and outputs as `prompt(n=...)`
   (`peftc.techniques.prompt.join`).
2. peft's checkpoint holds the encoder's output as `prompt_embeddings`: `peftc.save_adapter` writes
   it (P_TUNING), and it loads as `prompt(n=...)` holding it.
Differences from peft: token_type_ids always get zeros in front (peft's causal-LM and
feature-extraction forwards drop them), and labels are extended only without `decoder_input_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import getitem
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.sites.regions import InputEmbeddings
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Technique,
    option,
    pattern,
    positive,
    register_technique,
)
from peftc.technique.options import peft_task_type
from peftc.techniques.prompt import (
    TOKENS_TARGET,
    check_positions,
    embedding_table,
    join,
    token_site,
)

__all__ = ["PtuningOptions", "Ptuning", "PromptEncoder"]

aten = torch.ops.aten


@dataclass(frozen=True)
class PtuningOptions(AdapterOptions):
    targets: str | None = option(None, doc=TOKENS_TARGET, check=pattern)
    n: int = option(20, doc="virtual tokens", check=positive, peft="num_virtual_tokens")
    encoder: Literal["mlp", "lstm"] = option(
        "mlp",
        doc="the encoder: an MLP, or a bidirectional LSTM and an MLP",
        peft="encoder_reparameterization_type",
        encode=str.upper,
        decode=lambda v: str(v).lower(),
    )
    hidden: int | None = option(
        None,
        doc="the encoder's width (None: the embedding width, as peft)",
        check=positive,
        peft="encoder_hidden_size",
    )
    num_layers: int = option(
        2,
        doc="LSTM layers (the MLP always has 3 linears)",
        check=positive,
        peft="encoder_num_layers",
    )


class PromptEncoder(nn.Module):
    """peft's P-tuning `PromptEncoder` (same submodules, names and init order, so a seed gives
    peft's weights)."""

    def __init__(self, n: int, dim: int, hidden: int, encoder: str, num_layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, dim)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=num_layers, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, dim)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if hasattr(self, "lstm_head"):
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)


@register_technique
class Ptuning(Technique):
    """P-tuning: n virtual tokens in front of every input, their embeddings computed by a trainable
    encoder.

    1. `encoder="mlp"` (Linear-ReLU-Linear-ReLU-Linear) or `"lstm"` (bidirectional LSTM,
       Linear-ReLU-Linear), parameters under `prompt_encoder.<adapter>.` at peft's names.
    2. Inputs, virtual ids and outputs as `prompt(n=...)`; the checkpoint holds the encoder's
       output, as peft's.
    """

    prompt_learning = True
    name = "ptuning"
    # the prompt's dtype is its own (peft's encoders are float32), cast where it joins the model
    half_precision = "base"
    options = PtuningOptions
    peft_type = "P_TUNING"
    peft_loads = ()  # its checkpoints hold the encoder's output, which loads as prompt(n=...)
    peft_fixed = {"num_transformer_submodules": 1, "encoder_dropout": 0.0}
    site_kinds = ("tokens",)
    stage = "final"
    exclusive = True
    mergeable = False
    preserves_outputs = False  # the encoder's first output is a random prompt

    def select(self, gm: fx.GraphModule, options: PtuningOptions) -> list[tuple[Any, str]]:
        return [(token_site(gm, options.targets, self.name), "")]

    def check(self, gm: fx.GraphModule, site: InputEmbeddings, options: PtuningOptions) -> None:
        check_positions(gm, options.n, self.name)
        if embedding_table(gm, site) is None:
            raise OptionError(
                f"ptuning: the token embedding at {site.path or '<root>'} is not an aten.embedding "
                "lookup of a weight; capture the model with peftc.capture (torch.export)"
            )

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        o, dim = ctx.options, int(embedding_table(ctx.gm, ctx.site).shape[1])
        return {"prompt_encoder": PromptEncoder(o.n, dim, o.hidden or dim, o.encoder, o.num_layers)}

    def build(self, b: Builder, e: fx.Node) -> fx.Node:
        return join(b, e, n=b.options.n, prompt=lambda: _encoder_nodes(b))

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": ctx.module("prompt_encoder")()}  # what peft saves

    def to_peft(self, options: PtuningOptions, sites: list[Any]) -> dict[str, Any]:
        gm = sites[0].node.graph.owning_module
        dim = int(embedding_table(gm, sites[0]).shape[1])
        return {
            "task_type": peft_task_type(gm),
            "token_dim": dim,
            "encoder_hidden_size": options.hidden or dim,
        }

    def describe(self, options: PtuningOptions, sites: list[Any]) -> str:
        return (
            f"{options.n} virtual tokens from a {options.encoder} encoder, adapter "
            f"{options.adapter!r}"
        )


def _encoder_nodes(b: Builder) -> fx.Node:
    """`encoder()` as aten ops on its parameters; returns its output."""
    encoder = b.ctx.module("prompt_encoder")
    root = b.ctx.modules["prompt_encoder"]

    def attr(name: str) -> fx.Node:
        return b.get(f"{root}.{name}", "encoder_weight")

    x = attr("embedding.weight")
    if hasattr(encoder, "lstm_head"):
        lstm = encoder.lstm_head
        weights = [attr(f"lstm_head.{name}") for name in lstm._flat_weights_names]
        h0 = b.call(
            aten.new_zeros.default, x, [2 * lstm.num_layers, 1, lstm.hidden_size], role="lstm_state"
        )
        batched = b.call(aten.unsqueeze.default, x, 0, role="lstm_input")
        out = b.call(
            aten.lstm.input,
            batched,
            [h0, h0],
            weights,
            True,
            lstm.num_layers,
            0.0,
            False,
            True,
            True,
            role="lstm",
        )
        x = b.call(
            aten.select.int, b.call(getitem, out, 0, role="lstm_output"), 0, 0, role="lstm_output"
        )
    for index, layer in enumerate(encoder.mlp_head):
        if isinstance(layer, nn.Linear):
            x = b.call(
                aten.linear.default,
                x,
                attr(f"mlp_head.{index}.weight"),
                attr(f"mlp_head.{index}.bias"),
                role="mlp",
            )
        else:
            x = b.call(aten.relu.default, x, role="mlp")
    return x
