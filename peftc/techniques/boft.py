"""BOFT: a butterfly of block-diagonal orthogonal rotations of the weight, as in HF peft 0.21.

    y = W x + b   ->  y = ((W Rot^T) ⊙ s) x + b              (linear, also NF4; s scales rows)
    y = conv(x)   ->  y = conv(x, ((W_flat Rot^T) ⊙ s)_view)  (2-d conv; W_flat (out, in k k))

1. Rot = M_{N-1} ... M_1 M_0 over the input dimension n, M_i = P_i Bd_i P_i^T: Bd_i the block
   diagonal of cayley(R_i,j) = (I - S)(I + S)^-1, S = (R - R^T) / 2, for the D blocks (b x b) of
   factor i of `boft_R.<adapter>` (N, D, b, b); P_i is peft's butterfly permutation, which
   interleaves chunks of b/2 within groups of 2^(i+1) b / 2 (identity when N = 1).
2. Exactly one of `block_size` (b) and `block_num` (D) is nonzero and must divide n; with N > 1
   D and b are even and n is a multiple of b 2^(N-1), as peft requires.
3. `dropout` is peft's multiplicative block dropout: in training, int(p D) random blocks of one
   random factor become I (the same random draws as peft, so the same seed gives the same steps).
4. Merging: W' = (W Rot^T) ⊙ s; the bias is unchanged.
5. Over a float16/bfloat16 base (with `autocast_adapter_dtype`, peft's default) the tensors are
   float32 and the computation is peft's: the blocks cast to the base's dtype before their
   products; a linear's x rotated in that dtype, the op as captured, then ((y - b) s + b) in
   float32 cast back (the `output` stage, rewriting the op's input); a convolution's weight rotated
   in that dtype, scaled in float32, and the op in float32.
N = `n_butterfly_factor` is the real butterfly, what peft computes with its fbd CUDA extension.
Without that extension (any CPU-only machine) peft silently uses N = 1 whatever the config says,
so there only N = 1 matches peft: a checkpoint peft saved there with N > 1 in its config holds
N = 1 tensors, and loads as what it is, N = 1 (`from_shapes`). `boft_R` starts at zero and
`boft_s` at one (`init_weights=false`: N(0, 0.1) and N(1, 0.1)). GPT-2's Conv1D, grouped,
dilated or non-square convolutions and `bias` other than "none" are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.sites.formats import format_of
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Stage,
    Technique,
    non_negative,
    option,
    positive,
    probability,
    register_technique,
)
from peftc.techniques.oft import check_weight_rotation_site, eager, rotated_dim

__all__ = ["BoftOptions", "Boft", "MultiplicativeDropout"]

aten = torch.ops.aten


@dataclass(frozen=True)
class BoftOptions(AdapterOptions):
    block_size: int = option(
        4,
        doc="size of each block (give it or block_num, the other 0)",
        check=non_negative,
        peft="boft_block_size",
    )
    block_num: int = option(
        0,
        doc="number of blocks (give it or block_size, the other 0)",
        check=non_negative,
        peft="boft_block_num",
    )
    n_butterfly_factor: int = option(
        1,
        doc="butterfly factors multiplied into the rotation",
        check=positive,
        peft="boft_n_butterfly_factor",
    )
    dropout: float = option(
        0.0,
        doc="multiplicative dropout of whole blocks (training only)",
        check=probability,
        peft="boft_dropout",
    )
    init_weights: bool = option(
        True, doc="start at the identity rotation (false: random)", peft="init_weights"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.block_size != 0) == (self.block_num != 0):
            raise OptionError(
                "boft: give exactly one of block_size and block_num, the other 0; got block_size="
                f"{self.block_size}, block_num={self.block_num}"
            )


class MultiplicativeDropout(nn.Module):
    """peft's BOFT `MultiplicativeDropoutLayer`: in training, `int(p * D)` random blocks of one
    random butterfly factor become the identity (same random draws, in the same order, as peft)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        N, D, H, _ = x.shape
        # peft takes .item(); a tensor index picks the same factor
        n_random = torch.randint(0, N, (1,))
        replace = int(self.p * D)
        mask = torch.cat(
            [torch.ones(replace, device=x.device), torch.zeros(D - replace, device=x.device)]
        )
        mask = mask[torch.randperm(D)].view(1, D, 1, 1)
        full_mask = torch.zeros(N, D, 1, 1, device=x.device)
        full_mask[n_random] = mask
        eye = torch.eye(H, device=x.device).repeat(N, D, 1, 1)
        return (1 - full_mask) * x + full_mask * eye


def shape(site: Any, o: BoftOptions) -> tuple[int, int, int]:
    """(N, D, b) at this site; raises `OptionError` where peft raises."""
    n, f = rotated_dim(site), o.n_butterfly_factor - 1
    where = f"boft: {site.path!r} (rotated dimension {n})"
    if o.block_num:
        D = o.block_num
        if n % D:
            raise OptionError(f"{where} is not divisible by block_num={D}; choose a divisor")
        if f and (f > int(math.log2(D)) or D % 2**f):
            raise OptionError(
                f"{where}: block_num={D} must be a multiple of 2^(n_butterfly_factor - 1) = {2**f}"
            )
        b = n // D
    else:
        b = o.block_size
        if n % b:
            raise OptionError(f"{where} is not divisible by block_size={b}; choose a divisor")
        if f and n % (b * 2**f):
            raise OptionError(
                f"{where} is not a multiple of block_size * 2^(n_butterfly_factor - 1) = {b * 2**f}"
            )
        D = n // b
    if f and (D % 2 or b % 2):
        raise OptionError(
            f"{where}: with n_butterfly_factor > 1 the block number ({D}) and size ({b}) must be "
            "even"
        )
    return f + 1, D, b


def butterfly(
    call: Any, R: Any, N: int, D: int, b: int, dropout: Any = None, dtype: Any = None
) -> Any:
    """Rot (n x n) from `boft_R` (N, D, b, b), in peft's order of operations (`call`: see
    `peftc.techniques.oft.cayley`); the blocks cast to `dtype` before their products, as peft
    casts them to the input's."""
    n = D * b
    Q = _cayley_blocks(call, R, N, D, b)
    if dropout is not None:
        Q = dropout(Q)
    if dtype is not None:
        Q = call(aten._to_copy.default, Q, dtype=dtype, role="blocks_downcast")
    # block diagonals, diag_embed over the block index: Bd[i, (d, j), (e, k)] = Q[i, d, j, k] [d=e]
    spread = call(  # (N, b, b, D, D)
        aten.diag_embed.default,
        call(aten.permute.default, Q, [0, 2, 3, 1], role="blocks_last"),
        role="spread",
    )
    Bd = call(
        aten.reshape.default,
        call(aten.permute.default, spread, [0, 3, 1, 4, 2], role="block_diag_order"),
        [N, n, n],
        role="block_diag",
    )
    rot = None
    for i in range(N):
        M = call(aten.select.int, Bd, 0, i, role="factor")
        h = 2**i
        if N > 1 and h > 1:
            # P M P^T with peft's permutation (chunk (g, a, c) of size b/2 moves to (g, c, a))
            g, r = D // h, b // 2
            M = call(aten.view.default, M, [g, h, 2, r, g, h, 2, r], role="factor_chunks")
            M = call(aten.permute.default, M, [0, 2, 1, 3, 4, 6, 5, 7], role="butterfly_permuted")
            M = call(aten.reshape.default, M, [n, n], role="butterfly_factor")
        rot = M if rot is None else call(aten.mm.default, M, rot, role="butterfly")
    return rot


def _cayley_blocks(call: Any, R: Any, N: int, D: int, b: int) -> Any:
    """Q = (I + S)^-1 (I - S) per block, S the skew part of R: (N, D, b, b) orthogonal blocks."""
    blocks = call(aten.view.default, R, [N * D, b, b], role="blocks")
    transposed = call(aten.transpose.int, blocks, 1, 2, role="blocks_t")
    skew = call(
        aten.mul.Tensor,
        call(aten.sub.Tensor, blocks, transposed, role="diff"),
        0.5,
        role="skew",
    )
    eye = call(
        aten.diag_embed.default,
        call(aten.new_ones.default, blocks, [N * D, b], role="diag_ones"),
        role="eye",
    )
    Q = call(
        aten.linalg_solve.default,
        call(aten.add.Tensor, eye, skew, role="i_plus_s"),
        call(aten.sub.Tensor, eye, skew, role="i_minus_s"),
        left=False,
        role="cayley",
    )
    return call(aten.view.default, Q, [N, D, b, b], role="factors")


def weight_shape(site: Any) -> list[int]:
    if site.kind == "conv":
        return [site.out_channels, site.in_channels // site.groups, *site.kernel_size]
    return [site.out_features, site.in_features]


@register_technique
class Boft(Technique):
    """Insert BOFT: rotate and scale the weight of the selected linear and 2-d convolution sites,
    `W -> (W Rot^T) ⊙ s` with Rot a butterfly of block-diagonal orthogonal matrices."""

    name = "boft"
    options = BoftOptions
    peft_type = "BOFT"
    peft_fixed = {"bias": "none", "fan_in_fan_out": False}
    site_kinds = ("linear", "conv")
    half_precision = "float32"

    def stage_at(self, site: Any, options: BoftOptions) -> Stage:
        # over a half-precision base peft rotates a linear's x, and scales its output in float32
        return "output" if site.kind == "linear" and _upcast(site, options) else "weight"

    def check(self, gm: fx.GraphModule, site: Any, options: BoftOptions) -> None:
        check_weight_rotation_site("boft", site)
        shape(site, options)

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        N, D, b = shape(site, o)
        out = site.out_channels if site.kind == "conv" else site.out_features
        random = not o.init_weights
        return [
            Param(
                "boft_R",
                (N, D, b, b),
                init=(lambda t: nn.init.normal_(t, 0.0, 0.1)) if random else None,
            ),
            Param(
                "boft_s",
                (1, out) if site.kind == "conv" else (out, 1),
                init=(lambda t: nn.init.normal_(t, 1.0, 0.1)) if random else nn.init.ones_,
            ),
        ]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        return (
            {"boft_dropout": MultiplicativeDropout(ctx.options.dropout)}
            if ctx.options.dropout > 0
            else {}
        )

    def build(self, b: Builder, value: fx.Node) -> fx.Node:
        site, o = b.site, b.options
        N, D, bs = shape(site, o)
        dropout = (lambda Q: b.module("boft_dropout", Q, role="dropout")) if o.dropout > 0 else None
        # over a half-precision base, peft's rotation is a product in the base's dtype
        dtype = b.ctx.base_dtype if b.ctx.upcast else None
        if self.stage_at(site, o) == "output":
            with b.at(b.base.prev):
                rot = butterfly(b.call, b.param("boft_R"), N, D, bs, dropout, dtype)
                rotated = b.call(aten.matmul.default, b.x, rot, role="x_rotated")
            b.rewrite((rotated, *b.base.args[1:]), b.base.kwargs)
            return _scaled_output(b, value)
        rot = butterfly(b.call, b.param("boft_R"), N, D, bs, dropout, dtype)
        s = b.param("boft_s")
        if site.kind == "conv":
            s = b.call(aten.t.default, s, role="scale_column")
        # peft rotates the stored weight, in its dtype, then scales it in float32
        W = format_of(site).node(b, site) if b.ctx.upcast else value
        return self._rotate(b.call, W, weight_shape(site), rot, s)

    @staticmethod
    def _rotate(call: Any, W: Any, size: list[int], rot: Any, s: Any) -> Any:
        """(Rot W_flat^T)^T ⊙ s in the weight's own shape, as peft's merge and conv forward."""
        flat = call(aten.reshape.default, W, [size[0], -1], role="weight_flat")
        rotated = call(
            aten.t.default,
            call(
                aten.mm.default, rot, call(aten.t.default, flat, role="weight_t"), role="rotated_t"
            ),
            role="rotated",
        )
        return call(
            aten.reshape.default,
            call(aten.mul.Tensor, rotated, s, role="scaled"),
            size,
            role="boft_weight",
        )

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        site = ctx.site
        rot = butterfly(eager, ctx.tensor("boft_R").float(), *shape(site, ctx.options))
        s = ctx.tensor("boft_s").float()
        return self._rotate(
            eager, weight, list(weight.shape), rot, s.T if site.kind == "conv" else s
        ), bias

    def from_shapes(
        self, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, Any]:
        factors = {shape[0] for key, shape in shapes.items() if key.endswith(".boft_R")}
        if factors == {1} and config.get("boft_n_butterfly_factor", 1) > 1:
            # saved by peft without its fbd CUDA extension, which then trains with factor 1
            config.pop("boft_n_butterfly_factor")
            return {"n_butterfly_factor": 1}
        return {}

    def describe(self, options: BoftOptions, sites: list[Any]) -> str:
        return (
            f"BOFT with {options.n_butterfly_factor} butterfly factor(s) on {len(sites)} sites, "
            f"adapter {options.adapter!r}"
        )


def _upcast(site: Any, options: BoftOptions) -> bool:
    gm = site.node.graph.owning_module
    half = format_of(site).compute_dtype(gm, site) in (torch.float16, torch.bfloat16)
    return half and options.autocast_adapter_dtype


def _scaled_output(b: Builder, y: fx.Node) -> fx.Node:
    """peft's output over a half-precision base: ((y - bias) * s + bias) in float32, cast back."""
    bias = b.base_bias()
    if bias is not None:
        y = b.call(aten.sub.Tensor, y, bias, role="unbiased")
    s = b.call(aten.squeeze.dim, b.param("boft_s"), -1, role="scale_row")
    y = b.call(aten.mul.Tensor, y, s, role="scaled")
    if bias is not None:
        y = b.call(aten.add.Tensor, y, bias, role="rebiased")
    return b.call(aten._to_copy.default, y, dtype=b.ctx.base_dtype, role="output_downcast")
