"""How a site's weight is stored: one interface for dense and quantized formats.

The technique layer never asks which format a site has; it calls its `WeightFormat`:

1. `read(gm, site)`: the weight as a float tensor in the op's layout ((out, in) for linears).
2. `node(builder, site)`: the same weight as a graph value (DoRA's norm, rotations of W).
3. `snapshot(gm, site)` / `restore(gm, site, state)`: what merge keeps to undo a fold exactly.
4. `write(gm, site, weight, bias, options)`: store a folded weight; returns the fraction of the
   update that survived (1.0 for dense storage).
5. `compute_dtype(gm, site)`: the dtype the op computes in (adapter weights take it, or float32
   over a half-precision base: `adds_in_adapter_dtype` says how peft adds their term there).
6. `storage(gm, site)`: the names of the tensors that hold the weight (what FSDP2 shards).
7. Quantized formats may offer `round_trip(weight, **options)`: the tensor stored and read back
   (`round_trip(name, weight)` finds it by name: LoftQ's init quantizes through it).

`dense` and `weight_norm` (a convolution's weight computed as g * v / ||v||: wav2vec2's and
HuBERT's positional convolution) are built in; quantized formats register themselves
(`peftc.quant.format` registers `nf4`) with the op that computes through them, so the site queries
find those ops too.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import fx, nn

from peftc.errors import PassError
from peftc.ir.graph import get_tensor, set_tensor

__all__ = [
    "WeightFormat",
    "DenseFormat",
    "register_format",
    "format_of",
    "round_trip",
    "format_of_node",
    "read_weight",
    "weight_norm_of",
]


class WeightFormat(Protocol):
    name: str
    # over a half-precision base with a float32 adapter, whether peft adds the adapter's term in
    # float32 and casts the sum (a dense layer) or casts the term first (bitsandbytes' 4-bit)
    adds_in_adapter_dtype: bool

    def site(self, gm: fx.GraphModule, node: fx.Node) -> Any: ...
    def read(self, gm: fx.GraphModule, site: Any) -> torch.Tensor: ...
    def node(self, builder: Any, site: Any) -> fx.Node: ...
    def snapshot(self, gm: fx.GraphModule, site: Any) -> Any: ...
    def restore(self, gm: fx.GraphModule, site: Any, state: Any) -> None: ...
    def write(
        self,
        gm: fx.GraphModule,
        site: Any,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        options: Any,
    ) -> float: ...
    def compute_dtype(self, gm: fx.GraphModule, site: Any) -> torch.dtype: ...
    def storage(self, gm: fx.GraphModule, site: Any) -> list[str]: ...


class DenseFormat:
    """A plain floating-point parameter (GPT-2's Conv1D stores it transposed)."""

    name = "dense"
    adds_in_adapter_dtype = True

    def site(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        return None

    def read(self, gm: fx.GraphModule, site: Any) -> torch.Tensor:
        weight = get_tensor(gm, site.weight)
        return weight.T if getattr(site, "fan_in_fan_out", False) else weight

    def node(self, builder: Any, site: Any) -> fx.Node:
        weight = builder.get(site.weight, "base_weight")
        if getattr(site, "fan_in_fan_out", False):
            weight = builder.call(torch.ops.aten.t.default, weight, role="base_weight_t")
        return weight

    def snapshot(self, gm: fx.GraphModule, site: Any) -> Any:
        return {name: get_tensor(gm, name) for name in (site.weight, site.bias) if name}

    def restore(self, gm: fx.GraphModule, site: Any, state: Any) -> None:
        for name, tensor in state.items():
            set_tensor(gm, name, tensor)

    def write(
        self,
        gm: fx.GraphModule,
        site: Any,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        options: Any,
    ) -> float:
        if getattr(site, "fan_in_fan_out", False):
            weight = weight.T
        _replace(gm, site.weight, weight)
        if bias is not None:
            _replace(gm, site.bias, bias)
        return 1.0

    def compute_dtype(self, gm: fx.GraphModule, site: Any) -> torch.dtype:
        # the stored weight's: an adapter may run the op in another dtype (peft's float32 HRA)
        weight = get_tensor(gm, site.weight)
        if weight.is_floating_point():
            return weight.dtype
        val = site.node.meta.get("val")
        return val.dtype if isinstance(val, torch.Tensor) else torch.float32

    def storage(self, gm: fx.GraphModule, site: Any) -> list[str]:
        return [site.weight]


def _replace(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """Replace (never mutate) a base tensor, keeping its dtype and trainability."""
    old = get_tensor(gm, qualname)
    value = value.to(old.dtype).contiguous()
    set_tensor(
        gm,
        qualname,
        nn.Parameter(value, requires_grad=old.requires_grad)
        if isinstance(old, nn.Parameter)
        else value,
    )


class WeightNormFormat(DenseFormat):
    """A weight stored as direction v and magnitude g (`nn.utils.parametrizations.weight_norm`,
    read through `aten._weight_norm(v, g, dim)`); `site.weight` names v. A folded weight W' is
    stored as v = W', g = ||W'|| (over every dim but `dim`), which computes W' again exactly."""

    name = "weight_norm"

    def read(self, gm: fx.GraphModule, site: Any) -> torch.Tensor:
        magnitude, dim = weight_norm_of(gm, site.weight)
        return torch._weight_norm(get_tensor(gm, site.weight), get_tensor(gm, magnitude), dim)

    def node(self, builder: Any, site: Any) -> fx.Node:
        magnitude, dim = weight_norm_of(builder.gm, site.weight)
        v, g = builder.get(site.weight, "base_v"), builder.get(magnitude, "base_g")
        return builder.call(torch.ops.aten._weight_norm.default, v, g, dim, role="base_weight")

    def snapshot(self, gm: fx.GraphModule, site: Any) -> Any:
        magnitude, _ = weight_norm_of(gm, site.weight)
        return {**super().snapshot(gm, site), magnitude: get_tensor(gm, magnitude)}

    def write(
        self,
        gm: fx.GraphModule,
        site: Any,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        options: Any,
    ) -> float:
        magnitude, dim = weight_norm_of(gm, site.weight)
        _replace(gm, magnitude, torch.norm_except_dim(weight, 2, dim))
        return super().write(gm, site, weight, bias, options)

    def storage(self, gm: fx.GraphModule, site: Any) -> list[str]:
        return [site.weight, weight_norm_of(gm, site.weight)[0]]


def weight_norm_of(gm: fx.GraphModule, direction: str) -> tuple[str, int]:
    """The magnitude g and the dim of the `_weight_norm` that reads direction `direction`."""
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten._weight_norm.default):
        v, g, dim = node.args
        if getattr(v, "target", None) == direction and getattr(g, "op", None) == "get_attr":
            return str(g.target), dim
    raise PassError(f"no weight norm in the graph reads {direction!r}")


_FORMATS: dict[str, WeightFormat] = {"dense": DenseFormat(), "weight_norm": WeightNormFormat()}
_OPS: dict[Any, str] = {}


def register_format(fmt: WeightFormat, ops: tuple[Any, ...] = ()) -> WeightFormat:
    """Register a storage format and the ops that compute through it (each becomes a site)."""
    _FORMATS[fmt.name] = fmt
    _OPS.update({op: fmt.name for op in ops})
    return fmt


def round_trip(name: str, weight: torch.Tensor, **options: Any) -> torch.Tensor:
    """`weight` stored in format `name` and read back (what quantizing costs it; LoftQ's init)."""
    fmt = _FORMATS.get(name)
    if fmt is None or not hasattr(fmt, "round_trip"):
        raise PassError(f"no registered weight format {name!r} quantizes a tensor (import peftc)")
    return fmt.round_trip(weight, **options)


def format_of(site: Any) -> WeightFormat:
    try:
        return _FORMATS[site.storage]
    except KeyError:
        raise PassError(
            f"{site.path!r} stores its weight as {site.storage!r}, which no weight format handles"
        ) from None


def format_of_node(node: fx.Node) -> WeightFormat | None:
    name = _OPS.get(node.target)
    return _FORMATS[name] if name else None


def read_weight(gm: fx.GraphModule, site: Any) -> torch.Tensor:
    """The site's weight as float in the op's layout (a dequantized copy for quantized storage)."""
    return format_of(site).read(gm, site)
