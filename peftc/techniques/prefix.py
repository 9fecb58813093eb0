"""Prefix tuning: trainable keys and values of length `n` in front of every attention's own, as in HF peft.

    sdpa(q, k, v, mask)  ->  sdpa(q, cat(P_k, k), cat(P_v, v), pad(mask, n visible columns in front))
    positions 0..L-1     ->  positions n..n+L-1

1. Sites are `attention_sites(gm, targets)` in graph order; site i is peft's layer i. Every site
   must have the same key/value heads and head_dim (token_dim = kv_heads * head_dim, as peft sets
   it for GQA models).
2. The parameter is peft's `prompt_encoder.<adapter>.embedding.weight`, (n, 2 * sites * token_dim);
   row t viewed as (2 * sites, kv_heads, head_dim): entry 2i is site i's key, 2i + 1 its value
   (peft's view (B, n, 2L, heads, hd) and permute to (2L, B, heads, n, hd)). With
   `prefix_projection=True` it is Embedding(n, token_dim) -> Linear -> Tanh -> Linear, at peft's
   names `prompt_encoder.<adapter>.transform.{0,2}.{weight,bias}`.
3. GQA: where the graph repeats key and value per query head (`repeat_kv`), the prefix heads are
   repeated the same way (`repeat_interleave`) and joined after the repeat; with SDPA's
   `enable_gqa=True` they are joined as they are.
4. Masks: a bool or float mask gets n visible columns in front (True / 0.0); SDPA without a mask
   and `is_causal=True` gets an explicit causal mask whose first n columns are visible.
5. Positions: peft runs the model with a cache of n entries, so the user's tokens are numbered
   n..n+L-1 (rotary and learned absolute positions alike): every position-id source found by
   `regions.position_ids` is shifted by n.
6. Checkpoints in peft's format (`save_prefix`, `load_prefix`): `adapter_model.safetensors` holds
   `prompt_embeddings`, the flat prefix (n, 2 * layers * token_dim) after any projection (what peft
   saves), beside peft's PrefixTuningConfig as `adapter_config.json`. A loaded prefix is the flat
   parameter, as peft's `inference_mode`: a projection cannot be recovered from its output.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from peftc.ir.pipeline import apply
from peftc.ir.registry import PassResult, register_pass
from peftc.technique.checkpoint import load_adapter
from peftc._io import atomic_dir
from peftc.errors import CheckpointError, OptionError, PassError
from peftc.technique.checkpoint import peft_task_type
from peftc.ir.graph import get_tensor, peftc_meta, set_tensor, tag, tagged
from peftc.sites.regions import AttentionSite, attention_sites, position_ids

__all__ = ["PrefixOptions", "prefix", "prefixes", "has_prefix", "save_prefix", "load_prefix"]

aten = torch.ops.aten
_PASS = "prefix"


@dataclass(frozen=True)
class PrefixOptions:
    n: int = 20  # peft's num_virtual_tokens
    targets: str | None = None  # attention modules that get a prefix (all by default)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the projection's hidden size; None: token_dim, as peft
    init: str = "normal"  # "normal": nn.Embedding's N(0, 1) as peft; "zero": peft's init_weights="zero"
    adapter: str = "default"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise OptionError(f"prefix: n (the number of virtual tokens) must be a positive integer, got {self.n!r}")
        if self.init not in ("normal", "zero"):
            raise OptionError(f"prefix: init must be 'normal' or 'zero', got {self.init!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise OptionError(f"prefix: encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise OptionError("prefix: encoder_hidden_size only applies with prefix_projection=True; set it or drop "
                              "encoder_hidden_size")


def _shape(sites: list[AttentionSite]) -> tuple[int, int]:
    shapes = {(s.num_kv_heads, s.head_dim) for s in sites}
    if len(shapes) != 1 or None in next(iter(shapes)):
        raise PassError(f"prefix: attention sites differ in key/value heads or head_dim, or they are unknown "
                        f"({sorted(map(str, shapes))}); select sites of one shape with targets=")
    return next(iter(shapes))  # type: ignore[return-value]


@register_pass(_PASS, options=PrefixOptions)
def prefix(gm: fx.GraphModule, options: PrefixOptions) -> PassResult:
    """Prefix tuning: `n` trainable keys and values in front of each attention's, as peft's PREFIX_TUNING.

    1. One flat parameter `prompt_encoder.<adapter>.embedding.weight` (n, 2 * layers * kv_heads * head_dim),
       or with `prefix_projection=True` peft's Embedding -> Linear -> Tanh -> Linear.
    2. Masks get n visible columns in front; position ids are shifted by n, as peft's cache of n numbers them.
    """
    existing = {v.meta.get("module_path") for v in tagged(gm, **{"pass": _PASS}, role="prefix_view")}
    if existing:
        raise PassError(f"prefix: this graph already has a prefix ({', '.join(sorted(existing))}); one prefix per "
                        "graph, as peft runs one: start from the graph before the first prefix")
    sites = attention_sites(gm, options.targets)
    if not sites:
        raise PassError("prefix: the graph has no attention sites (scaled_dot_product_attention); capture the model "
                        "with attn_implementation='sdpa' (or 'eager' models rewritten to SDPA) to use prefix tuning")
    kv_heads, head_dim = _shape(sites)
    token_dim, layers, n = kv_heads * head_dim, len(sites), options.n
    width = 2 * layers * token_dim
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    dtype = _dtype(gm)
    root = f"prompt_encoder.{options.adapter}"

    def param(name: str, shape: tuple[int, ...], zero: bool = False, linear_in: int | None = None) -> fx.Node:
        if zero:
            value = torch.zeros(shape, dtype=dtype)
        elif linear_in is not None:  # nn.Linear's default init
            bound = 1 / linear_in ** 0.5
            value = torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)
        else:
            value = torch.randn(shape, generator=generator).to(dtype)
        set_tensor(gm, f"{root}.{name}", nn.Parameter(value))
        node = gm.graph.get_attr(f"{root}.{name}")
        return tag(node, pass_name=_PASS, role=name, path=root)

    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        call = _caller(gm.graph, root)
        if options.prefix_projection:
            hidden = options.encoder_hidden_size or token_dim
            zero = options.init == "zero"
            tokens = param("embedding.weight", (n, token_dim))
            w0, b0 = param("transform.0.weight", (hidden, token_dim), linear_in=token_dim), param(
                "transform.0.bias", (hidden,), linear_in=token_dim)
            w2, b2 = param("transform.2.weight", (width, hidden), zero, hidden), param(
                "transform.2.bias", (width,), zero, hidden)
            flat = call(aten.linear.default, call(aten.tanh.default, call(aten.linear.default, tokens, w0, b0,
                                                                            role="transform_0"), role="tanh"),
                        w2, b2, role="prefix_flat")
        else:
            flat = param("embedding.weight", (n, width), options.init == "zero")
        # (n, 2L, kv_heads, hd) -> (2L, kv_heads, n, hd): entry 2i keys, 2i + 1 values of site i
        kv = call(aten.permute.default, call(aten.reshape.default, flat, [n, 2 * layers, kv_heads, head_dim],
                                             role="prefix_view"), [1, 2, 0, 3], role="prefix_kv")

    masks: dict[fx.Node | None, fx.Node] = {}
    for i, site in enumerate(sites):
        _join(gm, site, kv, i, n, kv_heads, masks, dtype)
    shifted = _shift_positions(gm, n)
    gm.graph.lint()
    gm.recompile()
    report = f"{n} virtual tokens at {layers} attention sites; {len(shifted)} position source(s) shifted by {n}"
    return PassResult(gm, modified=True, sites=tuple(s.path for s in sites), report=report)


def _dtype(gm: fx.GraphModule) -> torch.dtype:
    floats = [p.dtype for p in gm.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.float32


def _caller(graph: fx.Graph, path: str):
    def call(target, *args, role: str) -> fx.Node:
        return tag(graph.call_function(target, tuple(args)), pass_name=_PASS, role=role, path=path)
    return call


def _join(gm: fx.GraphModule, site: AttentionSite, kv: fx.Node, i: int, n: int, kv_heads: int,
          masks: dict, dtype: torch.dtype) -> None:
    graph, node = gm.graph, site.node
    key_val = site.key.meta.get("val")
    heads = key_val.shape[-3] if isinstance(key_val, torch.Tensor) else kv_heads
    rep = int(heads) // kv_heads  # 1 without GQA or with enable_gqa=True
    with graph.inserting_before(node):
        call = _caller(graph, site.path)
        batch = call(aten.sym_size.int, site.query, 0, role="batch")
        joined = []
        for which, (index, tensor) in enumerate(((2 * i, site.key), (2 * i + 1, site.value))):
            name = "key" if which == 0 else "value"
            p = call(aten.select.int, kv, 0, index, role=f"prefix_{name}")
            if rep > 1:  # transformers' repeat_kv gives query head h the kv head h // rep
                p = call(aten.repeat_interleave.self_int, p, rep, 0, role=f"prefix_{name}_repeat")
            val = tensor.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dtype != dtype:  # peft casts to the model's dtype
                p = call(aten._to_copy.default, p, role=f"prefix_{name}_cast")
                p.kwargs = {"dtype": val.dtype}
            p = call(aten.expand.default, call(aten.unsqueeze.default, p, 0, role=f"prefix_{name}_1"),
                     [batch, -1, -1, -1], role=f"prefix_{name}_batch")
            joined.append(call(aten.cat.default, [p, tensor], 2, role=f"{name}_with_prefix"))
        mask = _mask(gm, site, n, masks, call)
    args = {"query": site.query, "key": joined[0], "value": joined[1], "attn_mask": mask, "dropout_p": site.dropout_p,
            "is_causal": False if mask is not None else site.is_causal}
    node.args = (args["query"], args["key"], args["value"])
    kwargs = {k: v for k, v in node.kwargs.items() if k not in args}
    kwargs.update({k: args[k] for k in ("attn_mask", "dropout_p", "is_causal")})
    if site.scale is not None:
        kwargs["scale"] = site.scale
    if site.enable_gqa:
        kwargs["enable_gqa"] = True
    node.kwargs = kwargs


def _mask(gm: fx.GraphModule, site: AttentionSite, n: int, masks: dict, call) -> fx.Node | None:
    """The site's mask with n visible key columns in front (case 4); a shared mask is extended once."""
    if site.mask is not None:
        if site.mask not in masks:  # peft prepends n ones to attention_mask: every query sees the prefix
            masks[site.mask] = _pad(site.mask, n, call)
        return masks[site.mask]
    if not site.is_causal:
        return None
    # is_causal without a mask: query i (numbered n + i) sees keys 0..n + i of the joined sequence
    length = call(aten.sym_size.int, site.query, -2, role="query_length")
    total = call(operator.add, length, n, role="key_length")
    rows = call(aten.unsqueeze.default, call(aten.arange.default, length, role="query_positions"), 1, role="rows")
    cols = call(aten.arange.default, total, role="key_positions")
    return call(aten.le.Tensor, cols, call(aten.add.Tensor, rows, n, role="rows_shifted"), role="causal_mask")


def _pad(mask: fx.Node, n: int, call) -> fx.Node:
    val = mask.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
        # constant_pad_nd has no bool kernel on every backend: pad as uint8, back to bool
        as_int = call(aten._to_copy.default, mask, role="mask_u8")
        as_int.kwargs = {"dtype": torch.uint8}
        padded = call(aten.constant_pad_nd.default, as_int, [n, 0], 1, role="mask_padded")
        out = call(aten._to_copy.default, padded, role="mask_with_prefix")
        out.kwargs = {"dtype": torch.bool}
        return out
    return call(aten.constant_pad_nd.default, mask, [n, 0], 0.0, role="mask_with_prefix")


def _shift_positions(gm: fx.GraphModule, n: int) -> list[fx.Node]:
    sources = position_ids(gm)
    for source in sources:
        with gm.graph.inserting_after(source):
            shifted = gm.graph.call_function(aten.add.Tensor, (source, n))
        source.replace_all_uses_with(shifted, delete_user_cb=lambda user, new=shifted: user is not new)
        tag(shifted, pass_name=_PASS, role="positions_shifted", path=source.meta.get("module_path", ""))
    return sources


# --- checkpoints in peft's format (case 6) --------------------------------------------------

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _layout(gm: fx.GraphModule, adapter: str) -> tuple[int, int, int, int]:
    """(n, layers, kv_heads, head_dim) of prefix `adapter`, read from its reshape node."""
    root = f"prompt_encoder.{adapter}"
    views = [v for v in tagged(gm, **{"pass": _PASS}, role="prefix_view") if v.meta.get("module_path") == root]
    if not views:
        raise CheckpointError(f"no prefix named {adapter!r} in this graph; apply 'prefix(n=...)' first")
    n, two_layers, kv_heads, head_dim = views[0].args[1]
    return n, two_layers // 2, kv_heads, head_dim


def _flat_prefix(gm: fx.GraphModule, adapter: str) -> torch.Tensor:
    root = f"prompt_encoder.{adapter}"
    weight = get_tensor(gm, f"{root}.embedding.weight")
    try:
        w0, b0 = get_tensor(gm, f"{root}.transform.0.weight"), get_tensor(gm, f"{root}.transform.0.bias")
        w2, b2 = get_tensor(gm, f"{root}.transform.2.weight"), get_tensor(gm, f"{root}.transform.2.bias")
    except (AttributeError, KeyError):
        return weight.detach()
    return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(weight, w0, b0)), w2, b2).detach()


def prefixes(gm: fx.GraphModule) -> list[str]:
    """The adapter names of the prefixes in `gm`."""
    return [v.meta["module_path"].removeprefix("prompt_encoder.") for v in tagged(gm, **{"pass": _PASS}, role="prefix_view")]


def has_prefix(gm: fx.GraphModule, adapter: str = "default") -> bool:
    return adapter in prefixes(gm)


def save_prefix(gm: fx.GraphModule, directory: str | Path, adapter: str = "default",
                task_type: str | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write prefix `adapter` as peft saves PREFIX_TUNING: `prompt_embeddings` (the flat prefix after any
    projection) and its PrefixTuningConfig, loadable by `PeftModel.from_pretrained`. task_type and the
    base model's name default to the captured model's class and `name_or_path`."""
    from safetensors.torch import save_file

    n, layers, kv_heads, head_dim = _layout(gm, adapter)
    root = f"prompt_encoder.{adapter}"
    projection = any(name.startswith(f"{root}.transform.") for name, _ in gm.named_parameters())
    hidden = get_tensor(gm, f"{root}.transform.0.weight").shape[0] if projection else kv_heads * head_dim
    name_or_path = peftc_meta(gm).get("capture", {}).get("config", {}).get("name_or_path")
    config = {"peft_type": "PREFIX_TUNING", "task_type": task_type or peft_task_type(gm), "num_virtual_tokens": n,
              "token_dim": kv_heads * head_dim, "num_transformer_submodules": 1, "num_attention_heads": kv_heads,
              "num_layers": layers, "encoder_hidden_size": hidden, "prefix_projection": projection,
              "init_weights": None, "inference_mode": True, "modules_to_save": None, "auto_mapping": None,
              "base_model_name_or_path": base_model_name_or_path or name_or_path, "revision": None}
    with atomic_dir(directory) as tmp:
        save_file({"prompt_embeddings": _flat_prefix(gm, adapter).contiguous()}, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def load_prefix(gm: fx.GraphModule, directory: str | Path, adapter: str = "default") -> fx.GraphModule:
    """`gm` with the peft PREFIX_TUNING checkpoint in `directory` as prefix `adapter`, the flat parameter
    (trainable, as after `prefix`): on a copy rewritten by `prefix(n=...)` where `gm` has no prefix yet, in
    place where `gm` has a flat prefix `adapter` (as `load_prompt`)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG).exists() or not (directory / WEIGHTS).exists():
        raise CheckpointError(f"{directory} is not a peft adapter folder: it needs {CONFIG} and {WEIGHTS}")
    config: dict[str, Any] = json.loads((directory / CONFIG).read_text())
    if config.get("peft_type") != "PREFIX_TUNING":
        raise CheckpointError(f"{directory} holds a {config.get('peft_type')} adapter, not PREFIX_TUNING; load it with "
                              "peftc.load_adapter")
    if config.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"{directory} is an encoder-decoder prefix (num_transformer_submodules="
                              f"{config['num_transformer_submodules']}), which the prefix pass does not build")
    found = load_file(directory / WEIGHTS)
    if set(found) != {"prompt_embeddings"}:
        raise CheckpointError(f"{directory}: expected one tensor 'prompt_embeddings', found {sorted(found)}")
    n = int(config["num_virtual_tokens"])
    root = f"prompt_encoder.{adapter}"
    if any(name.startswith(f"{root}.transform.") for name, _ in gm.named_parameters()):
        raise CheckpointError(f"{directory} holds a flat prefix (peft saves a projection's output), and this graph's "
                              f"prefix {adapter!r} computes it with a projection; load into the graph before 'prefix'")
    out = gm if has_prefix(gm, adapter) else apply(gm, f"prefix(n={n}, adapter={adapter!r})")
    n, layers, kv_heads, head_dim = _layout(out, adapter)
    ours = (n, 2 * layers * kv_heads * head_dim)
    theirs = (config["num_layers"], config["token_dim"], config["num_attention_heads"])
    if theirs != (layers, kv_heads * head_dim, kv_heads) or tuple(found["prompt_embeddings"].shape) != ours:
        raise CheckpointError(f"{directory} does not fit this model: the checkpoint has num_layers, token_dim, "
                              f"num_attention_heads = {theirs} and prompt_embeddings "
                              f"{tuple(found['prompt_embeddings'].shape)}; "
                              f"the model's attention sites give {(layers, kv_heads * head_dim, kv_heads)} and {ours}. "
                              "Load it into the model it was trained on")
    with torch.no_grad():  # in place: an optimizer holding the parameter keeps it
        get_tensor(out, f"{root}.embedding.weight").copy_(found["prompt_embeddings"])
    return out
