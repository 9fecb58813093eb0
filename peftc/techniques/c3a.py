"""C3A: a block-circulant update beside linear sites, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + C x / in,   C: (out/bs x in/bs) blocks, each bs x bs circulant

1. `c3a_kernel.<adapter>` (out/bs, in/bs, bs) holds one row per block: C_ij[r, c] =
   k_ij[(c - r) mod bs], the matrix of peft's BlockCircularConvolution
   `Re(fft(sum_j ifft(x_j) ⊙ fft(k_ij)))`. peftc builds C densely from the kernel and multiplies:
   fake-tensor shape propagation cannot run FFTs over the graph's symbolic batch sizes. It is the
   same product to float rounding, at the cost of a dense matmul where peft's FFTs are cheaper.
   Always in float32 (x and the kernel cast to it), the term cast to the layer's dtype before it
   is added, as peft.
2. Gradients are peft's. Its custom backward gives the kernel the true gradient but x the
   gradient of the output mirrored within each block (g[t] -> g[-t mod bs]), so adapters upstream
   of a C3A site train on that. With P that mirror, peftc computes z = (P C) x through a weight
   differentiated as C (the kernel's gradient), and returns P z = C x differentiated as z (x's
   gradient (P C)^T g, peft's); `a.detach() + (b - b.detach())` is a's value with b's gradient.
3. `block_size` divides in and out features at every site; `block_size_pattern` sets it per site
   (a key k applies to a path ending in `.k`, as a regex, or equal to k; the first match wins).
4. `init_weights`: xavier_uniform (peft's default, and what false means), kaiming_uniform,
   gaussian (N(0, 1)), or true: zeros, so the model starts unchanged.
5. Merging adds C / in to W (cast to the layer's dtype before the division, as peft).
Linear sites only (nn.Linear, NF4): GPT-2's Conv1D and nn.MultiheadAttention are refused, as peft
refuses them; `bias` other than "none" is refused. With several adapters active at one site peft
feeds each the previous one's term (its forward reuses x); peftc adds each adapter's term from the
layer's own input.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    positive,
    register_technique,
)
from peftc.techniques.fourierft import positive_pairs
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["C3aOptions", "C3a"]

aten = torch.ops.aten


@dataclass(frozen=True)
class C3aOptions(AdapterOptions):
    block_size: int = option(
        256,
        doc="size of the circulant blocks; must divide every site's in and out features",
        check=positive,
        peft="block_size",
    )
    block_size_pattern: tuple[tuple[str, int], ...] = option(
        (),
        doc="[name, block_size] pairs: block_size for the sites whose path ends in name",
        check=positive_pairs('[["v_proj", 32]]'),
        peft="block_size_pattern",
        encode=dict,
        decode=lambda d: tuple((d or {}).items()),
    )
    init_weights: bool | Literal["gaussian", "kaiming_uniform", "xavier_uniform"] = option(
        "xavier_uniform",
        doc="the kernel's init: xavier_uniform (false too), kaiming_uniform, gaussian; true: zeros",
        peft="init_weights",
    )

    def block_size_at(self, path: str) -> int:
        """peft's rule: the first pattern key k with `re.match(rf".*\\.{k}$", path)`, else the path
        itself."""
        pattern = dict(self.block_size_pattern)
        key = next((k for k in pattern if re.match(rf".*\.{k}$", path)), path)
        return pattern.get(key, self.block_size)


def _init(options: C3aOptions, site: Any) -> Any:
    """peft's reset_c3a_parameters, with its bounds from the layer's features."""
    if options.init_weights is True:
        return None
    if options.init_weights == "gaussian":
        return nn.init.normal_
    if options.init_weights == "kaiming_uniform":
        bound = math.sqrt(1.0 / float(site.in_features))
    else:
        std = math.sqrt(2.0 / float(site.in_features + site.out_features))
        bound = math.sqrt(3.0) * std
    return lambda t: nn.init.uniform_(t, -bound, bound)


def _kernel_shape(site: Any, size: int) -> tuple[int, int, int]:
    return site.out_features // size, site.in_features // size, size


def _circulants(call: Any, kernel: Any, shape: tuple[int, int, int]) -> tuple[Any, Any]:
    """(C, P C), both (out, in): block (i, j) of C has rows `k_ij` rotated right (C_ij[r, c] =
    k_ij[(c - r) mod bs]); P C has them reversed within each block (r -> -r mod bs), the rows
    rotated left. `call` is `Builder.call` in the graph, `eager` for merging."""
    m, n, size = shape
    doubled = call(aten.cat.default, [kernel, kernel], -1, role="kernel_twice")
    # windows[..., s, c] = k[(s + c) mod bs]
    windows = call(aten.unfold.default, doubled, -1, size, 1, role="kernel_windows")
    later = call(aten.slice.Tensor, windows, -2, 1, size + 1, role="later_windows")
    direct = call(aten.flip.default, later, [-2], role="circulant_blocks")
    mirrored = call(aten.slice.Tensor, windows, -2, 0, size, role="mirrored_blocks")
    return tuple(
        call(
            aten.reshape.default,
            call(aten.permute.default, blocks, [0, 2, 1, 3], role="block_rows"),
            [m * size, n * size],
            role="circulant",
        )
        for blocks in (direct, mirrored)
    )


def _mirror(b: Builder, y: fx.Node, blocks: int, size: int) -> fx.Node:
    """P y: y's last dim reversed within each block of `size` (t -> -t mod size)."""
    y = b.call(aten.unflatten.int, y, -1, [blocks, size], role="out_blocks")
    first = b.call(aten.slice.Tensor, y, -1, 0, 1, role="block_first")
    rest = b.call(aten.slice.Tensor, y, -1, 1, size, role="block_rest")
    reversed_rest = b.call(aten.flip.default, rest, [-1], role="block_rest_reversed")
    y = b.call(aten.cat.default, [first, reversed_rest], -1, role="out_mirrored")
    return b.call(aten.flatten.using_ints, y, -2, -1, role="out_mirrored_flat")


def _value_with_gradient_of(b: Builder, value: fx.Node, source: fx.Node, role: str) -> fx.Node:
    """`value` exactly, differentiated as `source`: value.detach() + (source - source.detach())."""
    zero = b.call(
        aten.sub.Tensor,
        source,
        b.call(aten.detach.default, source, role=f"{role}_source_detached"),
        role=f"{role}_zero",
    )
    detached = b.call(aten.detach.default, value, role=f"{role}_value_detached")
    return b.call(aten.add.Tensor, detached, zero, role=role)


def _convolve(b: Builder, x: fx.Node, kernel: fx.Node) -> fx.Node:
    """C x with peft's gradients (case 2): z = (P C) x through a weight differentiated as C, then
    P z (= C x) differentiated as z."""
    shape = _kernel_shape(b.site, b.options.block_size)
    direct, mirrored = _circulants(b.call, kernel, shape)
    weight = _value_with_gradient_of(b, mirrored, direct, "mirrored_weight")
    z = b.call(aten.linear.default, x, weight, role="mirrored_out")
    return _value_with_gradient_of(b, _mirror(b, z, shape[0], shape[2]), z, "circulant_out")


@register_technique
class C3a(Technique):
    """Insert C3A branches: `y = W x + b -> y = W x + b + C x / in`, C block-circulant, its blocks'
    rows trained."""

    name = "c3a"
    half_precision = "float32"
    options = C3aOptions
    peft_type = "C3A"
    peft_fixed = {"bias": "none"}
    preserves_outputs = False  # peft's default init is a random kernel

    def options_at(self, site: Any, options: C3aOptions) -> C3aOptions:
        size = options.block_size_at(self.peft_key(site))
        return dataclasses.replace(options, block_size=size)

    def check(self, gm: fx.GraphModule, site: Any, options: C3aOptions) -> None:
        if getattr(site, "fan_in_fan_out", False) or multihead_attention(site):
            raise OptionError(
                f"c3a: peft adapts nn.Linear layers only, not {site.path!r} (GPT-2's Conv1D or "
                "nn.MultiheadAttention); exclude it from targets"
            )
        size = options.block_size
        features = {"in_features": site.in_features, "out_features": site.out_features}
        bad = [f"{name}={n}" for name, n in features.items() if n % size]
        if bad:
            raise OptionError(
                f"c3a: block_size={size} does not divide {' and '.join(bad)} of {site.path!r}; "
                "choose a common divisor of the targets' sizes (or set this site's in "
                "block_size_pattern)"
            )

    def params(self, ctx: Context) -> list[Param]:
        shape = _kernel_shape(ctx.site, ctx.options.block_size)
        return [Param("c3a_kernel", shape, init=_init(ctx.options, ctx.site))]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, ctx = b.site, b.ctx
        kernel = b.param("c3a_kernel")
        if ctx.dtype != torch.float32:  # peft computes in float32 whatever the kernel's dtype
            x = b.call(aten._to_copy.default, x, dtype=torch.float32, role="input_float")
            kernel = b.call(aten._to_copy.default, kernel, dtype=torch.float32, role="kernel_float")
        term = b.call(aten.div.Tensor, _convolve(b, x, kernel), site.in_features, role="c3a_out")
        if ctx.base_dtype != torch.float32:  # peft adds the term in the layer's dtype
            term = b.call(aten._to_copy.default, term, dtype=ctx.base_dtype, role="term_cast")
        return term

    def delta(self, ctx: Context) -> torch.Tensor:
        site, kernel = ctx.site, ctx.tensor("c3a_kernel").float()
        circulant, _ = _circulants(eager, kernel, _kernel_shape(site, ctx.options.block_size))
        return circulant.to(ctx.base_dtype) / site.in_features  # peft casts, then divides

    def describe(self, options: C3aOptions, sites: list[Any]) -> str:
        return (
            f"C3A block_size={options.block_size} on {len(sites)} sites, adapter "
            f"{options.adapter!r}"
        )
