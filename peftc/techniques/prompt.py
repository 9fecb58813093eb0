"""Prompt engineering and prompt tuning: tokens in front of every input, as a rewrite at the graph's inputs.

    ids, mask, token_type_ids (B, L)  ->  cat(prompt_ids, ids), cat(ones, mask), cat(zeros, token_type_ids)  (B, n+L)
    e = embed(ids) (B, n+L, d)        ->  cat(prompt_embeddings.expand(B, n, d), e[:, n:])      (prompt tuning)
    per-token outputs (B, n+L, ...)   ->  out[:, n:]                                             (the user's L positions)

1. `prompt(text="...")`: prompt engineering. The text is tokenized once (without special tokens: the
   user's ids carry the model's own) and stored as the buffer `prompt_ids`; the module computes what
   the unmodified model computes on the joined ids and mask.
2. `prompt(n=20, init="random"|"vocab"|"text", text=..., tokenizer=...)`: prompt tuning with a
   trainable `prompt_embeddings` (n, d), peft's checkpoint name, initialised as peft's
   `PromptTuningInit`: RANDOM N(0, 1) (an `nn.Embedding`'s init), SAMPLE_VOCAB rows of the word
   embedding at `randint(0, V)` ids, TEXT the embedding rows of the tokenized text (special tokens
   included, as peft) repeated then truncated to n. The n virtual ids are a non-pad id whose
   embedding rows are replaced, so positions run 0..n+L-1 as in peft (which drops `position_ids`).
   Encoder-decoder models (T5) get it in front of the encoder's ids only: peft with
   `num_transformer_submodules=1` (checked: 1.4e-6); peft's seq2seq default of 2 also prefixes the decoder.
3. Every per-token input sharing the ids' sequence size is extended: the attention mask with ones,
   `token_type_ids` with zeros, `labels` with -100 (peft's values); downstream sizes, positions and
   masks follow from the extended inputs. Another per-token input (`position_ids`) is refused.
4. Outputs keep the base model's interface: per-token outputs (size n+L in dim 1: logits,
   last_hidden_state) are sliced to the user's L positions, peft returns all n+L; pooled and
   classification outputs are untouched. A decoder classifier pools the user's real last token
   (the virtual ids are not pad ids), where peft, fed `inputs_embeds`, pools the last position,
   a pad token on right-padded batches.
5. The tokenizer (a name or folder for `AutoTokenizer`, or a tokenizer object) defaults to the
   captured model's `name_or_path`. `save_prompt`/`load_prompt` write and read peft's
   prompt-tuning checkpoint (`adapter_config.json`, `adapter_model.safetensors`).
6. `ptuning(n=20, encoder="mlp"|"lstm", hidden=...)`: peft's P-tuning; the prompt is computed by
   peft's `PromptEncoder` (parameters under `prompt_encoder.`) as aten ops in the graph, the rest as 2.
   Differences from peft: token_type_ids always get zeros in front (peft's causal-LM and
   feature-extraction forwards drop them), and labels are extended only without `decoder_input_ids`.
"""

from __future__ import annotations

import json
import math
import os
from operator import getitem
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc._io import atomic_dir
from peftc.technique.checkpoint import peft_task_type
from peftc.errors import OptionError
from peftc.ir.graph import get_attr_path, peftc_meta, set_tensor, tag, tagged
from peftc.ir.registry import PassResult, register_pass
from peftc.sites.regions import input_embeddings

__all__ = ["PromptOptions", "prompt", "PtuningOptions", "ptuning", "PromptEncoder", "has_prompt", "save_prompt", "load_prompt"]

aten = torch.ops.aten
_END = 9223372036854775807  # slice to the end, as exported graphs write it
PASS = "prompt"
PARAM = "prompt_embeddings"
IDS_BUFFER = "prompt_ids"
# Per-token inputs peft extends, with the value it puts in front.
_FILL = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}


@dataclass(frozen=True)
class PromptOptions:
    text: str | None = None  # the prompt (engineering), or the init text of init="text"
    n: int | None = None  # number of trainable virtual tokens (prompt tuning)
    init: Literal["random", "vocab", "text"] = "random"
    tokenizer: Any = None  # name/folder for AutoTokenizer or a tokenizer; default: the model's name_or_path

    def __post_init__(self) -> None:
        if self.n is None:
            if self.text is None:
                raise OptionError("prompt: give text='...' (a fixed prompt) or n=... (trainable virtual tokens)")
            if self.init != "random":
                raise OptionError(f"prompt: init={self.init!r} initialises virtual tokens; give n=... with it")
            if not self.text:
                raise OptionError("prompt: text is empty; give the prompt text")
            return
        if not isinstance(self.n, int) or self.n < 1:
            raise OptionError(f"prompt: n must be a positive number of virtual tokens, got {self.n!r}")
        if self.init == "text" and not self.text:
            raise OptionError("prompt: init='text' needs the init text: add text='...'")
        if self.init != "text" and self.text is not None:
            raise OptionError(f"prompt: text is only read by init='text' when n is given (init={self.init!r}); "
                              "drop text or set init='text'")


@register_pass(PASS, options=PromptOptions)
def prompt(gm: fx.GraphModule, options: PromptOptions) -> PassResult:
    """Put a fixed prompt (`text=`) or `n` trainable virtual tokens (`prompt_embeddings`) in front of every input.

    1. `prompt(text="...")`: the tokenized text becomes constant ids in front of the input ids.
    2. `prompt(n=20, init="random"|"vocab"|"text", text=..., tokenizer=...)`: peft's prompt tuning.
    3. Masks, token types and labels are extended as peft does; per-token outputs keep the user's positions.
    """
    site, ids = _token_input(gm)
    config = peftc_meta(gm).get("capture", {}).get("config", {})
    if options.n is None:
        prompt_ids = _tokenize(gm, options, special_tokens=False)
        n = len(prompt_ids)
    else:
        n = options.n
    _check_positions(gm, n, config, PASS)
    table = _get(gm, site.node.args[0]) if site.node.target is aten.embedding.default else None
    if options.n is not None:
        if table is None:
            raise OptionError(f"prompt: the token embedding at {site.path or '<root>'} is not an aten.embedding "
                              "lookup of a weight; capture the model with peftc.capture (torch.export)")
        weight = _init(gm, options, table)
        set_tensor(gm, PARAM, nn.Parameter(weight))
    else:
        set_tensor(gm, IDS_BUFFER, torch.tensor([prompt_ids], dtype=torch.long), buffer=True, persistent=False)

    per_token = _prepend(gm, site, ids, n, config, (lambda: gm.graph.get_attr(PARAM)) if options.n is not None else None)
    what = f"prompt of {n} tokens" if options.n is None else f"{n} virtual tokens ({options.init} init)"
    params = (PARAM,) if options.n is not None else ()
    return PassResult(gm, modified=True, sites=(site.path,),
                      report=f"{what} in front of {ids.target!r}; {per_token} per-token output(s) sliced"
                      + (f"; trainable {params[0]}" if params else ""))


def _prepend(gm: fx.GraphModule, site: Any, ids: fx.Node, n: int, config: dict[str, Any], make_prompt: Any) -> int:
    """Extend the per-token inputs by n positions, replace the virtual rows by `make_prompt()` (prompt
    engineering: None, the ids are the prompt) and slice per-token outputs back to the user's positions."""
    seq = ids.meta["val"].shape[1]
    per_token = _per_token_outputs(gm, seq)
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    extended = _extend_inputs(gm, placeholders, ids, seq, n, make_prompt is not None, config)
    if make_prompt is not None:
        _replace_rows(gm, site.node, extended["batch"], n, site.path, make_prompt)
    _slice_outputs(gm, per_token, n)
    return len(per_token)


def _check_positions(gm: fx.GraphModule, n: int, config: dict[str, Any], name: str) -> None:
    limit = _max_positions(gm, config)
    if limit is not None and n >= limit:
        raise OptionError(f"{name}: {n} prompt tokens leave no position for the input: the model has {limit} "
                          "positions; use a shorter prompt or fewer virtual tokens")


# --- the graph's token input --------------------------------------------------------------------


def _token_input(gm: fx.GraphModule) -> tuple[Any, fx.Node]:
    sites = input_embeddings(gm)
    if not sites and has_prompt(gm):
        raise OptionError("prompt: this graph already has a prompt in front of its inputs; one prompt per graph, as "
                          "peft runs one: start from the graph before the first prompt or ptuning")
    if not sites:
        raise OptionError("prompt: the graph has no token ids input (an embedding lookup of a graph input); capture "
                          "the model called with input_ids, not inputs_embeds")
    # BERT also looks up token_type_ids; the word lookup reads `input_ids`.
    site = next((s for s in sites if s.ids.target == "input_ids"), sites[0])
    val = site.ids.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or not isinstance(val.shape[1], torch.SymInt):
        raise OptionError(f"prompt: input {site.ids.target!r} has no symbolic sequence length, so the graph cannot "
                          "take longer inputs; capture with dynamic=True (the default) and a length of at least 2")
    return site, site.ids


def has_prompt(gm: fx.GraphModule) -> bool:
    """Whether `prompt` or `ptuning` rewrote `gm`."""
    return any(n for name in (PASS, "ptuning") for n in tagged(gm, **{"pass": name}))


def _same(a: Any, b: Any) -> bool:
    return str(a) == str(b)


def _per_token_outputs(gm: fx.GraphModule, seq: Any) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found: list[fx.Node] = []

    def visit(node: fx.Node) -> fx.Node:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 2 and _same(val.shape[1], seq) and node not in found:
            found.append(node)
        return node

    fx.node.map_arg(out.args, visit)
    return found


# --- rewrites -----------------------------------------------------------------------------------


def _new(gm: fx.GraphModule, role: str, path: str, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    node = gm.graph.call_function(target, args, kwargs)
    return tag(node, pass_name=PASS, role=role, path=path)


def _extend_inputs(gm: fx.GraphModule, placeholders: list[fx.Node], ids: fx.Node, seq: Any, n: int,
                   tuning: bool, config: dict[str, Any]) -> dict[str, fx.Node]:
    """Insert `cat(front, x, dim=1)` for every per-token input after the last placeholder; reroute their uses."""
    inserted: set[fx.Node] = set()
    extended: dict[str, fx.Node] = {}
    graph = gm.graph
    cursor = placeholders[-1]

    def add(role: str, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        nonlocal cursor
        with graph.inserting_after(cursor):
            node = _new(gm, role, "", target, *args, **kwargs)
        inserted.add(node)
        cursor = node
        return node

    seq2seq = any(p.target == "decoder_input_ids" for p in placeholders)  # labels then belong to the decoder
    for p in placeholders:
        val = p.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        # export may give labels their own length symbol; peft extends them like the ids
        named = str(p.target) == "labels" and val.dim() == 2 and not seq2seq
        if not (_same(val.shape[1], seq) or named):
            continue
        batch = add("batch", aten.sym_size.int, p, 0)
        if p is ids:
            if tuning:
                # Any id works (its rows are replaced); a non-pad one keeps pad-based pooling on the user's tokens.
                front = add("virtual_ids", aten.new_full.default, p, [batch, n], 1 if config.get("pad_token_id") == 0 else 0)
            else:
                with graph.inserting_after(cursor):
                    const = graph.get_attr(IDS_BUFFER)
                tag(const, pass_name=PASS, role="prompt_ids", path="")
                inserted.add(const)
                cursor = const
                front = add("prompt_ids", aten.expand.default, const, [batch, -1])
            extended["batch"] = batch
        elif str(p.target) in _FILL and val.dim() == 2:
            front = add("fill", aten.new_full.default, p, [batch, n], _FILL[str(p.target)])
        else:
            raise OptionError(f"prompt: input {p.target!r} {tuple(val.shape)} is per token and has no value for the "
                              f"prompt positions; capture without it (peft drops position_ids too)")
        joined = add("extended_input", aten.cat.default, [front, p], 1)
        p.replace_all_uses_with(joined, delete_user_cb=lambda user: user not in inserted)
        extended[str(p.target)] = joined
    return extended


def _replace_rows(gm: fx.GraphModule, embedded: fx.Node, batch: fx.Node, n: int, path: str,
                  make_prompt: Any, pass_name: str = PASS) -> None:
    """`e` -> `cat(prompt.expand(B, n, d).to(e.dtype), e[:, n:])` (peft's `cat(prompts, embeds)`); `make_prompt()`
    inserts the nodes computing the (n, d) prompt and returns the last one."""
    graph = gm.graph
    dtype = embedded.meta["val"].dtype
    with graph.inserting_before(embedded.next):  # keeps the order of several new nodes
        weight = make_prompt()
    if "peftc" not in weight.meta:
        tag(weight, pass_name=pass_name, role="prompt_embeddings", path=path)
    with graph.inserting_after(weight):
        unsqueezed = _new(gm, "prompt", path, aten.unsqueeze.default, weight, 0)
    with graph.inserting_after(unsqueezed):
        expanded = _new(gm, "prompt", path, aten.expand.default, unsqueezed, [batch, -1, -1])
    with graph.inserting_after(expanded):
        cast = _new(gm, "prompt", path, aten._to_copy.default, expanded, dtype=dtype)
    with graph.inserting_after(cast):
        rest = _new(gm, "user_embeddings", path, aten.slice.Tensor, embedded, 1, n, _END)
    with graph.inserting_after(rest):
        joined = _new(gm, "embeddings", path, aten.cat.default, [cast, rest], 1)
    embedded.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not rest)


def _slice_outputs(gm: fx.GraphModule, per_token: list[fx.Node], n: int) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    sliced: dict[fx.Node, fx.Node] = {}
    for node in per_token:
        with gm.graph.inserting_before(out):
            sliced[node] = _new(gm, "user_positions", "", aten.slice.Tensor, node, 1, n, _END)
    out.args = fx.node.map_arg(out.args, lambda node: sliced.get(node, node))


# --- prompt values ------------------------------------------------------------------------------


def _tokenizer(gm: fx.GraphModule, options: PromptOptions) -> Any:
    given = options.tokenizer
    if given is None:
        given = peftc_meta(gm).get("capture", {}).get("config", {}).get("name_or_path")
        if not given:
            raise OptionError("prompt: text needs a tokenizer and the captured model records no name_or_path; "
                              "pass tokenizer=<name, folder or tokenizer object>")
    if not isinstance(given, (str, os.PathLike)):
        return given
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(given))
    except Exception as e:  # noqa: BLE001 - any loading failure means the same fix
        raise OptionError(f"prompt: cannot load tokenizer {str(given)!r} ({type(e).__name__}: {e}); "
                          "pass tokenizer=<a folder with tokenizer files, or a tokenizer object>") from e


def _tokenize(gm: fx.GraphModule, options: PromptOptions, *, special_tokens: bool) -> list[int]:
    ids = list(_tokenizer(gm, options)(options.text, add_special_tokens=special_tokens)["input_ids"])
    if not ids:
        raise OptionError(f"prompt: text {options.text!r} tokenizes to no tokens; give a non-empty prompt")
    return [int(i) for i in ids]


def _init(gm: fx.GraphModule, options: PromptOptions, table: torch.Tensor) -> torch.Tensor:
    """peft's `PromptEmbedding.__init__`: an `nn.Embedding(n, d)` (N(0, 1)), then overwritten for vocab/text."""
    n, (vocab, dim) = options.n, table.shape
    weight = torch.empty(n, dim, device=table.device).normal_()  # what nn.Embedding's init draws, RNG included
    if options.init == "vocab":
        rows = torch.randint(0, vocab, (n,), dtype=torch.long).to(table.device)
        weight = table.detach()[rows].clone().float()
    elif options.init == "text":
        ids = _tokenize(gm, options, special_tokens=True)
        ids = (ids * math.ceil(n / len(ids)))[:n]
        weight = table.detach()[torch.tensor(ids, device=table.device)].clone().float()
    return weight


def _get(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    path = get_attr_path(node)
    if path is None:
        return None
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner), name, None)


def _max_positions(gm: fx.GraphModule, config: dict[str, Any]) -> int | None:
    """`max_position_embeddings` from the capture, else the rows of a position embedding table."""
    if isinstance(config.get("max_position_embeddings"), int):
        return config["max_position_embeddings"]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            path = get_attr_path(node.args[0]) or ""
            if "position" in path or path.endswith("wpe_weight") or path.endswith("wpe.weight"):
                table = _get(gm, node.args[0])
                if table is not None:
                    return int(table.shape[0])
    return None


# --- P-tuning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PtuningOptions:
    n: int = 20  # virtual tokens
    encoder: Literal["mlp", "lstm"] = "mlp"  # peft's encoder_reparameterization_type
    hidden: int | None = None  # encoder_hidden_size; default: the model's embedding width (peft's default)
    num_layers: int = 2  # LSTM layers (peft's encoder_num_layers; the MLP always has 3 linears)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise OptionError(f"ptuning: n must be a positive number of virtual tokens, got {self.n!r}")
        if self.hidden is not None and self.hidden < 1:
            raise OptionError(f"ptuning: hidden must be a positive encoder width, got {self.hidden!r}")
        if self.num_layers < 1:
            raise OptionError(f"ptuning: num_layers must be at least 1, got {self.num_layers!r}")


class PromptEncoder(nn.Module):
    """peft's P-tuning `PromptEncoder` (same submodules, names and init order, so a seed gives peft's weights)."""

    def __init__(self, n: int, dim: int, hidden: int, encoder: str, num_layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, dim)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if hasattr(self, "lstm_head"):
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)


ENCODER = "prompt_encoder"


@register_pass("ptuning", options=PtuningOptions)
def ptuning(gm: fx.GraphModule, options: PtuningOptions) -> PassResult:
    """P-tuning as peft does it: n virtual tokens whose embeddings an encoder computes from a trainable table.

    1. `prompt = mlp_head(embedding.weight)` (`encoder="mlp"`: Linear-ReLU-Linear-ReLU-Linear) or
       `mlp_head(lstm_head(embedding.weight))` (`encoder="lstm"`: a bidirectional LSTM, then Linear-ReLU-Linear),
       with its parameters under `prompt_encoder.` at peft's names (without peft's adapter name).
    2. Inputs, virtual ids and outputs as `prompt(n=...)`; peft's checkpoint holds the encoder's output as
       `prompt_embeddings`: `save_prompt` writes it, and it loads into a `prompt(n=...)` module.
    """
    site, ids = _token_input(gm)
    config = peftc_meta(gm).get("capture", {}).get("config", {})
    _check_positions(gm, options.n, config, "ptuning")
    table = _get(gm, site.node.args[0]) if site.node.target is aten.embedding.default else None
    if table is None:
        raise OptionError(f"ptuning: the token embedding at {site.path or '<root>'} is not an aten.embedding "
                          "lookup of a weight; capture the model with peftc.capture (torch.export)")
    dim = int(table.shape[1])
    encoder = PromptEncoder(options.n, dim, options.hidden or dim, options.encoder, options.num_layers)
    gm.add_module(ENCODER, encoder.to(table.device))
    before = set(gm.graph.nodes)
    _prepend(gm, site, ids, options.n, config, lambda: _encoder_nodes(gm, encoder, site.path))
    for node in gm.graph.nodes:
        if node not in before and node.meta.get("peftc", {}).get("pass") == PASS:
            node.meta["peftc"]["pass"] = "ptuning"
    params = tuple(f"{ENCODER}.{name}" for name, _ in encoder.named_parameters())
    return PassResult(gm, modified=True, sites=(site.path,),
                      report=f"{options.n} virtual tokens from a {options.encoder} encoder; trainable {', '.join(params)}")


def _encoder_nodes(gm: fx.GraphModule, encoder: PromptEncoder, path: str) -> fx.Node:
    """Insert `encoder()` as aten ops on its parameters (at the current insertion point); returns its output."""
    graph = gm.graph
    nodes: list[fx.Node] = []

    def add(role: str, node: fx.Node) -> fx.Node:
        tag(node, pass_name="ptuning", role=role, path=ENCODER)
        nodes.append(node)
        return node

    def attr(name: str) -> fx.Node:
        return add("encoder_weight", graph.get_attr(f"{ENCODER}.{name}"))

    x = attr("embedding.weight")
    if hasattr(encoder, "lstm_head"):
        lstm = encoder.lstm_head
        weights = [attr(f"lstm_head.{name}") for name in lstm._flat_weights_names]
        layers = 2 * lstm.num_layers
        h0 = add("lstm_state", graph.call_function(aten.new_zeros.default, (x, [layers, 1, lstm.hidden_size])))
        batched = add("lstm_input", graph.call_function(aten.unsqueeze.default, (x, 0)))
        out = add("lstm", graph.call_function(aten.lstm.input, (batched, [h0, h0], weights, True, lstm.num_layers,
                                                                 0.0, False, True, True)))
        first = add("lstm_output", graph.call_function(getitem, (out, 0)))
        x = add("lstm_output", graph.call_function(aten.select.int, (first, 0, 0)))
    for index, layer in enumerate(encoder.mlp_head):
        if isinstance(layer, nn.Linear):
            x = add("mlp", graph.call_function(aten.linear.default, (x, attr(f"mlp_head.{index}.weight"),
                                                                     attr(f"mlp_head.{index}.bias"))))
        else:
            x = add("mlp", graph.call_function(aten.relu.default, (x,)))
    return x


# --- peft's checkpoint format -------------------------------------------------------------------


def save_prompt(gm: fx.GraphModule, path: str | os.PathLike[str], *, task_type: str | None = None) -> Path:
    """Write `gm`'s prompt as peft's checkpoint (loads in `PeftModel.from_pretrained`): `prompt_embeddings`
    of `prompt(n=...)`, or for `ptuning` the encoder's output, as peft saves P-tuning adapters."""
    from safetensors.torch import save_file

    encoder = getattr(gm, ENCODER, None)
    if isinstance(encoder, PromptEncoder):
        with torch.no_grad():
            weight = encoder()
    else:
        weight = _weight(gm)
    config = peftc_meta(gm).get("capture", {}).get("config", {})
    adapter_config = {
        "peft_type": "PROMPT_TUNING", "task_type": task_type or peft_task_type(gm), "inference_mode": True,
        "num_virtual_tokens": int(weight.shape[0]), "token_dim": int(weight.shape[1]),
        "num_transformer_submodules": 1, "num_attention_heads": config.get("num_attention_heads"),
        "num_layers": config.get("num_hidden_layers"), "base_model_name_or_path": config.get("name_or_path"),
        "revision": None, "modules_to_save": None, "auto_mapping": None,
    }
    if isinstance(encoder, PromptEncoder):
        lstm = getattr(encoder, "lstm_head", None)
        adapter_config.update(peft_type="P_TUNING", encoder_reparameterization_type="LSTM" if lstm else "MLP",
                              encoder_hidden_size=encoder.mlp_head[0].in_features // 2 if lstm else encoder.mlp_head[0].out_features,
                              encoder_num_layers=lstm.num_layers if lstm else 2, encoder_dropout=0.0)
    else:
        adapter_config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                              tokenizer_kwargs=None)
    with atomic_dir(path) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_file({PARAM: weight.detach().cpu().contiguous()}, str(tmp / "adapter_model.safetensors"))
    return Path(path)


def load_prompt(gm: fx.GraphModule, path: str | os.PathLike[str]) -> fx.GraphModule:
    """Copy a peft prompt-tuning or P-tuning checkpoint's `prompt_embeddings` into `gm` (rewritten by
    `prompt(n=...)`: a P-tuning checkpoint holds the encoder's output, a constant prompt at inference)."""
    from safetensors.torch import load_file

    folder = Path(path)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") not in ("PROMPT_TUNING", "P_TUNING"):
        raise OptionError(f"{folder} holds a {config.get('peft_type')} adapter, not prompt tuning; load it with "
                          "peftc's checkpoint loader")
    loaded = load_file(str(folder / "adapter_model.safetensors"))[PARAM]
    weight = _weight(gm)
    if tuple(loaded.shape) != tuple(weight.shape):
        raise OptionError(f"{folder}: prompt_embeddings {tuple(loaded.shape)} do not fit this module's "
                          f"{tuple(weight.shape)}; rewrite with prompt(n={loaded.shape[0]})")
    with torch.no_grad():
        weight.copy_(loaded.to(weight))
    return gm


def _weight(gm: fx.GraphModule) -> torch.Tensor:
    weight = getattr(gm, PARAM, None)
    if not isinstance(weight, torch.Tensor):
        raise OptionError(f"this module has no {PARAM}; rewrite it with prompt(n=...) first (a P-tuning "
                          "checkpoint loads there too: peft saves the encoder's output)")
    return weight
