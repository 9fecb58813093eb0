"""Sites: the places in a captured graph where techniques act, found the same way for
exported and symbolically traced graphs.

Weight sites (`WeightSite`: one node computing with one stored weight; what weight-space
techniques rewrite), recognised by what the computation is; capture first canonicalises
`x @ W.T + b`, `mm`/`addmm` with a transposed weight to `aten.linear` (`peftc.ir.canonical`):
1. Linear sites: `aten.linear`, `F.linear`, `call_module(nn.Linear)`, GPT-2's `Conv1D`
   (`addmm(bias, x, W)` with W stored as (in, out)), and ops of registered weight formats
   (`peftc::nf4_linear`, `storage="nf4"`, whose `weight` names the packed buffer).
2. Convolution sites: `aten.conv1d/2d/3d` (numeric or "valid"/"same" padding), `F.conv*d`,
   `call_module(nn.Conv*d)` (zero padding).
3. Embedding sites: `aten.embedding`, `F.embedding`, `call_module(nn.Embedding)`.
4. Layer-norm sites: `aten.layer_norm`, `F.layer_norm`, `call_module(nn.LayerNorm)` with a weight.
5. RMSNorm sites: the scale `W * h` of an RMSNorm module (Llama, Mistral, Qwen2, T5 compute their
   norms from elementwise ops; the site is the one op that reads the weight).
6. The LM head: the linear site of the module `get_output_embeddings()` returned at capture.
A site rewritten by techniques (its input or weight replaced) is still found, as captured.
Region sites (`peftc.sites.regions`): attention, blocks, the input embeddings, the final hidden
state.

Every query takes `targets` (see `peftc.ir.targets`); a pattern that selects nothing raises
`TargetError` naming near paths.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.ir.graph import get_attr_path, get_tensor, module_path, module_type, peftc_meta
from peftc.ir.rewrites import Resolver, as_captured
from peftc.ir.targets import select
from peftc.sites.formats import format_of_node

__all__ = [
    "WeightSite",
    "LinearSite",
    "ConvSite",
    "EmbeddingSite",
    "LayerNormSite",
    "RMSNormSite",
    "weight_sites",
    "linear_sites",
    "conv_sites",
    "embedding_sites",
    "layer_norm_sites",
    "rms_norm_sites",
    "weight_site_at",
    "lm_head",
]

aten = torch.ops.aten
_LINEAR_FNS = {
    torch.ops.aten.linear.default: "aten.linear",
    F.linear: "F.linear",
    torch._C._nn.linear: "F.linear",
}
_ADDMM_FNS = {torch.ops.aten.addmm.default, torch.addmm}
_EMBEDDING_FNS = {torch.ops.aten.embedding.default, F.embedding}
_CONV_FNS = {
    torch.ops.aten.conv1d.default: 1,
    torch.ops.aten.conv2d.default: 2,
    torch.ops.aten.conv3d.default: 3,
    # padding="valid" / "same" (SigLIP's patch embedding)
    torch.ops.aten.conv1d.padding: 1,
    torch.ops.aten.conv2d.padding: 2,
    torch.ops.aten.conv3d.padding: 3,
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
}
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_LAYER_NORM_FNS = {torch.ops.aten.layer_norm.default, F.layer_norm}


@dataclass(frozen=True, kw_only=True)
class WeightSite:
    """A node computing with one stored weight: what weight-space techniques rewrite.

    `input` is the value the weight is applied to (token ids for embeddings); `weight` and
    `bias` are qualified names; `storage` says how the weight is held (`"dense"`, `"nf4"`, ...,
    see `peftc.sites.formats`); `op` is the captured op's flavour.
    """

    kind: ClassVar[str] = ""
    path: str
    node: fx.Node
    input: fx.Node
    weight: str
    bias: str | None
    op: str
    storage: str = "dense"


@dataclass(frozen=True, kw_only=True)
class LinearSite(WeightSite):
    """`node` computes `input @ W.T + b` (W.T is what is stored for GPT-2's Conv1D:
    `fan_in_fan_out`)."""

    kind: ClassVar[str] = "linear"
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False

    def functional(self, x: Any, weight: Any, bias: Any) -> tuple[Any, tuple]:
        """The op computing this site with weight `weight` in (out, in) layout."""
        return aten.linear.default, (x, weight, bias)


@dataclass(frozen=True, kw_only=True)
class ConvSite(WeightSite):
    """`node` is a 1d/2d/3d convolution; W is (out_channels, in_channels / groups, *kernel_size)."""

    kind: ClassVar[str] = "conv"
    dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int

    def functional(self, x: Any, weight: Any, bias: Any) -> tuple[Any, tuple]:
        op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[self.dims]
        if isinstance(self.padding, str):
            return op.padding, (
                x,
                weight,
                bias,
                list(self.stride),
                self.padding,
                list(self.dilation),
                self.groups,
            )
        return op.default, (
            x,
            weight,
            bias,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.groups,
        )


@dataclass(frozen=True, kw_only=True)
class EmbeddingSite(WeightSite):
    """`node` looks up `input` (token ids) in W (num_embeddings, embedding_dim)."""

    kind: ClassVar[str] = "embedding"
    num_embeddings: int
    embedding_dim: int
    padding_idx: int = -1

    def functional(self, x: Any, weight: Any, bias: Any) -> tuple[Any, tuple]:
        return aten.embedding.default, (weight, x, self.padding_idx)


@dataclass(frozen=True, kw_only=True)
class LayerNormSite(WeightSite):
    """`node` is `layer_norm(input, normalized_shape, W, b, eps)`; `weight` may be None (no
    affine)."""

    kind: ClassVar[str] = "layer_norm"
    normalized_shape: tuple[int, ...]
    eps: float

    def functional(self, x: Any, weight: Any, bias: Any) -> tuple[Any, tuple]:
        return aten.layer_norm.default, (x, list(self.normalized_shape), weight, bias, self.eps)


@dataclass(frozen=True, kw_only=True)
class RMSNormSite(WeightSite):
    """`node` is an RMSNorm's scale, `W * input` with `input` already normalised (transformers'
    `LlamaRMSNorm`, `Qwen2RMSNorm`, `T5LayerNorm`, ... compute it from elementwise ops)."""

    kind: ClassVar[str] = "rms_norm"
    hidden_size: int

    def functional(self, x: Any, weight: Any, bias: Any) -> tuple[Any, tuple]:
        return aten.mul.Tensor, (weight, x)


def _base_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of the model itself: what passes inserted (tagged `peftc`, unless marked `base`) is not
    a site."""
    return [n for n in gm.graph.nodes if n.meta.get("peftc", {}).get("base", "peftc" not in n.meta)]


def weight_sites(
    gm: fx.GraphModule, targets: str | None = None, kinds: tuple[str, ...] | None = None
) -> list[WeightSite]:
    """Every weight site (of `kinds`, default all), in graph order."""
    resolve = Resolver(gm.graph)
    sites = [
        s
        for n in _base_nodes(gm)
        if (s := _weight_site(gm, n, resolve)) is not None and (kinds is None or s.kind in kinds)
    ]
    return _select(sites, targets, " or ".join(kinds or ("weight",)) + " site")


def weight_site_at(gm: fx.GraphModule, node: fx.Node) -> WeightSite | None:
    """The weight site `node` computes, if it is one (as captured, if techniques rewrote it)."""
    return _weight_site(gm, node)


def linear_sites(gm: fx.GraphModule, targets: str | None = None) -> list[LinearSite]:
    return weight_sites(gm, targets, ("linear",))


def conv_sites(gm: fx.GraphModule, targets: str | None = None) -> list[ConvSite]:
    return weight_sites(gm, targets, ("conv",))


def embedding_sites(gm: fx.GraphModule, targets: str | None = None) -> list[EmbeddingSite]:
    return weight_sites(gm, targets, ("embedding",))


def layer_norm_sites(gm: fx.GraphModule, targets: str | None = None) -> list[LayerNormSite]:
    return weight_sites(gm, targets, ("layer_norm",))


def rms_norm_sites(gm: fx.GraphModule, targets: str | None = None) -> list[RMSNormSite]:
    return weight_sites(gm, targets, ("rms_norm",))


def lm_head(gm: fx.GraphModule) -> LinearSite | None:
    """The linear site of the module the model's `get_output_embeddings()` returned at capture (a
    transformers model's LM head), if any."""
    path = peftc_meta(gm).get("output_embeddings")
    return next((s for s in linear_sites(gm) if s.path == path), None) if path else None


def _select(sites: list, targets: str | None, what: str) -> list:
    chosen = set(select(targets, [s.path for s in sites], what=what))
    return [s for s in sites if s.path in chosen]


def _arg(n: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return n.args[index] if len(n.args) > index else n.kwargs.get(name, default)


def _weight_site(
    gm: fx.GraphModule, n: fx.Node, resolve: Resolver | None = None
) -> WeightSite | None:
    if isinstance(n, fx.Node) and "peftc_original" in n.meta:
        site = _weight_site(gm, as_captured(n, resolve or Resolver(gm.graph)))
        return None if site is None else dataclasses.replace(site, node=n)
    if n.op == "call_module":
        return _module_site(gm, n)
    if n.op != "call_function":
        return None
    if n.target in _LINEAR_FNS:
        return _linear_fn_site(gm, n)
    if n.target in _ADDMM_FNS and module_type(n).endswith("Conv1D"):
        return _hf_conv1d_site(gm, n)
    if n.target in _CONV_FNS:
        return _conv_fn_site(gm, n)
    if n.target in _EMBEDDING_FNS:
        return _embedding_fn_site(gm, n)
    if n.target in _LAYER_NORM_FNS:
        return _layer_norm_fn_site(gm, n)
    if n.target in (aten.mul.Tensor, torch.mul, operator.mul):
        return _rms_norm_site(gm, n)
    return _registered_site(gm, n)


def _linear_fn_site(gm: fx.GraphModule, n: fx.Node) -> LinearSite | None:
    """`F.linear` / `aten.linear`."""
    weight = get_attr_path(n.args[1])
    if weight is None:
        return None
    out_features, in_features = get_tensor(gm, weight).shape
    return LinearSite(
        path=_owner(weight, n),
        node=n,
        input=n.args[0],
        weight=weight,
        bias=get_attr_path(_arg(n, 2, "bias")),
        op=_LINEAR_FNS[n.target],
        in_features=in_features,
        out_features=out_features,
    )


def _hf_conv1d_site(gm: fx.GraphModule, n: fx.Node) -> LinearSite | None:
    """`addmm(b, x, W)` in transformers' Conv1D (GPT-2): a linear site with W stored (in, out)."""
    b, x, w = n.args[:3]
    weight = get_attr_path(w)
    if weight is None:
        return None
    in_features, out_features = get_tensor(gm, weight).shape
    return LinearSite(
        path=module_path(n),
        node=n,
        input=x,
        weight=weight,
        bias=get_attr_path(b),
        op="Conv1D",
        in_features=in_features,
        out_features=out_features,
        fan_in_fan_out=True,
    )


def _conv_fn_site(gm: fx.GraphModule, n: fx.Node) -> ConvSite | None:
    weight, storage = get_attr_path(n.args[1]), "dense"
    if weight is None and getattr(n.args[1], "target", None) is aten._weight_norm.default:
        # a weight-normed convolution: its site holds direction v (and magnitude g)
        weight, storage = get_attr_path(n.args[1].args[0]), "weight_norm"
    if weight is None:
        return None
    dims = _CONV_FNS[n.target]
    W = get_tensor(gm, weight)
    groups = _arg(n, 6, "groups", 1)
    return ConvSite(
        path=_owner(weight, n) if storage == "dense" else module_path(n),
        node=n,
        input=n.args[0],
        weight=weight,
        bias=get_attr_path(_arg(n, 2, "bias")),
        storage=storage,
        op=f"conv{dims}d",
        dims=dims,
        in_channels=W.shape[1] * groups,
        out_channels=W.shape[0],
        kernel_size=tuple(W.shape[2:]),
        stride=_ntuple(_arg(n, 3, "stride", 1), dims),
        padding=_padding(_arg(n, 4, "padding", 0), dims),
        dilation=_ntuple(_arg(n, 5, "dilation", 1), dims),
        groups=groups,
    )


def _embedding_fn_site(gm: fx.GraphModule, n: fx.Node) -> EmbeddingSite | None:
    """`F.embedding(ids, W)` or `aten.embedding(W, ids)`."""
    if n.target is torch.ops.aten.embedding.default:
        w, ids, padding = n.args[0], n.args[1], _arg(n, 2, "padding_idx", -1)
    else:
        w, ids, padding = n.args[1], n.args[0], _arg(n, 2, "padding_idx")
    weight = get_attr_path(w)
    if weight is None:
        return None
    num, dim = get_tensor(gm, weight).shape
    return EmbeddingSite(
        path=_owner(weight, n),
        node=n,
        input=ids,
        weight=weight,
        bias=None,
        op="embedding",
        num_embeddings=num,
        embedding_dim=dim,
        padding_idx=-1 if padding is None else padding,
    )


def _layer_norm_fn_site(gm: fx.GraphModule, n: fx.Node) -> LayerNormSite | None:
    weight = get_attr_path(_arg(n, 2, "weight"))
    if weight is None:
        return None
    return LayerNormSite(
        path=_owner(weight, n),
        node=n,
        input=n.args[0],
        weight=weight,
        bias=get_attr_path(_arg(n, 3, "bias")),
        op="layer_norm",
        normalized_shape=tuple(n.args[1]),
        eps=_arg(n, 4, "eps", 1e-5),
    )


def _rms_norm_site(gm: fx.GraphModule, n: fx.Node) -> RMSNormSite | None:
    """`mul(W, h)` (either order) where W is the 1-D weight of the norm module computing it."""
    if len(n.args) != 2 or not module_type(n).endswith(("RMSNorm", "T5LayerNorm")):
        return None
    for w, x in (n.args, n.args[::-1]):
        weight = get_attr_path(w)
        if weight is not None and weight == f"{module_path(n)}.weight" and isinstance(x, fx.Node):
            tensor = get_tensor(gm, weight)
            if tensor.dim() == 1:
                return RMSNormSite(
                    path=module_path(n),
                    node=n,
                    input=x,
                    weight=weight,
                    bias=None,
                    op="rms_norm",
                    hidden_size=tensor.shape[0],
                )
    return None


def _module_site(gm: fx.GraphModule, n: fx.Node) -> WeightSite | None:
    if not n.args:  # a module called without input (attention's train-only dropout p)
        return None
    path = str(n.target)
    module = gm.get_submodule(path)
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    common = dict(path=path, node=n, input=n.args[0], weight=f"{path}.weight", bias=bias)
    if type(module) is nn.Linear:
        return LinearSite(
            **common,
            op="nn.Linear",
            in_features=module.in_features,
            out_features=module.out_features,
        )
    if type(module) in _CONV_MODULES and module.padding_mode == "zeros":
        dims = _CONV_MODULES[type(module)]
        return ConvSite(
            **common,
            op=f"nn.Conv{dims}d",
            dims=dims,
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
        )
    if type(module) is nn.Embedding:
        padding = -1 if module.padding_idx is None else module.padding_idx
        return EmbeddingSite(
            **common,
            op="nn.Embedding",
            num_embeddings=module.num_embeddings,
            embedding_dim=module.embedding_dim,
            padding_idx=padding,
        )
    if type(module) is nn.LayerNorm and module.weight is not None:
        return LayerNormSite(
            **common,
            op="nn.LayerNorm",
            normalized_shape=tuple(module.normalized_shape),
            eps=module.eps,
        )
    return None


def _registered_site(gm: fx.GraphModule, n: fx.Node) -> WeightSite | None:
    """Sites of ops a weight format registered (e.g. `peftc::nf4_linear`; a decoded parameter
    stack is a parameter site, not a weight site)."""
    fmt = format_of_node(n)
    site = fmt.site(gm, n) if fmt is not None else None
    return site if site is not None and site.kind != "parameter" else None


def _owner(weight: str, n: fx.Node) -> str:
    """The module owning `weight` when it lies inside the calling module (`nn.MultiheadAttention`
    calls its `out_proj` weight itself), else the calling module (a tied LM head reads the
    embedding's weight)."""
    owner, caller = weight.rpartition(".")[0], module_path(n)
    return owner if owner.startswith(caller + ".") or (not caller and owner) else caller


def _ntuple(value: Any, dims: int) -> tuple[int, ...]:
    return (
        tuple(value) * (dims if len(tuple(value)) == 1 else 1)
        if isinstance(value, (list, tuple))
        else (value,) * dims
    )


def _padding(value: Any, dims: int) -> tuple[int, ...] | str:
    return value if isinstance(value, str) else _ntuple(value, dims)
