"""Triton kernels: NF4 decoding and one matmul that every fused linear, forward and backward, runs
on.

    C = alpha * A @ B (+ bias) + beta * P @ Q

1. `B` is dense, or an NF4 weight decoded a tile at a time in registers (never written out whole):
   element (k, n) is the flat weight index `k * stride_bk + n * stride_bn`, so the same kernel reads
   W^T (forward) and W (the input gradient).
2. `P @ Q` is a rank-r epilogue (the LoRA product added to the base output, or the LoRA share of the
   input gradient); it is accumulated in the same tile.
3. Dropout on the LoRA input (peft's `lora_dropout`) is regenerated wherever it is read, from one
   seed and the element's offset in x: on A's tiles (x @ A^T), on B's tiles (dA = dxa^T @ drop(x))
   and on the epilogue (dx), so the dropped x is never stored.
4. `UPCAST` (set under `TRITON_INTERPRET=1`) multiplies tiles in float32: the CPU interpreter's
   `tl.dot` multiplies bfloat16 tiles as their raw bits. On a GPU, bfloat16 tiles go to the tensor
   cores as they are.
NF4 values are `code[nibble] * absmax[block]` in float32, rounded once to the compute dtype, as
`peftc.quant.nf4.decode_nf4` and bitsandbytes do; double-quantized absmax is decoded first, once per
call (one float32 a block: 1/16 of a float weight's bytes at blocksize 64).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def absmax_kernel(
    codes, scale, offset, dynamic, out, blocks, STATS_BLOCK: tl.constexpr, BLOCK: tl.constexpr
):
    """Double-quantized absmax -> float32: dynamic[code] * scale[block // 256] + offset."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < blocks
    code = tl.load(codes + i, mask=inside, other=0).to(tl.int32)
    value = tl.load(dynamic + code, mask=inside, other=0.0) * tl.load(
        scale + i // STATS_BLOCK, mask=inside, other=0.0
    )
    tl.store(out + i, value + tl.load(offset), mask=inside)


@triton.jit
def _nf4_values(packed, code, absmax, flat, inside, blocksize):
    byte = tl.load(packed + flat // 2, mask=inside, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    return tl.load(code + nibble, mask=inside, other=0.0) * tl.load(
        absmax + flat // blocksize, mask=inside, other=0.0
    )


@triton.jit
def dequantize_kernel(packed, code, absmax, out, n, blocksize, BLOCK: tl.constexpr):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = flat < n
    values = _nf4_values(packed, code, absmax, flat, inside, blocksize)
    tl.store(out + flat, values.to(out.dtype.element_ty), mask=inside)


@triton.jit
def _keep(seed, row, col, x_cols, p):
    """Dropout's keep mask over x's elements, scaled by 1 / (1 - p)."""
    keep = tl.rand(seed, (row * x_cols + col).to(tl.int32)) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit
def matmul_kernel(
    a,
    b,
    c,
    bias,
    p,
    q,
    code,
    absmax,
    M,
    N,
    K,
    R,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    alpha,
    beta,
    blocksize,
    seed,
    dropout,
    x_cols,
    B_NF4: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PQ: tl.constexpr,
    DROP_A: tl.constexpr,
    DROP_B: tl.constexpr,
    DROP_PQ: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # long: one kernel is one launch; its signature lists every pointer, stride and constexpr, and
    # the K loop and the rank-r epilogue share the accumulator tile
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ks64 = ks.to(tl.int64)
        a_inside = (rows[:, None] < M) & (ks[None, :] < K)
        a_tile = tl.load(
            a + rows64[:, None] * stride_am + ks64[None, :] * stride_ak, mask=a_inside, other=0.0
        )
        if DROP_A:
            a_tile = (a_tile * _keep(seed, rows64[:, None], ks64[None, :], x_cols, dropout)).to(
                a.dtype.element_ty
            )
        b_inside = (ks[:, None] < K) & (cols[None, :] < N)
        b_flat = ks64[:, None] * stride_bk + cols64[None, :] * stride_bn
        if B_NF4:
            b_tile = _nf4_values(b, code, absmax, b_flat, b_inside, blocksize).to(
                a.dtype.element_ty
            )
        else:
            b_tile = tl.load(b + b_flat, mask=b_inside, other=0.0)
        if DROP_B:
            b_tile = (b_tile * _keep(seed, ks64[:, None], cols64[None, :], x_cols, dropout)).to(
                a.dtype.element_ty
            )
        if UPCAST:
            a_tile, b_tile = a_tile.to(tl.float32), b_tile.to(tl.float32)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_PQ:
        extra = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            p_tile = tl.load(
                p + rows64[:, None] * stride_pm + rs[None, :] * stride_pr,
                mask=(rows[:, None] < M) & (rs[None, :] < R),
                other=0.0,
            )
            q_tile = tl.load(
                q + rs[:, None] * stride_qr + cols64[None, :] * stride_qn,
                mask=(rs[:, None] < R) & (cols[None, :] < N),
                other=0.0,
            )
            if UPCAST:
                p_tile, q_tile = p_tile.to(tl.float32), q_tile.to(tl.float32)
            extra = tl.dot(p_tile, q_tile, extra, input_precision=PRECISION)
        extra = extra * beta
        if DROP_PQ:
            extra = extra * _keep(seed, rows64[:, None], cols64[None, :], x_cols, dropout)
        acc += extra
    tl.store(
        c + rows64[:, None] * stride_cm + cols64[None, :] * stride_cn,
        acc.to(c.dtype.element_ty),
        mask=(rows[:, None] < M) & (cols[None, :] < N),
    )


@triton.jit
def multi_lora_kernel(
    x,
    order,
    starts,
    counts,
    lora_A,
    lora_B,
    out,
    K,
    N,
    R,
    stride_xm,
    stride_ak,
    stride_ar,
    stride_aa,
    stride_bn,
    stride_br,
    stride_ba,
    stride_om,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Shrink then expand for one adapter's tokens (a segment of the tokens sorted by adapter):
    out[t] = B[a] @ (A[a] @ x[t]) for the tokens t of adapter a = program_id(0)."""
    # long: one launch; the signature lists every pointer, stride and constexpr (23 lines)
    adapter = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_M
    count = tl.load(counts + adapter)
    inside = first + tl.arange(0, BLOCK_M) < count
    tokens = tl.load(
        order + tl.load(starts + adapter) + first + tl.arange(0, BLOCK_M), mask=inside, other=0
    ).to(tl.int64)
    ranks = tl.arange(0, BLOCK_R)
    shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(
            x + tokens[:, None] * stride_xm + ks[None, :],
            mask=inside[:, None] & (ks[None, :] < K),
            other=0.0,
        )
        a_tile = tl.load(
            lora_A + adapter * stride_aa + ranks[None, :] * stride_ar + ks[:, None] * stride_ak,
            mask=(ranks[None, :] < R) & (ks[:, None] < K),
            other=0.0,
        )
        if UPCAST:
            x_tile, a_tile = x_tile.to(tl.float32), a_tile.to(tl.float32)
        shrunk = tl.dot(x_tile, a_tile, shrunk, input_precision=PRECISION)
    # the rank-r product in the compute dtype, as peft's lora_A output
    shrunk = shrunk.to(out.dtype.element_ty)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_tile = tl.load(
        lora_B + adapter * stride_ba + cols[None, :] * stride_bn + ranks[:, None] * stride_br,
        mask=(ranks[:, None] < R) & (cols[None, :] < N),
        other=0.0,
    )
    if UPCAST:
        shrunk, b_tile = shrunk.to(tl.float32), b_tile.to(tl.float32)
    expanded = tl.dot(shrunk, b_tile, input_precision=PRECISION)
    tl.store(
        out + tokens[:, None] * stride_om + cols[None, :],
        expanded.to(out.dtype.element_ty),
        mask=inside[:, None] & (cols[None, :] < N),
    )
