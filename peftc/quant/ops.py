"""`peftc::nf4_linear`: a linear layer whose weight is stored as NF4 buffers.

    y = x @ dequantize_nf4(W).T + b

No standard op dequantizes NF4, so this is a `torch.library.custom_op` with a reference
implementation, a fake (meta) implementation for shape propagation and export, and autograd:
the gradient flows to `x` (and a bias that requires it), never to the quantized weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from peftc.quant.nf4 import NF4Weight, dequantize_nf4

__all__ = ["nf4_linear", "dequantize"]


def dequantize(
    packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, offset: Tensor | None,
    out_features: int, in_features: int, blocksize: int, dtype: torch.dtype,
) -> Tensor:
    state = NF4Weight(packed, absmax, torch.Size((out_features, in_features)), dtype, blocksize,
                      absmax_scale is not None, absmax_scale, offset)
    return dequantize_nf4(state, dtype)


@torch.library.custom_op("peftc::nf4_linear", mutates_args=())
def nf4_linear(
    x: Tensor, packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, offset: Tensor | None,
    bias: Tensor | None, out_features: int, in_features: int, blocksize: int,
) -> Tensor:
    weight = dequantize(packed, absmax, absmax_scale, offset, out_features, in_features, blocksize, x.dtype)
    return F.linear(x, weight, bias)


@nf4_linear.register_fake
def _(x, packed, absmax, absmax_scale, offset, bias, out_features, in_features, blocksize):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, absmax_scale, offset, bias, out_features, in_features, blocksize = inputs
    ctx.save_for_backward(packed, absmax, absmax_scale, offset)
    ctx.sizes = (out_features, in_features, blocksize)
    ctx.dtype = x.dtype
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad):
    packed, absmax, absmax_scale, offset = ctx.saved_tensors
    weight = dequantize(packed, absmax, absmax_scale, offset, *ctx.sizes, ctx.dtype)
    grad_x = grad @ weight
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_grad else None
    return grad_x, None, None, None, None, grad_bias, None, None, None


nf4_linear.register_autograd(_backward, setup_context=_setup_context)
