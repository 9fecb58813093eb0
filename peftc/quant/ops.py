"""`peftc::nf4_linear`: a linear layer whose weight is stored as NF4 buffers.

    y = x @ dequantize_nf4(W).T + b

and `peftc::nf4_dequantize`, the weight itself, for the techniques that read it in the graph
(DoRA's weight norm on an NF4 base, as peft does on bitsandbytes weights), and
`peftc::nf4_dequantize_experts`, a mixture-of-experts weight stack (E, a, b) quantized one expert
slice at a time, as the experts' grouped matmul reads it.

No standard op dequantizes NF4, so this is a `torch.library.custom_op` with a reference
implementation, a fake (meta) implementation for shape propagation and export, and autograd:
the gradient flows to `x` (and a bias that requires it), never to the quantized weight.

The weight is decoded a tile of rows at a time into one reused buffer and multiplied at once, so
the full-precision weight never exists in memory: peak memory grows by one tile (about 4 MiB), not
by the layer's float weight, and the decoding writes to memory that is already mapped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from peftc.quant.nf4 import NF4Weight, decode_nf4, dequantize_absmax, dequantize_nf4

__all__ = ["nf4_linear", "nf4_dequantize", "nf4_dequantize_experts", "expert_states"]

_TILE_VALUES = 1 << 20  # weight values decoded per matmul


def _state(
    packed, absmax, absmax_scale, offset, out_features, in_features, blocksize, dtype
) -> NF4Weight:
    return NF4Weight(
        packed,
        absmax,
        torch.Size((out_features, in_features)),
        dtype,
        blocksize,
        absmax_scale is not None,
        absmax_scale,
        offset,
    )


def _row_tiles(state: NF4Weight, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
    """(first row, end row, decoded rows) over the weight, decoded into one reused buffer."""
    rows, cols = state.shape
    unit = state.blocksize // math.gcd(cols, state.blocksize)  # tiles start on a block boundary
    tile_rows = max(unit, _TILE_VALUES // cols // unit * unit)
    absmax = dequantize_absmax(state)
    buffer = torch.empty(min(tile_rows, rows) * cols, dtype=dtype, device=state.packed.device)
    for r0 in range(0, rows, tile_rows):
        r1 = min(r0 + tile_rows, rows)
        weight = buffer[: (r1 - r0) * cols]
        decode_nf4(state.packed, absmax, state.blocksize, r0 * cols, weight)
        yield r0, r1, weight.view(r1 - r0, cols)


@torch.library.custom_op("peftc::nf4_linear", mutates_args=())
def nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax_scale: Tensor | None,
    offset: Tensor | None,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
) -> Tensor:
    state = _state(
        packed, absmax, absmax_scale, offset, out_features, in_features, blocksize, x.dtype
    )
    if out_features * in_features <= _TILE_VALUES:
        return F.linear(x, dequantize_nf4(state, x.dtype), bias)
    x2 = x.reshape(-1, in_features)
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    for r0, r1, weight in _row_tiles(state, x.dtype):
        if bias is None:
            torch.mm(x2, weight.t(), out=y[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], x2, weight.t(), out=y[:, r0:r1])
    return y.view(*x.shape[:-1], out_features)


@nf4_linear.register_fake
def _(x, packed, absmax, absmax_scale, offset, bias, out_features, in_features, blocksize):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, absmax_scale, offset, bias, out_features, in_features, blocksize = inputs
    ctx.save_for_backward(packed, absmax, absmax_scale, offset)
    ctx.sizes = (out_features, in_features, blocksize)
    ctx.bias_grad = bias is not None and bias.requires_grad


@torch.library.custom_op("peftc::nf4_linear_grad_input", mutates_args=())
def nf4_linear_grad_input(
    grad: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax_scale: Tensor | None,
    offset: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
) -> Tensor:
    """dL/dx of `nf4_linear`: grad @ W, with W decoded tile by tile (an op, so fake tensors can size
    it)."""
    state = _state(
        packed, absmax, absmax_scale, offset, out_features, in_features, blocksize, grad.dtype
    )
    if out_features * in_features <= _TILE_VALUES:
        return grad @ dequantize_nf4(state, grad.dtype)
    grad2 = grad.reshape(-1, out_features)
    grad_x = torch.zeros(grad2.shape[0], in_features, dtype=grad.dtype, device=grad.device)
    for r0, r1, weight in _row_tiles(state, grad.dtype):
        grad_x.addmm_(grad2[:, r0:r1], weight)
    return grad_x.view(*grad.shape[:-1], in_features)


@nf4_linear_grad_input.register_fake
def _(grad, packed, absmax, absmax_scale, offset, out_features, in_features, blocksize):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _backward(ctx, grad):
    packed, absmax, absmax_scale, offset = ctx.saved_tensors
    grad_x = nf4_linear_grad_input(grad, packed, absmax, absmax_scale, offset, *ctx.sizes)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
    return grad_x, None, None, None, None, grad_bias, None, None, None


nf4_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("peftc::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    packed: Tensor,
    absmax: Tensor,
    absmax_scale: Tensor | None,
    offset: Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """The (out_features, in_features) weight in `dtype`; it is frozen, so no autograd is needed."""
    state = _state(
        packed, absmax, absmax_scale, offset, out_features, in_features, blocksize, dtype
    )
    return dequantize_nf4(state, dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, absmax_scale, offset, out_features, in_features, blocksize, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


def expert_states(
    packed: Tensor,
    absmax: Tensor,
    absmax_scale: Tensor | None,
    offset: Tensor | None,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> list[NF4Weight]:
    """The NF4Weight of each expert slice of a stack stored as `nf4_dequantize_experts` reads it:
    each statistic has a leading expert dimension."""
    return [
        NF4Weight(
            packed[e],
            absmax[e],
            torch.Size(shape[1:]),
            dtype,
            blocksize,
            absmax_scale is not None,
            None if absmax_scale is None else absmax_scale[e],
            None if offset is None else offset[e],
        )
        for e in range(shape[0])
    ]


@torch.library.custom_op("peftc::nf4_dequantize_experts", mutates_args=())
def nf4_dequantize_experts(
    packed: Tensor,
    absmax: Tensor,
    absmax_scale: Tensor | None,
    offset: Tensor | None,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """The (E, a, b) stack in `dtype`; it is frozen, so no autograd is needed."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    states = expert_states(packed, absmax, absmax_scale, offset, shape, blocksize, dtype)
    for e, state in enumerate(states):
        decode_nf4(state.packed, dequantize_absmax(state), blocksize, 0, out[e].view(-1))
    return out


@nf4_dequantize_experts.register_fake
def _(packed, absmax, absmax_scale, offset, shape, blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)
