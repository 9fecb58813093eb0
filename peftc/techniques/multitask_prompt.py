"""Multitask prompt tuning as peft does it: one shared prompt, scaled per row by its task's low-rank
factors, in front of every input.

    prompt_b = embedding.weight * (prefix_task_cols[t_b] @ prefix_task_rows[t_b])    (n, d) per row
    task_ids (B,): a new graph input `task_ids`, one task per row, as peft's `task_ids=` argument

1. Tensors at peft's names: `prompt_encoder.<adapter>.embedding.weight` (n, d),
   `.prefix_task_cols` (num_tasks, n, num_ranks) and `.prefix_task_rows` (num_tasks, num_ranks, d),
   initialised in peft's order: the prompt as `prompt(n=..., init=...)` (RANDOM N(0, 1) or TEXT),
   then both factors N(0, 0.02).
2. Inputs, virtual ids and outputs as `prompt(n=...)` (`peftc.techniques.prompt.join`); the
   `task_ids` input is added once and stays when the adapter is switched off or deleted.
3. Checkpoints are peft's MULTITASK_PROMPT_TUNING: `prompt_embeddings`, `prefix_task_cols`,
   `prefix_task_rows`.
Refused by name: peft's source-task inits (AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK,
ONLY_SOURCE_SHARED, read from `prompt_tuning_init_state_dict_path`), SAMPLE_VOCAB (not one of
peft's multitask inits), two transformer submodules (seq2seq), and merge (not a weight update).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import add_input
from peftc.sites.regions import InputEmbeddings
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    pattern,
    positive,
    register_technique,
)
from peftc.techniques.prompt import (
    TOKENS_TARGET,
    Prompt,
    PromptOptions,
    check_positions,
    embedding_table,
    join,
    token_site,
)

__all__ = ["MultitaskPromptOptions", "MultitaskPrompt", "TASK_IDS"]

aten = torch.ops.aten
TASK_IDS = "task_ids"
_END = 9223372036854775807  # slice to the end, as exported graphs write it
_SOURCE_INITS = ("average_source_tasks", "exact_source_task", "only_source_shared")


def _init_check(value: str) -> str | None:
    if value in _SOURCE_INITS:
        return (
            "'random' or 'text': peft's source-task inits read a "
            "prompt_tuning_init_state_dict_path file, which peftc does not implement; load that "
            "checkpoint with peftc.load_adapter"
        )
    return None if value in ("random", "text") else "'random' or 'text'"


@dataclass(frozen=True)
class MultitaskPromptOptions(AdapterOptions):
    targets: str | None = option(None, doc=TOKENS_TARGET, check=pattern)
    n: int = option(20, doc="virtual tokens", check=positive, peft="num_virtual_tokens")
    num_tasks: int = option(1, doc="tasks (rows of task factors)", check=positive, peft="num_tasks")
    num_ranks: int = option(1, doc="rank of each task's factors", check=positive, peft="num_ranks")
    init: str = option(
        "random",
        doc="peft's init of the shared prompt: N(0, 1) or the rows of `text`",
        check=_init_check,
    )
    text: str | None = option(None, doc='the init text of init="text"')
    tokenizer: Any = option(
        None, doc="name, folder or tokenizer object for `text` (default: the model's name_or_path)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.init == "text") != bool(self.text):
            raise OptionError(
                "multitask_prompt: text='...' goes with init='text' and only with it; "
                f"got init={self.init!r}, text={self.text!r}"
            )


@register_technique
class MultitaskPrompt(Technique):
    """Multitask prompt tuning: a shared prompt times per-task low-rank factors, chosen per row by
    the graph's `task_ids` input, in front of every input."""

    prompt_learning = True
    name = "multitask_prompt"
    # the prompt's dtype is its own (peft's encoders are float32), cast where it joins the model
    half_precision = "base"
    options = MultitaskPromptOptions
    peft_type = "MULTITASK_PROMPT_TUNING"
    peft_fixed = {
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "prompt_tuning_init_state_dict_path": None,
        "prompt_tuning_init_task": 0,
    }
    # how the tensors were initialised, and the model's sizes (the checkpoint has the tensors)
    peft_ignored = (
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
        "prompt_tuning_init_state_dict_path",
        "prompt_tuning_init_task",
        "token_dim",
        "num_attention_heads",
        "num_layers",
    )
    site_kinds = ("tokens",)
    stage = "final"
    exclusive = True
    mergeable = False
    preserves_outputs = False  # the prompt is random at first

    def select(self, gm: fx.GraphModule, options: MultitaskPromptOptions) -> list[tuple[Any, str]]:
        return [(token_site(gm, options.targets, self.name), "")]

    def check(
        self, gm: fx.GraphModule, site: InputEmbeddings, options: MultitaskPromptOptions
    ) -> None:
        check_positions(gm, options.n, self.name)
        if embedding_table(gm, site) is None:
            raise OptionError(
                f"multitask_prompt: the token embedding at {site.path or '<root>'} is not an "
                "aten.embedding lookup of a weight; capture the model with peftc.capture"
            )

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        shared = PromptOptions(
            targets=o.targets, n=o.n, init=o.init, text=o.text, tokenizer=o.tokenizer
        )
        prompt = Prompt().params(dataclasses.replace(ctx, options=shared))[0]
        dim = prompt.value.shape[1]
        # peft's order of draws: prompt, then columns, then rows
        cols = torch.normal(0, 0.02, size=(o.num_tasks, o.n, o.num_ranks))
        rows = torch.normal(0, 0.02, size=(o.num_tasks, o.num_ranks, dim))
        return [
            prompt,
            Param(
                "prompt_encoder",
                value=cols,
                suffix="prefix_task_cols",
                key="cols",
                dtype=torch.float32,
            ),
            Param(
                "prompt_encoder",
                value=rows,
                suffix="prefix_task_rows",
                key="rows",
                dtype=torch.float32,
            ),
        ]

    def build(self, b: Builder, e: fx.Node) -> fx.Node:
        n = b.options.n
        ids = _task_ids(b.gm, b.site)
        join(b, e, n=n)  # the inputs extended, the outputs sliced; the rows are replaced below
        cols = b.call(aten.index_select.default, b.param("cols"), 0, ids, role="task_cols")
        rows = b.call(aten.index_select.default, b.param("rows"), 0, ids, role="task_rows")
        scale = b.call(aten.bmm.default, cols, rows, role="task_prompts")
        prompts = b.call(aten.mul.Tensor, b.param("prompt"), scale, role="prompt")
        cast = b.call(aten._to_copy.default, prompts, role="prompt", dtype=e.meta["val"].dtype)
        rest = b.call(aten.slice.Tensor, e, 1, n, _END, role="user_embeddings")
        return b.call(aten.cat.default, [cast, rest], 1, role="embeddings")

    def checkpoint_key(self, key: str) -> str:
        name = key.rpartition(".")[2]
        return "prompt_embeddings" if name == "weight" else name  # peft's three keys

    def to_peft(self, options: MultitaskPromptOptions, sites: list[Any]) -> dict[str, Any]:
        return Prompt().to_peft(PromptOptions(n=options.n), sites)

    def describe(self, options: MultitaskPromptOptions, sites: list[Any]) -> str:
        return (
            f"{options.n} virtual tokens for {options.num_tasks} tasks (rank {options.num_ranks}) "
            f"in front of {sites[0].ids.target!r}, adapter {options.adapter!r}"
        )


def _task_ids(gm: fx.GraphModule, site: InputEmbeddings) -> fx.Node:
    """The graph's `task_ids` input (one per row), added after its other inputs the first time;
    untagged by adapter, so switching or deleting keeps the signature."""
    found = next((p for p in gm.graph.find_nodes(op="placeholder") if p.target == TASK_IDS), None)
    if found is not None:
        return found
    node = add_input(gm.graph, TASK_IDS, pass_name="multitask_prompt", role="task_ids")
    ids = site.ids.meta["val"]
    node.meta["val"] = ids.new_empty(ids.shape[:1])  # a fake (batch,) long, for verification
    return node
