"""Batched generation from a captured causal LM, one adapter per row, with a key/value cache.

The captured graph computes a whole sequence at once. `generate` derives a decode graph from it
(once per graph, cached while the graph lives and is not rewritten) that also takes the keys and
values of the tokens before and returns them extended by the new ones, so each step runs only the
new token:

    sdpa(q, k, v, mask)  ->  sdpa(q, cat(past_k, k), cat(past_v, v), mask, P columns in front)
    positions 0..L-1     ->  positions P..P+L-1                                   (P = past length)
    output               ->  (output, (k_0, v_0, k_1, v_1, ...))    the joined keys and values

The cache is the keys and values as SDPA reads them (after rotary embeddings and GQA's repeat), held
by the loop. Prompts of different lengths are grouped by length and each group decoded as one batch:
no padding, so every row computes exactly what it would alone. With a `multi_lora` graph each row
picks its adapter (`adapter_ids`, or names); NF4 bases decode the same way; prefix tuning's keys and
values are joined in front of the cache at every step (they are not cached); prompt tuning's virtual
tokens enter at the prefill only (the step graph is the graph without the prompt rewrite).
"""

from __future__ import annotations

import copy
import numbers
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx

from peftc.errors import OptionError, PassError
from peftc.ir.graph import add_input, clone, peftc_meta, tag
from peftc.sites.regions import attention_as_called, attention_call, attention_sites, position_ids
from peftc.technique.adapters import active_adapters, adapters, set_active
from peftc.techniques.prefix import extend_mask

__all__ = [
    "generate",
    "decode_graphs",
    "check_prompts",
    "limits",
    "forward_step",
    "empty_caches",
    "ContextLengthError",
]


class ContextLengthError(OptionError):
    """A prompt and its new tokens need more positions than the model has."""


aten = torch.ops.aten
_PASS = "kv_cache"
_DECODE_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_graphs(gm: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(prefill, step): `gm` taking `past_<i>_key`/`past_<i>_value` inputs and returning `(output,
    new keys and values)`; the step graph differs only for prompt tuning, whose virtual tokens enter
    at the prefill alone."""
    cached = _DECODE_GRAPHS.get(gm)
    # rebuilt when a pass changed the graph
    if cached is not None and cached[0] == len(gm.graph.nodes):
        return cached[1:]
    prefill = _with_cache(gm)
    step = _with_cache(_without_prompt(gm)) if _prompts(gm) else prefill
    _DECODE_GRAPHS[gm] = (len(gm.graph.nodes), prefill, step)
    return prefill, step


def _prompts(gm: fx.GraphModule) -> list[str]:
    """The active adapters that put tokens in front of the input (prompt tuning, P-tuning)."""
    return [
        name
        for name in active_adapters(gm)
        if adapters(gm)[name].technique in ("prompt", "ptuning")
    ]


def _without_prompt(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` without prompt tuning's rewrite: inputs not extended, embeddings not replaced, outputs
    not sliced."""
    step = clone(gm)
    prompts = _prompts(gm)
    return set_active(step, [name for name in active_adapters(gm) if name not in prompts])


def ragged_step_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The step graph for rows whose caches differ in length: caches left-padded to the longest,
    and two more inputs, `past_mask` (rows x columns, True where a column holds a token of that
    row) and `past_lengths` (tokens before each row's new one, for its positions). One new token
    per row; padded columns get no attention weight, so each row computes what it computes alone.
    Cached like `decode_graphs`; raises `PassError` where a mask is not boolean."""
    cached = _RAGGED.get(gm)
    if cached is not None and cached[0] == len(gm.graph.nodes):
        return cached[1]
    step = _with_cache(_without_prompt(gm) if _prompts(gm) else gm, ragged=True)
    _RAGGED[gm] = (len(gm.graph.nodes), step)
    return step


_RAGGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _with_cache(gm: fx.GraphModule, ragged: bool = False) -> fx.GraphModule:
    decode = fx.GraphModule(gm, _copy_graph(gm.graph))
    decode.meta.update(gm.meta)
    graph = decode.graph
    # a prefix's keys included
    sites = [attention_as_called(site.node) for site in attention_sites(decode)]
    if not sites:
        raise PassError(
            "generate: the graph has no attention sites (scaled_dot_product_attention); capture "
            "the model with attn_implementation='sdpa'"
        )
    past, joined, layout = [], [], []
    for i in range(len(sites)):
        past += [
            add_input(graph, f"past_{i}_{kind}", pass_name=_PASS, role="past")
            for kind in ("key", "value")
        ]
    if ragged:
        past += [
            add_input(graph, name, pass_name=_PASS, role=name)
            for name in ("past_mask", "past_lengths")
        ]
    with graph.inserting_before(past[-1].next):
        if ragged:  # each row's own count: a column
            length = _caller(graph, "")(aten.unsqueeze.default, past[-1], 1, role="past_column")
        else:
            length = _caller(graph, "")(aten.sym_size.int, past[0], 2, role="past_length")
    masks: dict[fx.Node, fx.Node] = {}
    for i, site in enumerate(sites):
        val = site.key.meta.get("val")
        layout.append((int(val.shape[1]), int(val.shape[3]), val.dtype))
        with graph.inserting_before(site.node):
            call = _caller(graph, site.path)
            key, cached_key = _with_past(site.key, past[2 * i], call, "key")
            value, cached_value = _with_past(site.value, past[2 * i + 1], call, "value")
            if ragged:
                mask = _ragged_mask(site, past[-2], masks, call)
            else:  # the past's columns visible in front
                mask = extend_mask(site, length, masks, call)
        joined += [cached_key, cached_value]
        site.node.args, site.node.kwargs = attention_call(site, key, value, mask)
    _shift_positions(decode, length)
    _return_caches(graph, joined)
    graph.lint()
    decode.recompile()
    decode.meta["peftc_cache_layout"] = layout
    return decode


def _shift_positions(decode: fx.GraphModule, length: fx.Node) -> None:
    """Position sources shifted by the past's length (a column of per-row lengths when ragged:
    then at the sources' first (1, L) form, so the batch dimension is the rows')."""
    graph = decode.graph
    sources = position_ids(decode)
    if length.meta.get("peftc", {}).get("role") == "past_column":
        sources = [_as_row(source) for source in sources]
    for source in sources:
        with graph.inserting_after(source):
            shifted = graph.call_function(aten.add.Tensor, (source, length))
        source.replace_all_uses_with(
            shifted, delete_user_cb=lambda user, new=shifted: user is not new
        )
        tag(
            shifted,
            pass_name=_PASS,
            role="positions_shifted",
            path=source.meta.get("module_path", ""),
        )


def _as_row(source: fx.Node) -> fx.Node:
    """`source` if it is (1, L), else the `unsqueeze(., 0)` its single-user chain of
    same-shape ops leads to (a cache position made a row of position ids)."""
    val = source.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() == 2:
        return source
    node = source
    for _ in range(8):
        if len(node.users) != 1:
            break
        (user,) = node.users
        if user.target == aten.unsqueeze.default and user.args[1] == 0:
            return user
        shape = getattr(user.meta.get("val"), "shape", None)
        if shape is None or val is None or tuple(shape) != tuple(val.shape):
            break
        node = user
    raise PassError(
        f"ragged decoding: the position numbers at {source.name} are not a (1, length) row"
    )


def _ragged_mask(site, past_mask: fx.Node, masks: dict, call) -> fx.Node:
    """(rows, heads, 1, past + 1): each row's valid past columns, then its new token."""
    if site.mask in masks:  # None too: the new token alone, the same at every site
        return masks[site.mask]
    past = call(
        aten.unsqueeze.default,
        call(aten.unsqueeze.default, past_mask, 1, role="past_mask_3d"),
        1,
        role="past_mask_4d",
    )
    if site.mask is None:
        new = call(
            aten.ones_like.default,
            call(aten.slice.Tensor, past, 3, 0, 1, role="new_column"),
            role="new_visible",
        )
    else:
        val = site.mask.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
            raise PassError(
                "ragged decoding needs boolean attention masks; this graph's are "
                f"{getattr(val, 'dtype', 'unknown')}"
            )
        rows = call(aten.sym_size.int, past_mask, 0, role="rows")
        new = call(aten.expand.default, site.mask, [rows, -1, -1, -1], role="new_mask")
        heads = call(aten.sym_size.int, site.mask, 1, role="mask_heads")
        past = call(aten.expand.default, past, [-1, heads, -1, -1], role="past_mask_heads")
    masks[site.mask] = call(aten.cat.default, [past, new], 3, role="ragged_mask")
    return masks[site.mask]


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    with warnings.catch_warnings():  # torch's own TreeSpec copy warns about its deprecated LeafSpec
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(graph)


def _caller(graph: fx.Graph, path: str):
    def call(target, *args, role: str, **kwargs) -> fx.Node:
        return tag(
            graph.call_function(target, tuple(args), kwargs), pass_name=_PASS, role=role, path=path
        )

    return call


def _with_past(kv: fx.Node, past: fx.Node, call, name: str) -> tuple[fx.Node, fx.Node]:
    """(what SDPA reads, what the cache keeps): cat(past, kv); with a prefix, cat(prefix, cat(past,
    new)), the prefix kept out of the cache (it is a parameter, joined again at every step)."""
    if (
        kv.meta.get("peftc", {}).get("pass") == "prefix"
        and kv.meta["peftc"]["role"] == f"{name}_with_prefix"
    ):
        prefix, new = kv.args[0]
        with kv.graph.inserting_before(kv):
            cached = call(aten.cat.default, [past, new], 2, role=f"{name}_with_past")
        kv.args = ([prefix, cached], *kv.args[1:])
        return kv, cached
    joined = call(aten.cat.default, [past, kv], 2, role=f"{name}_with_past")
    return joined, joined


def _return_caches(graph: fx.Graph, caches: list[fx.Node]) -> None:
    """The graph returns (its output, tuple of caches): leaves appended, the output spec nested."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    output = next(n for n in graph.nodes if n.op == "output")
    leaves = output.args[0]
    codegen = graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen) or not isinstance(leaves, (tuple, list)):
        raise PassError(
            "generate: this graph's outputs are not a captured pytree; capture the model with "
            "peftc.capture"
        )
    output.args = (type(leaves)([*leaves, *caches]),)
    cache_spec = pytree.tree_structure(tuple(range(len(caches))))
    spec = pytree.TreeSpec(tuple, None, [codegen.pytree_info.out_spec, cache_spec])
    codegen.pytree_info = _PyTreeInfo(
        codegen.pytree_info.orig_args, codegen.pytree_info.in_spec, spec
    )


def generate(
    gm: fx.GraphModule,
    input_ids: Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 20,
    adapter_ids: Tensor | Sequence[str | None] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Each prompt continued by up to `max_new_tokens` tokens (greedy, or sampled with `do_sample`):
    a list of token lists (prompt excluded), stopping a row at `eos_token_id` (kept). Prompts may
    differ in length.

    `adapter_ids`: one per prompt for a `multi_lora` graph (ids, or names with None for the
    base)."""
    if max_new_tokens < 1:
        raise OptionError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and (temperature <= 0 or (top_k is not None and top_k < 1)):
        raise OptionError("generate: sampling needs temperature > 0 and top_k >= 1 (or None)")
    prompts = check_prompts(gm, _token_lists(input_ids), max_new_tokens)
    served = "multi_lora" in peftc_meta(gm)
    ids = _adapter_ids(gm, adapter_ids, len(prompts), served)
    prefill, step = decode_graphs(gm)
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sampling = _Sampling(max_new_tokens, do_sample, temperature, top_k, eos_token_id, generator)
    results: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}  # rows by prompt length: each group decodes as one batch
    for row, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(row)
    was_training = gm.training
    prefill.eval(), step.eval()
    try:
        with torch.no_grad():
            for rows in groups.values():
                tokens = torch.tensor([prompts[r] for r in rows], device=device)
                extra = {"adapter_ids": ids[rows]} if served else {}
                generated = _decode(prefill, step, tokens, extra, sampling)
                for row, continuation in zip(rows, generated, strict=True):
                    results[row] = continuation
    finally:
        prefill.train(was_training), step.train(was_training)
    return results


def _token_lists(input_ids: Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    given = input_ids.tolist() if isinstance(input_ids, Tensor) else input_ids
    prompts = [list(p) for p in given]
    if not prompts:
        raise OptionError("generate: give at least one prompt, each at least one token long")
    return prompts


def limits(gm: fx.GraphModule) -> tuple[int | None, int | None]:
    """(vocabulary size, positions) of the captured model's config; None where it has none."""
    config = peftc_meta(gm).get("capture", {}).get("config", {})
    positions = next(
        (config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in config),
        None,
    )
    return config.get("vocab_size"), positions


def check_prompts(
    gm: fx.GraphModule, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """The prompts as lists of ints, each refused by name if empty, not token ids, outside the
    vocabulary, or longer with `max_new_tokens` than the model's positions."""
    vocab, positions = limits(gm)
    checked = []
    for i, prompt in enumerate(prompts):
        if not prompt or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in prompt
        ):
            raise OptionError(f"prompt {i}: give a non-empty list of token ids (ints >= 0)")
        prompt = [int(t) for t in prompt]
        if vocab is not None and max(prompt) >= vocab:
            raise OptionError(
                f"prompt {i}: token id {max(prompt)} is outside the vocabulary (ids 0..{vocab - 1})"
            )
        if positions is not None and len(prompt) + max_new_tokens > positions:
            raise ContextLengthError(
                f"prompt {i}: {len(prompt)} tokens plus {max_new_tokens} new ones exceed the "
                f"model's {positions} positions; shorten the prompt or ask for fewer tokens"
            )
        checked.append(prompt)
    return checked


class _Sampling(NamedTuple):
    """How each next token is picked, and when a row stops."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    eos: int | None
    generator: torch.Generator | None


def _adapter_ids(gm: fx.GraphModule, given: Any, rows: int, served: bool) -> Tensor | None:
    if not served:
        if given is not None:
            raise OptionError(
                "generate: adapter_ids needs a graph serving stacked adapters; apply 'multi_lora' "
                "first"
            )
        return None
    if given is None:
        raise OptionError(
            "generate: this graph serves stacked adapters; pass adapter_ids (one per prompt, None "
            "for the base)"
        )
    if not isinstance(given, Tensor):
        from peftc.passes.multi_lora import adapter_ids

        given = adapter_ids(gm, list(given))
    if given.numel() != rows:
        raise OptionError(
            f"generate: {given.numel()} adapter ids for {rows} prompts; give one per prompt"
        )
    return given.reshape(-1)


def empty_caches(graph: fx.GraphModule, batch: int, like: Tensor) -> list[Tensor]:
    """The caches of `batch` rows before any token: (batch, heads, 0, head_dim) each."""
    return [
        like.new_zeros((batch, heads, 0, dim), dtype=dtype)
        for heads, dim, dtype in graph.meta["peftc_cache_layout"]
        for _ in ("key", "value")
    ]


def forward_step(
    graph: fx.GraphModule, tokens: Tensor, caches: list[Tensor], extra: dict
) -> tuple[Tensor, list[Tensor]]:
    """One forward of a decode graph on `tokens` after `caches`: the float32 logits of each row's
    last token, and the caches extended by `tokens`."""
    inputs = {f"past_{i // 2}_{'key' if i % 2 == 0 else 'value'}": c for i, c in enumerate(caches)}
    if _takes(graph, "attention_mask"):
        inputs["attention_mask"] = torch.ones_like(tokens)
    output, caches = graph(tokens, **extra, **inputs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits[:, -1].float(), list(caches)


def _takes(graph: fx.GraphModule, name: str) -> bool:
    return any(n.target == name for n in graph.graph.find_nodes(op="placeholder"))


def _decode(
    prefill: fx.GraphModule,
    step_graph: fx.GraphModule,
    tokens: Tensor,
    extra: dict,
    sampling: _Sampling,
) -> list[list[int]]:
    batch = tokens.shape[0]
    caches = empty_caches(prefill, batch, tokens)
    decode = prefill
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    step = tokens
    eos = sampling.eos
    for _ in range(sampling.max_new_tokens):
        logits, caches = forward_step(decode, step, caches, extra)
        chosen = _choose(logits, sampling)
        if eos is not None:
            chosen = torch.where(done, torch.full_like(chosen, eos), chosen)
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                out[row].append(token)
        if eos is not None:
            done |= chosen == eos
            if bool(done.all()):
                break
        step, decode = chosen[:, None], step_graph
    return out


def _choose(logits: Tensor, sampling: _Sampling) -> Tensor:
    if not sampling.do_sample:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=sampling.generator).squeeze(-1)
