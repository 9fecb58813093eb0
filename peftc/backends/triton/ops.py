"""`peftc::triton_linear`: a linear over a dense or NF4 weight with an optional LoRA branch, as
Triton kernels.

    y = x W^T + b + s * xa B^T,    xa = drop(x) A^T    (peft's LoRA on a Linear / bnb Linear4bit)

Forward: one launch for xa (x @ A^T with dropout), one for y (W decoded per tile, the LoRA product
in the epilogue). Saved for backward: x and the rank-r product xa; W is decoded again, tile by tile.
Backward: dxa = s * g B, dx = g W + drop'(dxa A), dA = dxa^T drop(x), dB = s g^T xa, each one launch
of `kernels.matmul_kernel`. The ops are `torch.library.custom_op`s with fake implementations and
autograd, so `torch.export`, `torch.compile` and `peftc.plan` see through them as opaque ops.
(`torch.library.triton_op` would let Inductor trace into the kernels, but under `TRITON_INTERPRET=1`
its fake-tensor tracing launches the interpreter on fake tensors and fails, so the ops here are
opaque.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from peftc.backends.triton import kernels
from peftc.passes.multi_lora import token_ids
from peftc.quant.nf4 import NF4_CODE, STATS_BLOCKSIZE, dynamic_map

__all__ = ["triton_linear", "dequantize", "dropout_mask", "interpreting"]


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when first
    imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.matmul_kernel, InterpretedFunction)


def _tiles(M: int, N: int) -> tuple[int, int, int]:
    """Tile sizes: powers of two, at least 16 (tl.dot's minimum), at most 64 x 64 x 32."""
    return (
        max(16, min(64, triton.next_power_of_2(M))),
        max(16, min(64, triton.next_power_of_2(N))),
        32,
    )


def _launch(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    *,
    nf4: tuple[Tensor, int, int, int] | None = None,
    alpha: float = 1.0,
    bias: Tensor | None = None,
    p: Tensor | None = None,
    q: Tensor | None = None,
    beta: float = 1.0,
    drop: str = "",
    seed: int = 0,
    dropout: float = 0.0,
    x_cols: int = 0,
) -> Tensor:
    """out = alpha * a @ b (+ bias) + beta * p @ q; b is NF4 when `nf4` = (absmax float32,
    blocksize, stride_bk, stride_bn) with `b` its packed bytes. `drop` names where dropout of x
    applies: "a", "b" or "pq"."""
    # long: the launch passes the kernel's 38 arguments one per line
    M, K = a.shape
    N = out.shape[1]
    block_m, block_n, block_k = _tiles(M, N)
    if nf4 is not None:
        absmax, blocksize, stride_bk, stride_bn = nf4
        code = NF4_CODE.to(b.device)
    else:
        absmax, blocksize, code = out, 0, out
        stride_bk, stride_bn = b.stride()
    R = p.shape[1] if p is not None else 0
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    kernels.matmul_kernel[grid](
        a,
        b,
        out,
        bias if bias is not None else out,
        p if p is not None else out,
        q if q is not None else out,
        code,
        absmax,
        M,
        N,
        K,
        R,
        *a.stride(),
        stride_bk,
        stride_bn,
        *out.stride(),
        *(p.stride() if p is not None else (0, 0)),
        *(q.stride() if q is not None else (0, 0)),
        alpha,
        beta,
        blocksize,
        seed,
        dropout,
        x_cols,
        B_NF4=nf4 is not None,
        HAS_BIAS=bias is not None,
        HAS_PQ=p is not None,
        DROP_A=drop == "a" and dropout > 0,
        DROP_B=drop == "b" and dropout > 0,
        DROP_PQ=drop == "pq" and dropout > 0,
        PRECISION=precision,
        UPCAST=interpreting(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=16,
    )
    return out


def _absmax(absmax: Tensor, absmax_scale: Tensor | None, offset: Tensor | None) -> Tensor:
    if absmax_scale is None:
        return absmax
    out = torch.empty(absmax.numel(), dtype=torch.float32, device=absmax.device)
    block = 1024
    kernels.absmax_kernel[(triton.cdiv(absmax.numel(), block),)](
        absmax,
        absmax_scale,
        offset,
        dynamic_map().to(absmax.device),
        out,
        absmax.numel(),
        STATS_BLOCK=STATS_BLOCKSIZE,
        BLOCK=block,
    )
    return out


def dequantize(
    packed: Tensor,
    absmax: Tensor,
    absmax_scale: Tensor | None,
    offset: Tensor | None,
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """The NF4 tensor decoded whole (equal to `peftc.quant.nf4.dequantize_nf4`); the fused linear
    never calls it."""
    n = 1
    for size in shape:
        n *= size
    out = torch.empty(n, dtype=dtype, device=packed.device)
    block = 1024
    kernels.dequantize_kernel[(triton.cdiv(n, block),)](
        packed,
        NF4_CODE.to(packed.device),
        _absmax(absmax, absmax_scale, offset),
        out,
        n,
        blocksize,
        BLOCK=block,
    )
    return out.view(shape)


def dropout_mask(
    rows: int, cols: int, seed: int, dropout: float, device: torch.device | str = "cpu"
) -> Tensor:
    """The kernels' dropout of an x of `rows` x `cols` (0 or 1 / (1 - p) per element), for checking
    against eager."""
    ones = torch.ones(rows, cols, device=device)
    return _launch(
        ones,
        torch.eye(cols, device=device),
        torch.empty_like(ones),
        drop="a",
        seed=seed,
        dropout=dropout,
        x_cols=cols,
    )


def _base(
    x2: Tensor,
    weight: Tensor | None,
    packed: Tensor | None,
    absmax: Tensor | None,
    absmax_scale: Tensor | None,
    offset: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    *,
    transposed: bool,
    **epilogue,
) -> Tensor:
    """x2 @ W^T (transposed) or x2 @ W, W dense or NF4, with `_launch`'s epilogue; allocates the
    output."""
    out = x2.new_empty(x2.shape[0], out_features if transposed else in_features)
    if packed is None:
        return _launch(x2, weight.t() if transposed else weight, out, **epilogue)
    # of element (k, n) in the flat weight
    strides = (1, in_features) if transposed else (in_features, 1)
    return _launch(
        x2,
        packed,
        out,
        nf4=(_absmax(absmax, absmax_scale, offset), blocksize, *strides),
        **epilogue,
    )


@torch.library.custom_op("peftc::triton_linear", mutates_args=())
def triton_linear(
    x: Tensor,
    weight: Optional[Tensor],
    packed: Optional[Tensor],
    absmax: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    offset: Optional[Tensor],
    bias: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    scale: float,
    dropout: float,
    seed: int,
    out_features: int,
    in_features: int,
    blocksize: int,
) -> tuple[Tensor, Tensor]:
    """(y, xa): the output and the LoRA rank-r product kept for backward (empty without LoRA)."""
    x2 = x.reshape(-1, in_features).contiguous()
    xa = x.new_empty(0)
    lora = {}
    if lora_A is not None:
        xa = _launch(
            x2,
            lora_A.t(),
            x2.new_empty(x2.shape[0], lora_A.shape[0]),
            drop="a",
            seed=seed,
            dropout=dropout,
            x_cols=in_features,
        )
        lora = dict(p=xa, q=lora_B.t(), beta=scale)
    W = (weight, packed, absmax, absmax_scale, offset, out_features, in_features, blocksize)
    y = _base(x2, *W, transposed=True, bias=bias, **lora)
    return y.view(*x.shape[:-1], out_features), xa


@triton_linear.register_fake
def _(
    x,
    weight,
    packed,
    absmax,
    absmax_scale,
    offset,
    bias,
    lora_A,
    lora_B,
    scale,
    dropout,
    seed,
    out_features,
    in_features,
    blocksize,
):
    rows = x.numel() // in_features
    xa = x.new_empty(rows, lora_A.shape[0]) if lora_A is not None else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], out_features), xa


@torch.library.custom_op("peftc::triton_linear_backward", mutates_args=())
def triton_linear_backward(
    grad: Tensor,
    x: Tensor,
    xa: Tensor,
    weight: Optional[Tensor],
    packed: Optional[Tensor],
    absmax: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    offset: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    scale: float,
    dropout: float,
    seed: int,
    out_features: int,
    in_features: int,
    blocksize: int,
    input_grad: bool,
    lora_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); each empty when not asked for."""
    g2 = grad.reshape(-1, out_features).contiguous()
    x2 = x.reshape(-1, in_features)
    dx, dA, dB = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dxa = None
    if lora_A is not None and (input_grad or lora_grad):
        dxa = _launch(g2, lora_B, g2.new_empty(g2.shape[0], lora_A.shape[0]), alpha=scale)
    dropped = dict(seed=seed, dropout=dropout, x_cols=in_features)  # x's dropout, regenerated
    if input_grad:
        lora = dict(p=dxa, q=lora_A, drop="pq", **dropped) if dxa is not None else {}
        W = (weight, packed, absmax, absmax_scale, offset, out_features, in_features, blocksize)
        dx = _base(g2, *W, transposed=False, **lora).view(x.shape)
    if lora_grad and dxa is not None:
        dA = _launch(dxa.t(), x2, torch.empty_like(lora_A), drop="b", **dropped)
        dB = _launch(g2.t(), xa, torch.empty_like(lora_B), alpha=scale)
    return dx, dA, dB


@triton_linear_backward.register_fake
def _(
    grad,
    x,
    xa,
    weight,
    packed,
    absmax,
    absmax_scale,
    offset,
    lora_A,
    lora_B,
    scale,
    dropout,
    seed,
    out_features,
    in_features,
    blocksize,
    input_grad,
    lora_grad,
):
    lora = lora_grad and lora_A is not None
    return (
        torch.empty_like(x) if input_grad else x.new_empty(0),
        torch.empty_like(lora_A) if lora else x.new_empty(0),
        torch.empty_like(lora_B) if lora else x.new_empty(0),
    )


_INPUTS = ("x", "weight", "packed", "absmax", "absmax_scale", "offset", "bias", "lora_A", "lora_B")


def _setup_context(ctx, inputs, output):
    x, weight, packed, absmax, absmax_scale, offset, bias, lora_A, lora_B = inputs[:9]
    ctx.constants = inputs[9:]
    ctx.save_for_backward(
        x, output[1], weight, packed, absmax, absmax_scale, offset, lora_A, lora_B
    )
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_xa):
    x, xa, weight, packed, absmax, absmax_scale, offset, lora_A, lora_B = ctx.saved_tensors
    scale, dropout, seed, out_features, in_features, blocksize = ctx.constants
    needs = dict(zip(_INPUTS, ctx.needs_input_grad, strict=False))
    if needs["packed"] or needs["absmax"]:
        raise RuntimeError("peftc::triton_linear: an NF4 weight has no gradient; freeze it")
    lora_grad = needs["lora_A"] or needs["lora_B"]
    dx, dA, dB = triton_linear_backward(
        grad,
        x,
        xa,
        weight,
        packed,
        absmax,
        absmax_scale,
        offset,
        lora_A,
        lora_B,
        scale,
        dropout,
        seed,
        out_features,
        in_features,
        blocksize,
        needs["x"],
        lora_grad,
    )
    g2 = grad.reshape(-1, out_features)
    # a trainable dense base: cuBLAS
    dW = g2.t().mm(x.reshape(-1, in_features)) if needs["weight"] else None
    db = g2.sum(0) if needs["bias"] else None
    return (
        dx if needs["x"] else None,
        dW,
        None,
        None,
        None,
        None,
        db,
        dA if lora_grad else None,
        dB if lora_grad else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


triton_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("peftc::triton_multi_lora_delta", mutates_args=())
def triton_multi_lora_delta(x: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
    """`peftc::multi_lora_delta` as one Triton launch: tokens sorted by adapter, one program per
    adapter segment tile and output tile (shrink to rank r, then expand)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    tokens = token_ids(ids, x2.shape[0])
    adapters, rank, in_features = lora_A.shape
    out_features = lora_B.shape[2]
    out = x2.new_zeros(x2.shape[0], out_features)
    served = tokens >= 0
    order = torch.argsort(torch.where(served, tokens, adapters), stable=True).to(torch.int32)
    counts = torch.bincount(tokens[served], minlength=adapters)[:adapters]
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    longest = int(counts.max()) if counts.numel() else 0
    if longest:
        block_m, block_n, block_k = _tiles(longest, out_features)
        grid = (adapters, triton.cdiv(longest, block_m), triton.cdiv(out_features, block_n))
        kernels.multi_lora_kernel[grid](
            x2,
            order,
            starts,
            counts.to(torch.int32),
            lora_A,
            lora_B,
            out,
            in_features,
            out_features,
            rank,
            x2.stride(0),
            lora_A.stride(2),
            lora_A.stride(1),
            lora_A.stride(0),
            lora_B.stride(2),
            lora_B.stride(1),
            lora_B.stride(0),
            out.stride(0),
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            UPCAST=interpreting(),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_R=max(16, triton.next_power_of_2(rank)),
        )
    return out.view(*x.shape[:-1], out_features)


@triton_multi_lora_delta.register_fake
def _(x, ids, lora_A, lora_B):
    return x.new_empty(*x.shape[:-1], lora_B.shape[2])
