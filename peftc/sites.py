"""Sites: the places in a captured graph where techniques act, found the same way for
exported and symbolically traced graphs.

1. Linear sites: `aten.linear`, `F.linear`, `call_module(nn.Linear)`, GPT-2's `Conv1D`
   (`addmm(bias, x, W)` with W stored as (in, out)), and NF4 linears (`peftc::nf4_linear`,
   whose `weight` names the packed buffer).
2. Embedding sites: `aten.embedding`, `F.embedding`, `call_module(nn.Embedding)`.
3. Attention sites: `scaled_dot_product_attention` with its q, k, v inputs.
4. Block sites: the repeated blocks of a model (children of its outermost `ModuleList`s,
   e.g. `model.layers.3`), with the residual stream entering and leaving each.
5. The LM head: the last linear site that projects onto the vocabulary.

Every query takes `targets` (see `peftc.targets`); a pattern that selects nothing raises
`TargetError` naming near paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.graph import get_attr_path, get_tensor, module_path, module_type
from peftc.quant.nf4 import NF4Weight
from peftc.regions import AttentionSite, BlockSite, attention_sites, block_sites
from peftc.targets import select

__all__ = [
    "LinearSite",
    "EmbeddingSite",
    "AttentionSite",
    "BlockSite",
    "linear_sites",
    "embedding_sites",
    "attention_sites",
    "block_sites",
    "lm_head",
    "nf4_state",
]

_LINEAR_FNS = {torch.ops.aten.linear.default: "aten.linear", F.linear: "F.linear", torch._C._nn.linear: "F.linear"}
_ADDMM_FNS = {torch.ops.aten.addmm.default, torch.addmm}
_EMBEDDING_FNS = {torch.ops.aten.embedding.default, F.embedding}


@dataclass(frozen=True)
class LinearSite:
    """`node` computes `input @ W.T + b` for the module at `path` (W.T is stored for Conv1D)."""

    path: str
    node: fx.Node
    input: fx.Node
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    kind: str
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class EmbeddingSite:
    path: str
    node: fx.Node
    indices: fx.Node
    weight: str
    num_embeddings: int
    embedding_dim: int
    padding_idx: int = -1


def _base_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of the model itself: what passes inserted (tagged `peftc`) is not a site."""
    return [n for n in gm.graph.nodes if "peftc" not in n.meta]


def linear_sites(gm: fx.GraphModule, targets: str | None = None) -> list[LinearSite]:
    sites = [s for n in _base_nodes(gm) if (s := _linear_site(gm, n)) is not None]
    return _select(sites, targets, "linear site")


def embedding_sites(gm: fx.GraphModule, targets: str | None = None) -> list[EmbeddingSite]:
    sites = [s for n in _base_nodes(gm) if (s := _embedding_site(gm, n)) is not None]
    return _select(sites, targets, "embedding site")


def lm_head(gm: fx.GraphModule) -> LinearSite | None:
    """The last linear site that projects onto the vocabulary (the largest embedding table), if any."""
    embeddings = embedding_sites(gm)
    if not embeddings:
        return None
    vocab = max(s.num_embeddings for s in embeddings)
    heads = [s for s in linear_sites(gm) if s.out_features == vocab]
    return heads[-1] if heads else None


def _select(sites: list, targets: str | None, what: str) -> list:
    chosen = set(select(targets, [s.path for s in sites], what=what))
    return [s for s in sites if s.path in chosen]


def _linear_site(gm: fx.GraphModule, n: fx.Node) -> LinearSite | None:
    if n.op == "call_module":
        module = gm.get_submodule(str(n.target))
        if type(module) is nn.Linear:
            bias = f"{n.target}.bias" if module.bias is not None else None
            return LinearSite(str(n.target), n, n.args[0], f"{n.target}.weight", bias, module.in_features,
                              module.out_features, "nn.Linear")
        return None
    if n.op != "call_function":
        return None
    if n.target in _LINEAR_FNS:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        weight = get_attr_path(w)
        if weight is None:
            return None
        out_features, in_features = get_tensor(gm, weight).shape
        return LinearSite(module_path(n), n, x, weight, get_attr_path(b), in_features, out_features, _LINEAR_FNS[n.target])
    if str(n.target) == "peftc.nf4_linear.default":  # x, packed, absmax, scale, offset, bias, out, in, blocksize
        return LinearSite(module_path(n), n, n.args[0], get_attr_path(n.args[1]), get_attr_path(n.args[5]),
                          n.args[7], n.args[6], "nf4")
    if n.target in _ADDMM_FNS and module_type(n).endswith("Conv1D"):
        b, x, w = n.args[:3]
        weight = get_attr_path(w)
        if weight is None:
            return None
        in_features, out_features = get_tensor(gm, weight).shape
        return LinearSite(module_path(n), n, x, weight, get_attr_path(b), in_features, out_features, "Conv1D", True)
    return None


def _embedding_site(gm: fx.GraphModule, n: fx.Node) -> EmbeddingSite | None:
    if n.op == "call_module":
        module = gm.get_submodule(str(n.target))
        if type(module) is nn.Embedding:
            padding = -1 if module.padding_idx is None else module.padding_idx
            return EmbeddingSite(str(n.target), n, n.args[0], f"{n.target}.weight", module.num_embeddings,
                                 module.embedding_dim, padding)
        return None
    if n.op != "call_function" or n.target not in _EMBEDDING_FNS:
        return None
    if n.target is torch.ops.aten.embedding.default:
        w, ids = n.args[0], n.args[1]
        padding = n.args[2] if len(n.args) > 2 else n.kwargs.get("padding_idx", -1)
    else:
        w, ids = n.args[1], n.args[0]
        padding = n.args[2] if len(n.args) > 2 else n.kwargs.get("padding_idx")
    weight = get_attr_path(w)
    if weight is None:
        return None
    num, dim = get_tensor(gm, weight).shape
    return EmbeddingSite(module_path(n), n, ids, weight, num, dim, -1 if padding is None else padding)


def nf4_state(gm: fx.GraphModule, site) -> NF4Weight:
    """The NF4Weight an `nf4_linear` site reads, from its buffers."""
    _, packed, absmax, scale, offset, _, out_features, in_features, blocksize = site.node.args
    read = lambda node: None if node is None else get_tensor(gm, get_attr_path(node))  # noqa: E731
    return NF4Weight(read(packed), read(absmax), torch.Size((out_features, in_features)), torch.float32, blocksize,
                     scale is not None, read(scale), read(offset))
