"""OFT: a block-diagonal orthogonal rotation of a site's input, as in HF peft 0.21.

    y = W x + b        ->  y = W (x R) + b      (linear, also NF4; R = block_diag(R_1, ..., R_r))
    y = conv(x)        ->  y = conv(fold(unfold(x) R))  (2-d convolution, peft's patch rotation)
    e = E[ids]         ->  e = E[ids] R                (embedding: the output is rotated)

1. Each block R_i = cayley(Q_i) of a skew-symmetric Q_i whose upper triangle (row-major) is row i
   of `oft_R.<adapter>.weight` (r, bs (bs - 1) / 2). With `use_cayley_neumann` (peft's default)
   cayley(Q) = I + 2Q + 2Q^2 + ... + Q^(n-1) with n = `num_cayley_neumann_terms`; without it the
   exact (I - Q)(I + Q)^-1.
2. Exactly one of `r` (blocks) and `block_size` (peft's `oft_block_size`) is nonzero; one that does
   not divide the rotated dimension is moved to the nearest divisor, as peft does.
   `block_share=true` uses one block for the whole dimension.
3. Convolutions rotate every k x k patch of the input and add the patches back where they came
   from (peft's unfold/fold): for k > 1 that is not a rotation of W, and peft's merge (which
   rotates W) computes something else, so such sites refuse to merge; 1 x 1 convolutions merge.
4. Merging folds R into W: W' = (R W^T)^T (linear, 1x1 conv), E' = E R (embedding).
5. `coft` (constrained OFT) projects each block's Q into the ball of radius eps / sqrt(blocks)
   before every forward pass and merge, writing the projection into the parameter outside
   autograd, as peft does (so the optimiser's next step starts from it).
The weights start at zero (R = I, `init_weights=false`: N(0, 0.1)). `bias` other than "none",
GPT-2's Conv1D and dilated or non-square convolutions are refused. peft 0.21 never applies
`module_dropout`, so neither does peftc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    NotMergeable,
    Param,
    Stage,
    Technique,
    non_negative,
    option,
    positive,
    register_technique,
)

__all__ = ["OftOptions", "Oft", "conv2d_problem"]

aten = torch.ops.aten


@dataclass(frozen=True)
class OftOptions(AdapterOptions):
    r: int = option(
        0,
        doc="number of diagonal blocks (give it or block_size, the other 0)",
        check=non_negative,
        peft="r",
    )
    block_size: int = option(
        32,
        doc="size of each diagonal block (give it or r, the other 0)",
        check=non_negative,
        peft="oft_block_size",
    )
    block_share: bool = option(False, doc="one rotation shared by all blocks", peft="block_share")
    use_cayley_neumann: bool = option(
        True,
        doc="approximate the Cayley transform's inverse by a Neumann series",
        peft="use_cayley_neumann",
    )
    num_cayley_neumann_terms: int = option(
        5, doc="terms of that series", check=positive, peft="num_cayley_neumann_terms"
    )
    init_weights: bool = option(
        True, doc="start at the identity rotation (false: random)", peft="init_weights"
    )
    coft: bool = option(
        False, doc="constrained OFT: keep each block within eps of the identity", peft="coft"
    )
    eps: float = option(6e-5, doc="COFT's radius (scaled by 1/sqrt(blocks))", peft="eps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 0 or self.block_size < 0 or (self.r != 0) == (self.block_size != 0):
            raise OptionError(
                f"oft: give exactly one of r (blocks) and block_size, the other 0; got r={self.r}, "
                f"block_size={self.block_size}"
            )


def _adjust(n: int, p: int) -> int:
    """peft's `adjust_oft_parameters`: the divisor of n nearest to p (the lower one on a tie)."""
    if p >= n:
        return n
    higher = p
    while higher <= n and n % higher:
        higher += 1
    lower = p
    while lower > 1 and n % lower:
        lower -= 1
    return lower if p - lower <= higher - p else higher


def conv2d_problem(site: Any) -> str | None:
    """Why peft's OFT/BOFT/HRA conv layers would not compute this convolution as it is, or None.

    peft handles only `nn.Conv2d`, reads `kernel_size[0]` for both kernel sides and passes
    `padding[0]` and `stride[0]` for both dimensions, without dilation.
    """
    if site.dims != 2:
        return f"a {site.dims}-d convolution (peft supports only 2-d ones here)"
    if site.kernel_size[0] != site.kernel_size[1]:
        return f"a non-square kernel {site.kernel_size}"
    if any(d != 1 for d in site.dilation):
        return "a dilated convolution"
    if (
        isinstance(site.padding, str)
        or site.padding[0] != site.padding[1]
        or site.stride[0] != site.stride[1]
    ):
        return (
            f"padding {site.padding!r} and stride {site.stride} that differ between height and "
            "width"
        )
    return None


def check_weight_rotation_site(method: str, site: Any) -> None:
    """BOFT's and HRA's shared refusals: GPT-2's Conv1D, grouped convolutions, convolutions peft
    misreads."""
    if getattr(site, "fan_in_fan_out", False):
        raise OptionError(
            f"{method}: {site.path!r} is a GPT-2 Conv1D, which peft's {method.upper()} does not "
            "support; exclude it from targets"
        )
    if site.kind == "conv":
        problem = "a grouped convolution" if site.groups > 1 else conv2d_problem(site)
        if problem:
            raise OptionError(
                f"{method}: {site.path!r} is {problem}, which peft's {method.upper()} does not "
                "support; exclude it from targets"
            )


def rotated_dim(site: Any) -> int:
    if site.kind == "conv":
        return site.in_channels * site.kernel_size[0] * site.kernel_size[0]
    return site.embedding_dim if site.kind == "embedding" else site.in_features


def blocks(site: Any, o: OftOptions) -> tuple[int, int]:
    """(r, block size) at this site, adjusted as peft adjusts them."""
    n = rotated_dim(site)
    if o.block_size:
        bs = (
            o.block_size
            if n % o.block_size == 0 and o.block_size <= n
            else _adjust(n, o.block_size)
        )
        return n // bs, bs
    r = o.r if n % o.r == 0 and o.r <= n else _adjust(n, o.r)
    return r, n // r


def _attr(site: Any) -> str:
    return "oft_embedding_R" if site.kind == "embedding" else "oft_R"


def coft_project_(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """peft's COFT projection of the (count, bs (bs - 1) / 2) block parameters, written into them
    outside autograd; returns them. The skew matrix's Frobenius norm is sqrt(2) |row|."""
    with torch.no_grad():
        norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True) * math.sqrt(2)
        bound = eps / math.sqrt(weight.shape[0])
        weight.copy_(torch.where(norm <= bound, weight, bound * (weight / norm)))
    return weight


def eager(op: Any, *args: Any, role: str, **kwargs: Any) -> Any:
    """`Builder.call`'s signature, computing at once: one function builds the graph and merges."""
    return op(*args, **kwargs)


def cayley(call: Any, weight: Any, count: int, bs: int, o: OftOptions) -> Any:
    """The (count, bs, bs) rotations from their parameters, in peft's order of operations
    (`call` is `Builder.call` in the graph, `eager` for merging)."""
    ones = call(aten.new_ones.default, weight, [bs, bs], role="ones")
    mask = call(
        aten.ne.Scalar, call(aten.triu.default, ones, 1, role="upper_ones"), 0, role="upper_mask"
    )
    zeros = call(aten.new_zeros.default, weight, [count, bs, bs], role="zeros")
    # row-major, as triu_indices
    upper = call(aten.masked_scatter.default, zeros, mask, weight, role="upper")
    Q = call(
        aten.sub.Tensor, upper, call(aten.transpose.int, upper, -2, -1, role="upper_t"), role="skew"
    )
    eye = call(
        aten.diag_embed.default,
        call(aten.new_ones.default, weight, [bs], role="diag_ones"),
        role="eye",
    )
    eye = call(aten.expand.default, eye, [count, bs, bs], role="eyes")
    if not o.use_cayley_neumann:
        return call(
            aten.linalg_solve.default,
            call(aten.add.Tensor, eye, Q, role="i_plus_q"),
            call(aten.sub.Tensor, eye, Q, role="i_minus_q"),
            left=False,
            role="cayley",
        )
    R, n = eye, o.num_cayley_neumann_terms
    if n > 1:
        R = call(aten.add.Tensor, R, Q, alpha=2.0, role="neumann")
    if n > 2:
        power = call(aten.bmm.default, Q, Q, role="q_power")
        R = call(aten.add.Tensor, R, power, alpha=2.0, role="neumann")
        for _ in range(3, n - 1):
            power = call(aten.bmm.default, power, Q, role="q_power")
            R = call(aten.add.Tensor, R, power, alpha=2.0, role="neumann")
        R = call(
            aten.add.Tensor, R, call(aten.bmm.default, power, Q, role="q_power"), role="neumann"
        )
    return R


def _one_patch(site: Any) -> bool:
    """Whether the convolution's input is one patch (its spatial size is the kernel's, its output
    1 x 1): the rotated patch then folds back unchanged, and rotating the weight is exact."""
    source, out = site.node.args[0].meta.get("val"), site.node.meta.get("val")
    if source is None or out is None:
        return False
    spatial = [*source.shape[2:], *out.shape[2:]]
    if not all(is_concrete_int(d) for d in spatial):
        return False
    return list(source.shape[2:]) == list(site.kernel_size) and all(d == 1 for d in out.shape[2:])


@register_technique
class Oft(Technique):
    """Insert OFT: rotate the input of the selected linear and 2-d convolution sites (the output of
    embeddings) by a block-diagonal orthogonal matrix, `y = W x + b -> y = W (x R) + b`."""

    name = "oft"
    half_precision = "float32"
    options = OftOptions
    peft_type = "OFT"
    peft_fixed = {
        "module_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
    }
    # peft 0.21 never calls module_dropout
    peft_ignored = ("module_dropout",)
    site_kinds = ("linear", "conv", "embedding")

    def stage_at(self, site: Any, options: OftOptions) -> Stage:
        return "output" if site.kind == "embedding" else "input"

    def check(self, gm: fx.GraphModule, site: Any, options: OftOptions) -> None:
        if getattr(site, "fan_in_fan_out", False):
            raise OptionError(
                f"oft: {site.path!r} is a GPT-2 Conv1D, which peft's OFT does not support; exclude "
                "it from targets"
            )
        if site.kind == "conv" and (problem := conv2d_problem(site)):
            raise OptionError(
                f"oft: {site.path!r} is {problem}, which peft's OFT does not support; exclude it "
                "from targets"
            )

    def params(self, ctx: Context) -> list[Param]:
        o = ctx.options
        r, bs = blocks(ctx.site, o)
        init = None if o.init_weights else (lambda t: nn.init.normal_(t, mean=0.0, std=0.1))
        return [
            Param(
                _attr(ctx.site),
                (1 if o.block_share else r, bs * (bs - 1) // 2),
                init=init,
                suffix="weight",
            )
        ]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        if not b.ctx.upcast:
            return self._rotated(b, x)
        # peft rotates x in the float32 of its blocks, then casts it back for the base layer
        rotated = self._rotated(b, b.as_adapter(x, "input_upcast"))
        return b.call(aten._to_copy.default, rotated, dtype=b.ctx.base_dtype, role="downcast")

    def _rotated(self, b: Builder, x: fx.Node) -> fx.Node:
        site, o = b.site, b.options
        r, bs = blocks(site, o)
        weight = b.param(_attr(site))
        if o.coft:
            weight = b.call(coft_project_, weight, o.eps, role="coft")
        R = cayley(b.call, weight, 1 if o.block_share else r, bs, o)
        if o.block_share:
            R = b.call(aten.repeat.default, R, [r, 1, 1], role="shared_blocks")
        if site.kind != "conv":
            return self._rotate(b, x, R, r, bs)
        # peft's patch rotation: unfold k x k patches (stride 1, no padding), rotate, fold (a sum)
        k = site.kernel_size[0]
        patches = b.call(
            aten.unfold.default,
            b.call(aten.unfold.default, x, 2, k, 1, role="unfold_h"),
            3,
            k,
            1,
            role="unfold_w",
        )
        # (B, Ho, Wo, C, k, k)
        patches = b.call(aten.permute.default, patches, [0, 2, 3, 1, 4, 5], role="patches")
        rotated = self._rotate(
            b, b.call(aten.flatten.using_ints, patches, 3, 5, role="patch_vectors"), R, r, bs
        )
        rotated = b.call(
            aten.unflatten.int, rotated, -1, [site.in_channels, k, k], role="rotated_patches"
        )
        rotated = b.call(aten.permute.default, rotated, [0, 3, 1, 2, 4, 5], role="channels_first")
        # peft reshapes the (C, Ho, Wo, k, k) layout straight to (C k k, Ho Wo), as this does.
        columns = b.call(
            aten.unflatten.int,
            b.call(aten.flatten.using_ints, rotated, 1, 5, role="flat"),
            1,
            [site.in_channels * k * k, -1],
            role="columns",
        )
        size = [b.call(aten.sym_size.int, x, d, role=f"input_size_{d}") for d in (2, 3)]
        return b.call(
            aten.col2im.default, columns, size, [k, k], [1, 1], [0, 0], [1, 1], role="fold"
        )

    def _rotate(self, b: Builder, x: fx.Node, R: fx.Node, r: int, bs: int) -> fx.Node:
        split = b.call(aten.unflatten.int, x, -1, [r, bs], role="x_blocks")
        rotated = b.call(aten.einsum.default, "...rk,rkc->...rc", [split, R], role="rotated")
        return b.call(aten.flatten.using_ints, rotated, -2, -1, role="x_rotated")

    def _matrix(self, ctx: Context) -> torch.Tensor:
        r, bs = blocks(ctx.site, ctx.options)
        o = ctx.options
        weight = ctx.tensor(_attr(ctx.site)).float()
        weight = coft_project_(weight.clone(), o.eps) if o.coft else weight
        R = cayley(eager, weight, 1 if o.block_share else r, bs, o)
        return torch.block_diag(*(R.expand(r, bs, bs) if o.block_share else R))

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        site = ctx.site
        if site.kind == "embedding":
            return weight @ self._matrix(ctx), bias
        if site.kind == "conv" and site.groups > 1:
            raise NotMergeable(
                f"oft: {site.path!r} is a grouped convolution, which peft cannot merge either; "
                "keep it unmerged"
            )
        if site.kind == "conv" and site.kernel_size[0] > 1 and not _one_patch(site):
            raise NotMergeable(
                f"oft: {site.path!r} has a {site.kernel_size} kernel: peft's OFT rotates input "
                "patches there, which no rotation of the weight reproduces (peft's own merge "
                "changes the outputs); keep the adapter unmerged"
            )
        flat = weight.reshape(weight.shape[0], -1)
        return (self._matrix(ctx) @ flat.T).T.reshape(weight.shape), bias

    def from_peft(self, config: dict[str, Any]) -> dict[str, Any]:
        if "oft_block_size" not in config:
            raise OptionError(
                "the config has no oft_block_size: it was saved by peft < 0.14, whose OFT differs; "
                "retrain it with a current peft"
            )
        return {}

    def describe(self, options: OftOptions, sites: list[Any]) -> str:
        sizes = sorted({blocks(s, options)[1] for s in sites})
        return (
            f"OFT block size {'/'.join(map(str, sizes))} on {len(sites)} sites, adapter "
            f"{options.adapter!r}"
        )
