"""CPT (context-aware prompt tuning) as HF peft 0.21 does it: n virtual tokens initialised from
given token ids, each moved by a trainable delta kept within an epsilon ball.

    prompt = E + project(delta)          E = embed(token_ids) (n, d), frozen; delta (n, d) from 0
    project(delta)_i = delta_i * eps_i / max(|delta_i|, eps_i)        (rows with |delta_i| > 0)

1. `E` (`prompt_encoder.<adapter>.embedding.weight`) is what the word embedding module outputs for
   `token_ids` (Gemma's rows scaled), float32 and frozen; `delta`
   (`prompt_encoder.<adapter>.delta_embedding.weight`) starts at zero: peft's names.
2. The projection is written into `delta` outside autograd before every forward pass, as peft does
   (so the optimiser's next step starts from it). eps_i comes from `type_mask` (t_i):
   `format_epsilon * sqrt(d / 2048)` where t_i > 0 and t_i % 4 is 1 or 3 (template tokens),
   `epsilon * sqrt(d / 2048)` where t_i > 0 and t_i % 4 == 2 (input tokens), else 1e-10.
3. Only rows with t_i % 4 in {1, 2, 3} get a gradient (peft's backward hook); label tokens
   (t_i % 4 == 0) stay at their embedding.
4. Inputs, virtual ids and outputs as `prompt(n=...)` (`peftc.techniques.prompt.join`).
5. peft's checkpoint holds `prompt_embeddings` = E + project(delta); loading puts it in E, delta at
   zero, as peft does.
Refused: peft's CPT loss (cpt labels from the type masks, `opt_weighted_loss_type="decay"`) lives in
`PeftModel.forward`, not in the model, so a graph with a `labels` input is refused; peft's CPT takes
causal LMs only (task_type CAUSAL_LM), so other models are refused. `cpt_mask` is checked for length
and, as in peft, used for nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.sites.regions import InputEmbeddings, embedded_rows
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    non_negative,
    option,
    pattern,
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

__all__ = ["CptOptions", "Cpt", "project_"]

aten = torch.ops.aten
_MIN_EPSILON = 1e-10  # peft's epsilon for tokens it never moves


@dataclass(frozen=True)
class CptOptions(AdapterOptions):
    targets: str | None = option(None, doc=TOKENS_TARGET, check=pattern)
    token_ids: tuple[int, ...] = option(
        (0,), doc="the ids whose embeddings start the virtual tokens", peft="cpt_token_ids"
    )
    mask: tuple[int, ...] | None = option(
        None, doc="peft's cpt_mask (one per token; peft uses it for nothing)", peft="cpt_mask"
    )
    type_mask: tuple[int, ...] | None = option(
        None,
        doc="token types: % 4 == 1 or 3 template, 2 input, 0 label (default: all 1)",
        peft="cpt_tokens_type_mask",
    )
    epsilon: float = option(
        0.1, doc="bound of input tokens' deltas", check=non_negative, peft="opt_projection_epsilon"
    )
    format_epsilon: float = option(
        0.1,
        doc="bound of template tokens' deltas",
        check=non_negative,
        peft="opt_projection_format_epsilon",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.token_ids:
            raise OptionError("cpt: token_ids is empty; give the ids of the context tokens")
        for name in ("mask", "type_mask"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.token_ids):
                raise OptionError(
                    f"cpt: {name} has {len(value)} entries and token_ids {len(self.token_ids)}; "
                    "give one per token"
                )

    @property
    def types(self) -> tuple[int, ...]:
        return self.type_mask if self.type_mask is not None else (1,) * len(self.token_ids)


@register_technique
class Cpt(Technique):
    """CPT: virtual tokens from `token_ids`, each moved by a projected trainable delta.

    1. `cpt(token_ids=[...], type_mask=[...], epsilon=0.1, format_epsilon=0.1)`: peft's CPTConfig.
    2. Inputs, virtual ids and outputs as `prompt(n=...)`; the checkpoint holds E + project(delta).
    """

    prompt_learning = True
    name = "cpt"
    # the prompt's dtype is its own (peft's CPT embeddings are float32), cast where it joins
    half_precision = "base"
    options = CptOptions
    peft_type = "CPT"
    # the loss weighting lives in PeftModel.forward; the factor does nothing without "decay"
    peft_fixed = {
        "num_transformer_submodules": 1,
        "opt_weighted_loss_type": "none",
        "opt_loss_decay_factor": 1.0,
        "tokenizer_name_or_path": None,
    }
    # the model's sizes, what peft derives from token_ids, and fields CPT never reads
    peft_ignored = (
        "opt_loss_decay_factor",
        "tokenizer_name_or_path",
        "num_virtual_tokens",
        "token_dim",
        "num_attention_heads",
        "num_layers",
    )
    site_kinds = ("tokens",)
    stage = "final"
    exclusive = True
    mergeable = False

    def select(self, gm: fx.GraphModule, options: CptOptions) -> list[tuple[Any, str]]:
        return [(token_site(gm, options.targets, self.name), "")]

    def check(self, gm: fx.GraphModule, site: InputEmbeddings, options: CptOptions) -> None:
        task = peft_task_type(gm)
        if task != "CAUSAL_LM":
            raise OptionError(
                f"cpt: peft's CPT takes causal language models only (task_type CAUSAL_LM); this "
                f"model is {peftc_meta(gm).get('capture', {}).get('class') or task}"
            )
        if any(p.op == "placeholder" and p.target == "labels" for p in gm.graph.nodes):
            raise OptionError(
                "cpt: peft's CPT loss (labels rebuilt from cpt_tokens_type_mask and "
                "input_type_mask, opt_weighted_loss_type) is computed in PeftModel.forward, not in "
                "the model; capture without labels and compute the loss on the logits"
            )
        check_positions(gm, len(options.token_ids), self.name)
        table = embedding_table(gm, site)
        if table is None:
            raise OptionError(
                f"cpt: the token embedding at {site.path or '<root>'} is not an aten.embedding "
                "lookup of a weight; capture the model with peftc.capture (torch.export)"
            )
        if not all(0 <= i < table.shape[0] for i in options.token_ids):
            raise OptionError(
                f"cpt: token_ids must lie in [0, {table.shape[0]}), the model's vocabulary"
            )

    def params(self, ctx: Context) -> list[Param]:
        o, table = ctx.options, embedding_table(ctx.gm, ctx.site)
        ids = torch.tensor(o.token_ids, device=table.device)
        rows = embedded_rows(ctx.gm, ctx.site, table.detach()[ids]).float()
        types = torch.tensor(o.types)
        trained = (torch.remainder(types, 4) != 0).view(-1, 1)  # peft's gradient mask
        return [
            Param(
                "prompt_encoder",
                value=rows,
                suffix="embedding.weight",
                trainable=False,
                dtype=torch.float32,
                key="embedding",
            ),
            Param(
                "prompt_encoder",
                shape=tuple(rows.shape),
                suffix="delta_embedding.weight",
                dtype=torch.float32,
                key="delta",
            ),
            Param("cpt_epsilon", value=_epsilon(o, rows.shape[1]), trainable=False),
            Param("cpt_trained", value=trained, trainable=False, dtype=torch.bool),
        ]

    def build(self, b: Builder, e: fx.Node) -> fx.Node:
        return join(b, e, n=len(b.options.token_ids), prompt=lambda: _prompt(b))

    def checkpoint_key(self, key: str) -> str:
        return "prompt_embeddings"  # the one tensor saved (`saved`)

    def saved(self, options: CptOptions, attr: str) -> bool:
        return attr == "embedding"

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # what peft saves: its encoder's output
        delta = project_(ctx.tensor("delta").detach().clone(), ctx.tensor("cpt_epsilon"))
        return {"prompt_embeddings": ctx.tensor("embedding").detach() + delta}

    def to_peft(self, options: CptOptions, sites: list[Any]) -> dict[str, Any]:
        gm, n = sites[0].node.graph.owning_module, len(options.token_ids)
        config = peftc_meta(gm).get("capture", {}).get("config", {})
        return {
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": n,
            "cpt_mask": list(options.mask or (1,) * n),  # peft's filled-in values
            "cpt_tokens_type_mask": list(options.types),
            "token_dim": int(embedding_table(gm, sites[0]).shape[1]),
            "num_attention_heads": config.get("num_attention_heads"),
            "num_layers": config.get("num_hidden_layers"),
        }

    def describe(self, options: CptOptions, sites: list[Any]) -> str:
        return (
            f"{len(options.token_ids)} context tokens in front of {sites[0].ids.target!r}, "
            f"adapter {options.adapter!r}"
        )


def _epsilon(options: CptOptions, dim: int) -> torch.Tensor:
    """peft's `CPTEmbedding.get_epsilon`: each token's bound, from its type (case 2)."""
    scale = torch.sqrt(torch.tensor([dim / 2048], dtype=torch.float32))
    types = torch.tensor(options.types)
    rest = torch.remainder(types, 4)
    epsilon = torch.full(types.shape, _MIN_EPSILON, dtype=torch.float32)
    epsilon[(types > 0) & ((rest == 1) | (rest == 3))] = options.format_epsilon * scale
    epsilon[(types > 0) & (rest == 2)] = options.epsilon * scale
    return epsilon


def project_(delta: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """peft's `CPTEmbedding.get_projection`, written into `delta` outside autograd; returns it."""
    with torch.no_grad():
        norm = torch.linalg.vector_norm(delta, dim=1)
        scale = epsilon / norm.clamp(min=epsilon)
        delta.copy_(torch.where((norm > 0).view(-1, 1), delta * scale.view(-1, 1), delta))
    return delta


def _prompt(b: Builder) -> fx.Node:
    """E + project(delta), the gradient reaching only the rows peft trains (cases 2-3)."""
    delta = b.call(project_, b.param("delta"), b.param("cpt_epsilon"), role="projection")
    frozen = b.call(aten.detach.default, delta, role="untrained_rows")
    masked = b.call(aten.where.self, b.param("cpt_trained"), delta, frozen, role="trained_rows")
    return b.call(aten.add.Tensor, b.param("embedding"), masked, role="prompt")
