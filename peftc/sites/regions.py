"""Region sites: places a technique rewrites that are not one weight, recognised by what the
graph computes rather than by op or module names.

1. Attention sites: `scaled_dot_product_attention` with its q, k, v, mask, `is_causal`, scale and
   dropout. Under grouped-query attention, the key and value before they are repeated per query
   head (transformers' `repeat_kv`: `unsqueeze -> expand -> reshape`; or SDPA's `enable_gqa=True`,
   which repeats inside the op), and the head counts from the fake tensors in `meta["val"]`.
2. Block sites: the repeated blocks of a model (children of its outermost `ModuleList`s,
   e.g. `model.layers.3`), with the residual stream entering and leaving each, and the outputs
   of its attention and feed-forward sublayers just before their residual adds. A residual add is
   `add(s, t)` inside the block where `t` is computed from `s` through a linear layer; its sublayer
   is attention when that computation holds an SDPA or a softmax, else feed-forward. This holds
   for pre-LN (`x + attn(norm(x))`) and post-LN (`norm(x + attn(x))`) blocks alike. Sublayer sites
   are those residual adds, with the LayerNorm a post-LN block applies after each.
3. Input embeddings: each token embedding lookup whose ids are a graph input, and the stream
   the first block of its stack receives. These differ where the model adds position or token
   type embeddings or normalises first (GPT-2, BERT): `node` is the token lookup's output (what
   prompt tuning extends), `stream` is the value entering block 0 (`hidden_states[0]` in
   transformers).
4. Final hidden states: for each stack of blocks, the stream after its last block and the final
   norm that follows it (`model.norm`, `transformer.ln_f`), or the last block's output where no
   norm follows (post-LN BERT): the input of an LM or classification head.
5. Position ids: the nodes that number the tokens for position embeddings or rotary angles (an
   `arange` over the sequence, a slice of a registered `position_ids` buffer holding 0, 1, 2, ...,
   or a `position_ids` input); techniques that put tokens in front (prefix tuning) shift them.

Every query takes `targets` (see `peftc.ir.targets`) and returns frozen dataclasses.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.errors import PassError
from peftc.ir.attention import causal_sdpa
from peftc.ir.graph import get_tensor, module_path, peftc_meta
from peftc.ir.rewrites import Resolver, as_captured, captured_name
from peftc.ir.targets import select

__all__ = [
    "AttentionSite",
    "BlockSite",
    "SublayerSite",
    "SUBLAYER_KINDS",
    "InputEmbeddings",
    "FinalHiddenState",
    "attention_sites",
    "attention_as_called",
    "attention_call",
    "block_sites",
    "sublayer_sites",
    "input_embeddings",
    "embedded_rows",
    "final_hidden_states",
    "position_ids",
]

aten = torch.ops.aten
_SDPA_FNS = {
    aten.scaled_dot_product_attention.default,
    F.scaled_dot_product_attention,
    causal_sdpa,  # what capture turns aten's into (peftc.ir.attention)
}
_SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_SOFTMAX = {aten._softmax.default, aten.softmax.int, F.softmax, torch.softmax, "softmax"}
_LINEAR = {
    aten.linear.default,
    F.linear,
    aten.addmm.default,
    aten.mm.default,
    aten.matmul.default,
    torch.matmul,
    operator.matmul,
    "peftc.nf4_linear.default",
}
_ADDS = {aten.add.Tensor, operator.add, torch.add}
# Ops that only re-view ids (GPT-2 flattens input_ids before the lookup).
_ID_VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.alias.default,
    "view",
    "reshape",
}


def _base_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    # what a pass inserted untagged is base computation too (`pipeline` tags it `base`)
    return [n for n in gm.graph.nodes if n.meta.get("peftc", {}).get("base", "peftc" not in n.meta)]


def _select(sites: list, targets: str | None, what: str) -> list:
    chosen = set(select(targets, [s.path for s in sites], what=what))
    return [s for s in sites if s.path in chosen]


def _is(node: Any, targets: set) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in targets
    if node.op == "call_module":
        return False
    return node.op == "call_function" and (node.target in targets or str(node.target) in targets)


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _dim(node: fx.Node, index: int) -> int | None:
    val = _val(node)
    if val is None or val.dim() < abs(index):
        return None
    size = val.shape[index]
    return size if isinstance(size, int) else None


# --- 1. attention ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSite:
    """SDPA at `path`. `key_heads`/`value_heads` are key and value before GQA repeats them (the
    same nodes as `key`/`value` without GQA); `scale` is the one SDPA applies (1/sqrt(head_dim)
    when none is given); head counts are None where shapes are unknown."""

    kind: ClassVar[str] = "sdpa"
    path: str
    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None = None
    is_causal: bool = False
    scale: float | None = None
    dropout_p: float = 0.0
    enable_gqa: bool = False
    key_heads: fx.Node | None = None
    value_heads: fx.Node | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None


def attention_sites(gm: fx.GraphModule, targets: str | None = None) -> list[AttentionSite]:
    resolve = Resolver(gm.graph)
    sites = [
        _attention_site(n, resolve)
        for n in _base_nodes(gm)
        if n.op == "call_function" and as_captured(n, resolve).target in _SDPA_FNS
    ]
    return _select(sites, targets, "attention site")


def _attention_site(n: fx.Node, resolve: Resolver) -> AttentionSite:
    """The site of SDPA node `n`, read as captured (a technique may have rewritten its operands)."""
    return attention_as_called(n, as_captured(n, resolve))


def attention_as_called(n: fx.Node, view: Any = None) -> AttentionSite:
    """SDPA node `n` read as it is called now, operands a technique changed included (or as `view`
    calls it): what a rewrite of the graph that technique left (a key/value cache) builds on."""
    view = n if view is None else view
    args = {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "enable_gqa": False,
    }
    args.update(zip(_SDPA_PARAMS, view.args, strict=False))
    args.update(view.kwargs)
    query, key, value = args["query"], args["key"], args["value"]
    key_heads, value_heads = _before_repeat_kv(key), _before_repeat_kv(value)
    head_dim = _dim(query, -1)
    scale = (
        args["scale"]
        if args["scale"] is not None
        else (1 / math.sqrt(head_dim) if head_dim else None)
    )
    return AttentionSite(
        module_path(n),
        n,
        query,
        key,
        value,
        args["attn_mask"],
        args["is_causal"],
        scale,
        args["dropout_p"],
        args["enable_gqa"],
        key_heads,
        value_heads,
        _dim(query, -3),
        _dim(key_heads, -3),
        head_dim,
    )


def attention_call(
    site: AttentionSite, key: fx.Node, value: fx.Node, mask: fx.Node | None
) -> tuple[tuple, dict]:
    """(args, kwargs) of the site's SDPA with another key, value and mask (`is_causal` off where a
    mask says it)."""
    kwargs = {
        k: v
        for k, v in site.node.kwargs.items()
        if k not in ("attn_mask", "dropout_p", "is_causal")
    }
    kwargs.update(
        attn_mask=mask,
        dropout_p=site.dropout_p,
        is_causal=False if mask is not None else site.is_causal,
    )
    if site.scale is not None:
        kwargs["scale"] = site.scale
    if site.enable_gqa:
        kwargs["enable_gqa"] = True
    return (site.query, key, value), kwargs


def _before_repeat_kv(node: fx.Node) -> fx.Node:
    """`x` for `reshape(expand(unsqueeze(x, 2), (b, kv, n_rep, s, d)), (b, kv * n_rep, s, d))`, else
    `node`."""
    if not _is(
        node,
        {aten.reshape.default, aten.view.default, aten._unsafe_view.default, "reshape", "view"},
    ):
        return node
    expanded = node.args[0]
    if (
        not _is(expanded, {aten.expand.default, "expand"})
        or _val(expanded) is None
        or _val(expanded).dim() != 5
    ):
        return node
    source = expanded.args[0]
    while _is(
        source, {aten.unsqueeze.default, aten.slice.Tensor, aten.alias.default}
    ) and _is_view_noop(source):
        source = source.args[0]
    kv, n_rep = _dim(expanded, 1), _dim(expanded, 2)
    if (
        _val(source) is None
        or _val(source).dim() != 4
        or _dim(source, 1) != kv
        or _dim(node, 1) != kv * n_rep
    ):
        return node
    return source


def _is_view_noop(node: fx.Node) -> bool:
    """An unsqueeze at the repeat axis, or a slice that keeps everything (`x[:, :, None]`)."""
    if node.target is aten.unsqueeze.default:
        return node.args[1] == 2
    if node.target is aten.slice.Tensor:
        start, end, step = (*node.args[2:], None, None, None)[:3]
        return (
            start in (None, 0)
            and (end is None or (isinstance(end, int) and end >= 2**62))
            and step in (None, 1)
        )
    return True


# --- 2. blocks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSite:
    """Block `index` at `path`: `input` is the residual stream entering it, `output` leaving it;
    `attention_output`/`ff_output` are what its attention and feed-forward sublayers add to the
    stream (None where no such residual add is found), `attention_add`/`ff_add` those adds."""

    path: str
    index: int
    input: fx.Node | None
    output: fx.Node
    attention_output: fx.Node | None = None
    ff_output: fx.Node | None = None
    attention_add: fx.Node | None = None
    ff_add: fx.Node | None = None


def block_sites(gm: fx.GraphModule, targets: str | None = None) -> list[BlockSite]:
    types = _module_types(gm)
    blocks = _outermost_list_children(types)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = []
    for path in blocks:
        inside = [
            n
            for n in _base_nodes(gm)
            if n.op not in ("get_attr", "placeholder") and _within(module_path(n), path)
        ]
        if not inside:
            continue
        members = set(inside)
        # nodes passes inserted inside the block (NF4 linears, adapter branches) lie on its paths
        # too: a value
        # they read is not an output of the block, and the stream may leave through one of them
        ordered = [
            n
            for n in gm.graph.nodes
            if n.op not in ("get_attr", "placeholder") and _within(module_path(n), path)
        ]
        region = set(ordered)
        outputs = [n for n in ordered if any(u not in region for u in n.users)]
        inputs = sorted(
            {
                a
                for n in inside
                for a in n.all_input_nodes
                if a not in members and a.op != "get_attr"
            },
            key=order.get,
        )
        stream_in, stream_out = _residual_stream(inputs, outputs)
        if stream_out is not None:
            (attention, attention_add), (ff, ff_add) = _sublayer_outputs(inside, region, stream_out)
            sites.append(
                BlockSite(
                    path,
                    int(path.rsplit(".", 1)[1]),
                    stream_in,
                    stream_out,
                    attention,
                    ff,
                    attention_add,
                    ff_add,
                )
            )
    return _select(sites, targets, "block")


def _sublayer_outputs(
    inside: list[fx.Node], region: set[fx.Node], stream_out: fx.Node
) -> tuple[tuple, tuple]:
    """(output, residual add) of the first attention sublayer and of the last feed-forward sublayer
    (case 2)."""
    attention = ff = (None, None)
    width = _dim(stream_out, -1)
    for add in inside:
        if not _is(add, _ADDS) or add.kwargs or len(add.args) != 2:
            continue
        for stream, branch in (add.args, reversed(add.args)):
            if not isinstance(branch, fx.Node) or not isinstance(stream, fx.Node) or width is None:
                continue
            if _dim(branch, -1) != width or _dim(stream, -1) != width:
                continue
            computed = _computed_from(branch, stream, region)
            if computed is None or not any(_is(n, _LINEAR) for n in computed):
                continue
            if any(_is(n, _SDPA_FNS | _SOFTMAX) for n in computed):
                attention = attention if attention[0] is not None else (branch, add)
            else:
                ff = (branch, add)
            break
    return attention, ff


def _computed_from(branch: fx.Node, stream: fx.Node, region: set[fx.Node]) -> set[fx.Node] | None:
    """The nodes of `region` that `branch` is computed from, up to `stream`; None if `stream` is not
    among them."""
    seen, todo, reached = {branch}, [branch], False
    while todo:
        for a in todo.pop().all_input_nodes:
            if a is stream:
                reached = True
            elif a in region and a not in seen:
                seen.add(a)
                todo.append(a)
    return seen if reached else None


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _module_types(gm: fx.GraphModule) -> dict[str, str]:
    types = dict(peftc_meta(gm).get("module_types") or {})
    if types:
        return types
    for n in gm.graph.nodes:
        for path, kind in (n.meta.get("nn_module_stack") or {}).values():
            types.setdefault(
                path, kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
            )
    for path, module in gm.named_modules():
        types.setdefault(path, f"{type(module).__module__}.{type(module).__qualname__}")
    return types


def _outermost_list_children(types: dict[str, str]) -> list[str]:
    """Paths `<list>.<i>` whose parent is a ModuleList and that lie in no other such block."""
    blocks: list[str] = []
    for path in types:
        parent, _, index = path.rpartition(".")
        if index.isdigit() and types.get(parent, "").endswith("ModuleList"):
            if not any(_within(path, b) for b in blocks):
                blocks.append(path)
    return blocks


def _residual_stream(
    inputs: list[fx.Node], outputs: list[fx.Node]
) -> tuple[fx.Node | None, fx.Node | None]:
    """The output whose shape matches an input's: the residual stream keeps its shape."""

    def shape(n: fx.Node) -> tuple | None:
        val = n.meta.get("val")
        return (
            tuple(val.shape) if isinstance(val, torch.Tensor) and val.is_floating_point() else None
        )

    for out in outputs:
        for inp in inputs:
            if shape(out) is not None and shape(out) == shape(inp):
                return inp, out
    return None, (outputs[0] if outputs else None)


# --- 2b. sublayers: where a block adds its attention or feed-forward output to the stream --------

SUBLAYER_KINDS = ("attention", "feed_forward")
_LAYER_NORMS = {aten.layer_norm.default, F.layer_norm, aten.native_layer_norm.default}


@dataclass(frozen=True)
class SublayerSite:
    """A sublayer at its residual add `node`, z = residual + input: `input` is what the sublayer
    adds (h), `residual` the stream it is added to (x), `norm` the LayerNorm that post-LN blocks
    apply to z (BERT's `LN(x + h)`; None in pre-LN blocks). `path` is the sublayer's module under
    the block (`model.layers.0.self_attn`, `model.layers.0.mlp`; BERT's `layer.0.attention`,
    `layer.0.output`)."""

    kind: str  # "attention" or "feed_forward"
    path: str
    block: str
    node: fx.Node
    input: fx.Node
    residual: fx.Node
    norm: fx.Node | None


def sublayer_sites(
    gm: fx.GraphModule, targets: str | None = None, kinds: tuple[str, ...] = SUBLAYER_KINDS
) -> list[SublayerSite]:
    """The residual adds of every block's attention and feed-forward sublayers, in graph order."""
    sites = []
    for block in block_sites(gm):
        for kind, h, add in (
            ("attention", block.attention_output, block.attention_add),
            ("feed_forward", block.ff_output, block.ff_add),
        ):
            if kind in kinds and add is not None:
                residual = add.args[1 - add.args.index(h)]
                sites.append(
                    SublayerSite(
                        kind,
                        _sublayer_path(h, block.path, kind),
                        block.path,
                        add,
                        h,
                        residual,
                        _post_norm(gm, add, block.path),
                    )
                )
    return _select(sites, targets, "sublayer")


def _sublayer_path(h: fx.Node, block: str, kind: str) -> str:
    """The block's child module that computes h (`self_attn`, `mlp`), else `<block>.<kind>`."""
    inner = module_path(h)
    if inner.startswith(block + "."):
        return f"{block}.{inner[len(block) + 1 :].split('.')[0]}"
    return f"{block}.{kind}"


def _post_norm(gm: fx.GraphModule, add: fx.Node, block: str) -> fx.Node | None:
    """The block's LayerNorm that is z's only reader (post-LN), looking through adapter nodes
    already at z (a pre-LN model's final norm also reads its last block's z alone, but outside the
    block)."""
    readers, todo = [], list(add.users)
    while todo:
        user = todo.pop()
        tag = user.meta.get("peftc")
        if tag is None:
            readers.append(user)
        elif tag.get("exit") == add.name:
            todo.extend(user.users)
    if len(readers) != 1:
        return None
    norm = readers[0]
    if not _within(module_path(norm), block):
        return None
    if norm.op == "call_module":
        return norm if isinstance(gm.get_submodule(str(norm.target)), nn.LayerNorm) else None
    return norm if _is(norm, _LAYER_NORMS) else None


# --- 3. input embeddings, 4. final hidden states --------------------------------------------


@dataclass(frozen=True)
class InputEmbeddings:
    """The token embedding at `path`: `lookup` the embedding op, `node` the embedding module's
    output (after its own ops: Gemma scales the rows by sqrt(d)), what a model fed `inputs_embeds`
    receives; `ids` the graph input it reads, `stream` the value entering the first block it feeds
    (None without blocks)."""

    kind: ClassVar[str] = "tokens"
    path: str
    node: fx.Node
    ids: fx.Node
    stream: fx.Node | None
    lookup: fx.Node


@dataclass(frozen=True)
class FinalHiddenState:
    """`node` is the stream leaving block stack `blocks` (e.g. `model.layers`) after its last block
    and `norm`, the final norm (None where none follows); `path` is `norm`, else the last block."""

    kind: ClassVar[str] = "final_hidden"
    path: str
    node: fx.Node
    blocks: str
    norm: str | None


def input_embeddings(gm: fx.GraphModule, targets: str | None = None) -> list[InputEmbeddings]:
    """Token embedding lookups of the model's input ids, in graph order (encoder-decoder models have
    two)."""
    firsts = [blocks[0].input for blocks in _stacks(gm).values() if blocks[0].input is not None]
    sites = []
    resolve = Resolver(gm.graph)
    for n in _base_nodes(gm):
        lookup = _embedding_lookup(gm, n)
        if lookup is None:
            continue
        # through views (GPT-2 flattens the ids) and a technique's rewrite of them (prompt tuning's)
        ids = resolve.nodes[captured_name(lookup)]
        while _is(ids, _ID_VIEWS) and isinstance(ids.args[0], fx.Node):
            ids = resolve.nodes[captured_name(ids.args[0])]
        if isinstance(ids, fx.Node) and ids.op == "placeholder":
            stream = next((s for s in firsts if s is n or n in _ancestors(s)), None)
            sites.append(InputEmbeddings(module_path(n), _module_output(n), ids, stream, n))
    return _select(sites, targets, "input embedding")


def final_hidden_states(gm: fx.GraphModule, targets: str | None = None) -> list[FinalHiddenState]:
    """For each stack of blocks, its last block's output after the final norm (see case 4)."""
    types = _module_types(gm)
    sites = []
    for stack, blocks in _stacks(gm).items():
        last = blocks[-1]
        norms = [
            module_path(u)
            for u in last.output.users
            if "norm" in types.get(module_path(u), "").lower()
            and not _within(module_path(u), last.path)
        ]
        if not norms:
            sites.append(FinalHiddenState(last.path, last.output, stack, None))
            continue
        norm = norms[0]
        inside = [
            n
            for n in gm.graph.nodes
            if module_path(n) == norm and n.op not in ("get_attr", "placeholder")
        ]
        leaving = [n for n in inside if any(module_path(u) != norm for u in n.users)]
        sites.append(FinalHiddenState(norm, leaving[-1], stack, norm))
    return _select(sites, targets, "final hidden state")


def _stacks(gm: fx.GraphModule) -> dict[str, list[BlockSite]]:
    """Block sites grouped by their ModuleList (`model.layers`; T5: `encoder.block`,
    `decoder.block`)."""
    stacks: dict[str, list[BlockSite]] = {}
    for block in block_sites(gm):
        stacks.setdefault(block.path.rpartition(".")[0], []).append(block)
    return stacks


def _module_output(lookup: fx.Node) -> fx.Node:
    """The last op of the lookup's module on its way out (a scale, a cast), or the lookup."""
    node, path = lookup, module_path(lookup)
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_function" or module_path(user) != path:
            break
        node = user
    return node


def embedded_rows(gm: fx.GraphModule, site: InputEmbeddings, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the embedding table as the embedding module outputs them: through the ops between
    the lookup and `site.node` (their other operands are stored tensors and constants)."""
    values: dict[fx.Node, Any] = {site.lookup: rows}

    def value(n: Any) -> Any:
        if not isinstance(n, fx.Node):
            return n
        if n not in values:
            if n.op == "get_attr":
                values[n] = get_tensor(gm, str(n.target))
            elif n.op == "call_function":
                args = fx.node.map_aggregate(n.args, value)
                values[n] = n.target(*args, **fx.node.map_aggregate(n.kwargs, value))
            else:
                raise PassError(
                    f"the embedding module {site.path!r} computes its rows from {n.op} {n.name!r}; "
                    "peftc reads them only through stored tensors and constants"
                )
        return values[n]

    with torch.no_grad():
        return value(site.node)


def _embedding_lookup(gm: fx.GraphModule, n: fx.Node) -> Any:
    """The ids an embedding lookup `n` reads, else None."""
    if n.op == "call_module":
        return n.args[0] if isinstance(gm.get_submodule(str(n.target)), nn.Embedding) else None
    if n.op == "call_function" and n.target is aten.embedding.default:
        return n.args[1]
    if n.op == "call_function" and n.target is F.embedding:
        return n.args[0]
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


# --- 5. position ids ------------------------------------------------------------------------

_POSITION_USES = {aten.cos.default, aten.sin.default, torch.cos, torch.sin, "cos", "sin"}
_INT_FLOW_LIMIT = 12  # ops between the numbering and its embedding lookup or rotary angle


def position_ids(gm: fx.GraphModule) -> list[fx.Node]:
    """Sources of position numbers (case 5): integer `arange`s, buffers holding `arange(k)`,
    running counts of the attention mask (OPT numbers `cumsum(mask) * mask - 1`) and `position_ids`
    inputs whose values reach a position embedding lookup (as its indices) or a `cos`/`sin`
    (rotary angles). Masks built from aranges reach neither and are left out."""
    sources = []
    for n in _base_nodes(gm):
        val = _val(n)
        if val is None or val.is_floating_point() or val.dtype == torch.bool:
            continue
        if n.op == "placeholder" and "position" in n.name:
            sources.append(n)
        elif _is(
            n, {aten.arange.default, aten.arange.start, torch.arange, "arange", aten.cumsum.default}
        ) and _numbers_positions(gm, n):
            sources.append(n)
        elif n.op == "get_attr" and _is_arange_buffer(gm, n) and _numbers_positions(gm, n):
            sources.append(n)
    return sources


def _is_arange_buffer(gm: fx.GraphModule, node: fx.Node) -> bool:
    try:
        value = gm.get_buffer(str(node.target))
    except (AttributeError, KeyError):
        return False
    if value.numel() < 2 or value.is_floating_point():
        return False
    row = value.reshape(-1, value.shape[-1])[0]
    return bool(torch.equal(row.cpu(), torch.arange(row.numel(), dtype=row.dtype)))


def _numbers_positions(gm: fx.GraphModule, source: fx.Node) -> bool:
    """Whether `source` reaches an embedding lookup as its indices, or a cos/sin, within a few
    ops."""
    seen, frontier = {source}, [source]
    for _ in range(_INT_FLOW_LIMIT):
        following = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if _is(user, _POSITION_USES) or _embedding_lookup(gm, user) is node:
                    return True
                if _is(user, {aten.embedding.default}) or _is(user, _SDPA_FNS):
                    continue
                val = _val(user)
                # masks compare positions (bool); anything else stays on the numbering's path
                if val is not None and val.dtype != torch.bool:
                    following.append(user)
        frontier = following
    return False
