"""VeLoRA, peft's `velora_config` LoRA variant: A's gradient from compressed activations.

    forward:  A x, as LoRA
    backward (training, grad enabled): dA = g^T x~,  x~ = scale * ((x grouped in num_groups
              sub-tokens) . e) e, one number per sub-token kept instead of x; dx as usual

1. `e` (`lora_velora_embed`, a saved buffer) is a unit vector of the sub-token width: random
   (`init_type="random"`), or the normalised mean sub-token of the training batch, set at every
   training step (`"batch_average"`) or at the first (`"batch_average_once"`), as peft.
2. The module `VeloraA` computes A x: in eval mode (or without grad) a plain linear; it follows the
   graph's train/eval mode like a dropout. Merging is LoRA's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import OptionError
from peftc.technique import Param

__all__ = ["VeloraA", "velora_params", "check_velora"]


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    width = -(-x.shape[-1] // groups)
    if x.shape[-1] != groups * width:
        x = F.pad(x, (0, groups * width - x.shape[-1]))
    return x.reshape(-1, groups, width)


def _unit(e: torch.Tensor) -> torch.Tensor:
    e = e.float()
    norm = torch.linalg.vector_norm(e)
    if norm == 0:
        e = torch.ones_like(e)
        norm = torch.linalg.vector_norm(e)
    return e / norm


class _Velora(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, e: torch.Tensor, groups: int, scale: float
    ) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.groups, ctx.scale = tuple(x.shape), x.dtype, groups, scale
        ctx.save_for_backward(
            torch.einsum("tgd,d->tg", _grouped(x, groups), e.to(x.dtype)), weight, e
        )
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        compressed, weight, e = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad2d @ weight.to(grad.dtype)).reshape(ctx.shape).to(ctx.dtype)
        rebuilt = compressed.to(grad.dtype).unsqueeze(-1) * e.to(grad.dtype).view(1, 1, -1)
        rebuilt = rebuilt.reshape(-1, compressed.shape[-1] * e.numel())[:, : ctx.shape[-1]]
        grad_w = (grad2d.transpose(0, 1) @ (rebuilt * ctx.scale)).to(weight.dtype)
        return grad_x, grad_w, None, None, None


class VeloraA(nn.Module):
    """A x with VeLoRA's gradient in training (see the module doc); `e` is passed in, updated in
    place for the batch-average inits."""

    def __init__(self, groups: int, scale: float, init: str) -> None:
        super().__init__()
        self.groups, self.scale, self.init = groups, scale, init
        self.initialized = init == "random"

    def forward(self, x: torch.Tensor, weight: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, weight)
        if self.init == "batch_average" or not self.initialized:
            with torch.no_grad():
                sub_tokens = _grouped(x.detach(), self.groups)
                e.copy_(_unit(sub_tokens.reshape(-1, sub_tokens.shape[-1]).mean(dim=0)))
            self.initialized = True
        return _Velora.apply(x, weight, e, self.groups, self.scale)


def check_velora(site: Any, options: Any) -> None:
    if site.kind != "linear" or getattr(site, "fan_in_fan_out", False):
        raise OptionError(f"lora: peft has VeLoRA for nn.Linear layers only, not {site.path!r}")
    if options.dora or options.block_diagonal or options.kasa or options.lora_bias:
        raise OptionError(
            f"lora: peft does not combine VeLoRA with another variant at {site.path!r}"
        )


def velora_params(site: Any, options: Any) -> Param:
    """`lora_velora_embed`: random unit vector, or zero until a training batch sets it."""
    width = -(-site.in_features // options.velora_groups)
    value = _unit(torch.randn(width)) if options.velora_init == "random" else torch.zeros(width)
    return Param("lora_velora_embed", value=value, trainable=False)
