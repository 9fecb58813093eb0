"""Prompt engineering and prompt tuning: tokens in front of every input, declared at the `tokens`
site.

    ids, mask, token_type_ids (B, L)
        ->  cat(prompt_ids, ids), cat(ones, mask), cat(zeros, token_type_ids)       (B, n+L)
    e = embed(ids) (B, n+L, d)        ->  cat(prompt.expand(B, n, d), e[:, n:])    (prompt tuning)
    per-token outputs (B, n+L, ...)   ->  out[:, n:]                   (the user's L positions)

1. `prompt(text="...")`: prompt engineering. The text is tokenized once (without special tokens: the
   user's ids carry the model's own) and kept as the buffer `prompt_ids.<adapter>`; the module
   computes what the unmodified model computes on the joined ids and mask.
2. `prompt(n=20, init="random"|"vocab"|"text", text=..., tokenizer=...)`: prompt tuning with the
   trainable `prompt_encoder.<adapter>.embedding.weight` (n, d), peft's in-memory name, initialised
   as peft's `PromptTuningInit`: RANDOM N(0, 1) (an `nn.Embedding`'s init), SAMPLE_VOCAB rows of the
   word embedding at `randint(0, V)` ids, TEXT the embedding rows of the tokenized text (special
   tokens included, as peft) repeated then truncated to n. The n virtual ids are a non-pad id whose
   embedding rows are replaced, so positions run 0..n+L-1 as in peft (which drops `position_ids`).
   Encoder-decoder models (T5) get it in front of the encoder's ids only: peft with
   `num_transformer_submodules=1` (checked: 1.4e-6); peft's seq2seq default of 2 also prefixes the
   decoder.
3. Every per-token input sharing the ids' sequence size is extended: the attention mask with ones,
   `token_type_ids` with zeros, `labels` with -100 (peft's values); downstream sizes, positions and
   masks follow from the extended inputs. Another per-token input (`position_ids`) is refused.
4. Outputs keep the base model's interface: per-token outputs (size n+L in dim 1: logits,
   last_hidden_state) are sliced to the user's L positions, peft returns all n+L; pooled and
   classification outputs are untouched. A decoder classifier pools the user's real last token
   (the virtual ids are not pad ids), where peft, fed `inputs_embeds`, pools the last position,
   a pad token on right-padded batches.
5. The tokenizer (a name or folder for `AutoTokenizer`, or a tokenizer object) defaults to the
   captured model's `name_or_path`. Checkpoints are peft's PROMPT_TUNING (`peftc.save_adapter`): a
   fixed text prompt is saved as the embedding rows of its ids, which computes the same. P-tuning
   checkpoints (the encoder's output) load here too.
The prompt is the last thing at its op (stage `final`): an embedding LoRA there adapts the user's
tokens, and the prompt's rows replace whatever the lookup computes for the virtual ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import get_attr_path, get_tensor, peftc_meta
from peftc.ir.rewrites import Resolver, captured_name
from peftc.sites.regions import InputEmbeddings, embedded_rows, input_embeddings
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
from peftc.technique.options import peft_task_type

__all__ = [
    "PromptOptions",
    "Prompt",
    "join",
    "token_site",
    "check_positions",
    "embedding_table",
    "TOKENS_TARGET",
]

aten = torch.ops.aten
_END = 9223372036854775807  # slice to the end, as exported graphs write it
# Per-token inputs peft extends, with the value it puts in front.
_FILL = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}
TOKENS_TARGET = "the token embedding of the input ids (default: the lookup reading `input_ids`)"


@dataclass(frozen=True)
class PromptOptions(AdapterOptions):
    targets: str | None = option(None, doc=TOKENS_TARGET, check=pattern)
    n: int | None = option(
        None,
        doc="trainable virtual tokens (prompt tuning); without it, `text` is a fixed prompt",
        check=positive,
        peft="num_virtual_tokens",
    )
    text: str | None = option(None, doc='the fixed prompt, or the init text of init="text"')
    init: Literal["random", "vocab", "text"] = option(
        "random",
        doc="peft's PromptTuningInit: N(0, 1), rows of random vocabulary, or the rows of `text`",
    )
    tokenizer: Any = option(
        None, doc="name, folder or tokenizer object for `text` (default: the model's name_or_path)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n is None:
            if self.text is None:
                raise OptionError(
                    "prompt: give text='...' (a fixed prompt) or n=... (trainable virtual tokens)"
                )
            if self.init != "random":
                raise OptionError(
                    f"prompt: init={self.init!r} initialises virtual tokens; give n=... with it"
                )
            if not self.text:
                raise OptionError("prompt: text is empty; give the prompt text")
            return
        if self.init == "text" and not self.text:
            raise OptionError("prompt: init='text' needs the init text: add text='...'")
        if self.init != "text" and self.text is not None:
            raise OptionError(
                f"prompt: text is only read by init='text' when n is given (init={self.init!r}); "
                "drop text or set init='text'"
            )


def token_site(gm: fx.GraphModule, targets: str | None, name: str) -> InputEmbeddings:
    """The token embedding a prompt goes in front of: `targets`', else the lookup reading
    `input_ids`."""
    sites = input_embeddings(gm, targets)
    if not sites:
        raise OptionError(
            f"{name}: the graph has no token ids input (an embedding lookup of a graph input); "
            "capture the model called with input_ids, not inputs_embeds"
        )
    # BERT also looks up token types
    site = next((s for s in sites if s.ids.target == "input_ids"), sites[0])
    val = site.ids.meta.get("val")
    if (
        not isinstance(val, torch.Tensor)
        or val.dim() != 2
        or not isinstance(val.shape[1], torch.SymInt)
    ):
        raise OptionError(
            f"{name}: input {site.ids.target!r} has no symbolic sequence length, so the graph "
            "cannot take longer inputs; capture with dynamic=True (the default) and a length of at "
            "least 2"
        )
    return site


def check_positions(gm: fx.GraphModule, n: int, name: str) -> None:
    limit = _max_positions(gm, peftc_meta(gm).get("capture", {}).get("config", {}))
    if limit is not None and n >= limit:
        raise OptionError(
            f"{name}: {n} prompt tokens leave no position for the input: the model has {limit} "
            "positions; use a shorter prompt or fewer virtual tokens"
        )


@register_technique
class Prompt(Technique):
    """Put a fixed prompt (`text=`) or `n` trainable virtual tokens in front of every input.

    1. `prompt(text="...")`: the tokenized text becomes constant ids in front of the input ids.
    2. `prompt(n=20, init="random"|"vocab"|"text", text=..., tokenizer=...)`: peft's prompt tuning.
    3. Masks, token types and labels are extended as peft does; per-token outputs keep the user's
       positions.
    """

    prompt_learning = True
    name = "prompt"
    # the prompt's dtype is its own (peft's encoders are float32), cast where it joins the model
    half_precision = "base"
    options = PromptOptions
    peft_type = "PROMPT_TUNING"
    # peft saves P-tuning's encoder output: a constant prompt
    peft_loads = (
        "PROMPT_TUNING",
        "P_TUNING",
    )
    peft_fixed = {
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    # how the prompt was initialised or encoded, and the model's sizes (the checkpoint has the
    # prompt itself)
    peft_ignored = (
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
        "token_dim",
        "num_attention_heads",
        "num_layers",
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    )
    site_kinds = ("tokens",)
    stage = "final"
    exclusive = True
    mergeable = False

    def select(self, gm: fx.GraphModule, options: PromptOptions) -> list[tuple[Any, str]]:
        return [(token_site(gm, options.targets, self.name), "")]

    def check(self, gm: fx.GraphModule, site: InputEmbeddings, options: PromptOptions) -> None:
        if options.n is not None:
            check_positions(gm, options.n, self.name)
            if embedding_table(gm, site) is None:
                raise OptionError(
                    f"prompt: the token embedding at {site.path or '<root>'} is not an "
                    "aten.embedding lookup of a weight; capture the model with peftc.capture "
                    "(torch.export)"
                )

    def params(self, ctx: Context) -> list[Param]:
        options = ctx.options
        if options.n is None:
            ids = _tokenize(ctx.gm, options, special_tokens=False)
            check_positions(ctx.gm, len(ids), self.name)
            return [
                Param("prompt_ids", value=torch.tensor([ids]), trainable=False, dtype=torch.long)
            ]
        weight = _init(ctx.gm, options, ctx.site)
        return [
            Param(
                "prompt_encoder",
                value=weight,
                suffix="embedding.weight",
                key="prompt",
                dtype=torch.float32,
            )
        ]

    def build(self, b: Builder, e: fx.Node) -> fx.Node:
        if b.options.n is None:
            return join(
                b,
                e,
                n=b.ctx.tensor("prompt_ids").shape[1],
                prompt_ids=lambda: b.param("prompt_ids"),
            )
        return join(b, e, n=b.options.n, prompt=lambda: b.param("prompt"))

    def checkpoint_key(self, key: str) -> str:
        return "prompt_embeddings"  # peft's one tensor

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if ctx.options.n is not None:
            return tensors
        # a fixed prompt is the same as tuned embeddings equal to its rows
        ids = ctx.tensor("prompt_ids")[0]
        rows = embedding_table(ctx.gm, ctx.site).detach()[ids]
        return {"prompt_embeddings": embedded_rows(ctx.gm, ctx.site, rows).float()}

    def saved(self, options: PromptOptions, attr: str) -> bool:
        return attr != "prompt_ids"

    def to_peft(self, options: PromptOptions, sites: list[Any]) -> dict[str, Any]:
        gm = sites[0].node.graph.owning_module
        n = (
            options.n
            if options.n is not None
            else len(_tokenize(gm, options, special_tokens=False))
        )
        config = peftc_meta(gm).get("capture", {}).get("config", {})
        return {
            "num_virtual_tokens": n,
            "task_type": peft_task_type(gm),
            "token_dim": int(embedding_table(gm, sites[0]).shape[1]),
            "num_attention_heads": config.get("num_attention_heads"),
            "num_layers": config.get("num_hidden_layers"),
        }

    def describe(self, options: PromptOptions, sites: list[Any]) -> str:
        what = (
            "a fixed prompt"
            if options.n is None
            else f"{options.n} virtual tokens ({options.init} init)"
        )
        return f"{what} in front of {sites[0].ids.target!r}, adapter {options.adapter!r}"


# --- the rewrite, shared with P-tuning -----------------------------------------------------------


def join(b: Builder, e: fx.Node, *, n: int, prompt: Any = None, prompt_ids: Any = None) -> fx.Node:
    """Extend the per-token inputs by n positions (the ids `prompt_ids()` gives, or virtual ids
    whose rows `prompt()` replaces), slice per-token outputs back to the user's positions; returns
    the joined embeddings (case 1-4)."""
    gm, site = b.gm, b.site
    per_token = _per_token_outputs(gm, site.ids)
    batch = _extend_inputs(b, site.ids, n, prompt_ids)
    _slice_outputs(b, per_token, n)
    if prompt is None:
        return e
    weight = prompt()
    expanded = b.call(
        aten.expand.default,
        b.call(aten.unsqueeze.default, weight, 0, role="prompt"),
        [batch, -1, -1],
        role="prompt",
    )
    cast = b.call(aten._to_copy.default, expanded, role="prompt", dtype=e.meta["val"].dtype)
    rest = b.call(aten.slice.Tensor, e, 1, n, _END, role="user_embeddings")
    return b.call(aten.cat.default, [cast, rest], 1, role="embeddings")


def _extend_inputs(b: Builder, ids: fx.Node, n: int, prompt_ids: Any) -> fx.Node:
    """`cat(front, x, dim=1)` after the last input for every per-token input, rerouting its users;
    returns the batch size node."""
    gm = b.gm
    config = peftc_meta(gm).get("capture", {}).get("config", {})
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    seq = ids.meta["val"].shape[1]
    # labels then belong to the decoder
    seq2seq = any(p.target == "decoder_input_ids" for p in placeholders)
    batch = None
    with b.at(placeholders[-1]):
        for p in placeholders:
            val = p.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() < 2:
                continue
            # export may give labels their own length symbol; peft extends them like the ids
            named = str(p.target) == "labels" and val.dim() == 2 and not seq2seq
            if not (_same(val.shape[1], seq) or named):
                continue
            rows = b.call(aten.sym_size.int, p, 0, role="batch")
            if p is ids:
                batch = rows
                # any id: its rows are replaced; a non-pad one keeps pad-based pooling right
                if prompt_ids is None:
                    virtual = 1 if config.get("pad_token_id") == 0 else 0
                    front = b.call(aten.new_full.default, p, [rows, n], virtual, role="virtual_ids")
                else:
                    front = b.call(aten.expand.default, prompt_ids(), [rows, -1], role="prompt_ids")
            elif str(p.target) in _FILL and val.dim() == 2:
                front = b.call(
                    aten.new_full.default, p, [rows, n], _FILL[str(p.target)], role="fill"
                )
            else:
                raise OptionError(
                    f"{b.technique.name}: input {p.target!r} {tuple(val.shape)} is per token and "
                    "has no value for the prompt positions; capture without it (peft drops "
                    "position_ids too)"
                )
            b.reroute(p, b.call(aten.cat.default, [front, p], 1, role="extended_input"))
    return batch


def _per_token_outputs(gm: fx.GraphModule, ids: fx.Node) -> list[fx.Node]:
    """The outputs with the ids' sequence size in dim 1, as captured: found once per graph (a prompt
    changes the sizes of what it leaves), kept by captured name."""
    known = peftc_meta(gm).setdefault("per_token_outputs", {})
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if ids.name not in known:
        seq, found = ids.meta["val"].shape[1], []

        def visit(node: fx.Node) -> fx.Node:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 2 and _same(val.shape[1], seq):
                found.append(captured_name(node))
            return node

        fx.node.map_arg(out.args, visit)
        known[ids.name] = list(dict.fromkeys(found))
    resolve = Resolver(gm.graph)
    return [resolve(name) for name in known[ids.name]]


def _slice_outputs(b: Builder, per_token: list[fx.Node], n: int) -> None:
    out = next(node for node in b.gm.graph.nodes if node.op == "output")
    for node in per_token:
        with b.at(out.prev):
            sliced = b.call(aten.slice.Tensor, node, 1, n, _END, role="user_positions")
        b.reroute(node, sliced, users={out})


def _same(a: Any, b: Any) -> bool:
    return str(a) == str(b)


# --- prompt values ------------------------------------------------------------------------------


def embedding_table(gm: fx.GraphModule, site: InputEmbeddings) -> torch.Tensor | None:
    """The word embedding table the token site looks up, if it is a stored weight."""
    if site.lookup.op != "call_function" or site.lookup.target is not aten.embedding.default:
        return None
    path = get_attr_path(site.lookup.args[0])
    return None if path is None else get_tensor(gm, path)


def _tokenizer(gm: fx.GraphModule, options: PromptOptions) -> Any:
    given = options.tokenizer
    if given is None:
        given = peftc_meta(gm).get("capture", {}).get("config", {}).get("name_or_path")
        if not given:
            raise OptionError(
                "prompt: text needs a tokenizer and the captured model records no name_or_path; "
                "pass tokenizer=<name, folder or tokenizer object>"
            )
    if not isinstance(given, (str, os.PathLike)):
        return given
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(given))
    except Exception as e:
        raise OptionError(
            f"prompt: cannot load tokenizer {str(given)!r} ({type(e).__name__}: {e}); pass "
            "tokenizer=<a folder with tokenizer files, or a tokenizer object>"
        ) from e


def _tokenize(gm: fx.GraphModule, options: PromptOptions, *, special_tokens: bool) -> list[int]:
    ids = list(
        _tokenizer(gm, options)(options.text, add_special_tokens=special_tokens)["input_ids"]
    )
    if not ids:
        raise OptionError(
            f"prompt: text {options.text!r} tokenizes to no tokens; give a non-empty prompt"
        )
    return [int(i) for i in ids]


def _init(gm: fx.GraphModule, options: PromptOptions, site: InputEmbeddings) -> torch.Tensor:
    """peft's `PromptEmbedding.__init__`: an `nn.Embedding(n, d)` (N(0, 1)), then overwritten for
    vocab/text by what the word embedding module outputs for ids (Gemma's rows scaled)."""
    table = embedding_table(gm, site)
    n, (vocab, dim) = options.n, table.shape
    weight = torch.empty(
        n, dim, device=table.device
    ).normal_()  # what nn.Embedding's init draws, RNG included
    if options.init == "vocab":
        rows = torch.randint(0, vocab, (n,), dtype=torch.long).to(table.device)
        weight = embedded_rows(gm, site, table.detach()[rows]).clone().float()
    elif options.init == "text":
        ids = _tokenize(gm, options, special_tokens=True)
        ids = (ids * math.ceil(n / len(ids)))[:n]
        rows = table.detach()[torch.tensor(ids, device=table.device)]
        weight = embedded_rows(gm, site, rows).clone().float()
    return weight


def _max_positions(gm: fx.GraphModule, config: dict[str, Any]) -> int | None:
    """`max_position_embeddings` from the capture, else the rows of a position embedding table."""
    if isinstance(config.get("max_position_embeddings"), int):
        return config["max_position_embeddings"]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            path = get_attr_path(node.args[0]) or ""
            if "position" in path or path.endswith("wpe_weight") or path.endswith("wpe.weight"):
                return int(get_tensor(gm, path).shape[0])
    return None
