"""Attention that takes the causal kernel when its mask is causal.

A captured decoder builds its attention mask from the `attention_mask` input, so the graph always
hands SDPA an explicit boolean mask, (batch, 1, L, L). transformers' eager run on an all-ones
attention mask passes none and sets `is_causal=True`, which lets the kernel skip the blocks above
the diagonal. `causal_sdpa` is SDPA with the same arguments that checks, when it runs eagerly,
whether the mask is exactly causal (lower-triangular over L x L, for every row of the batch), and
then drops it for `is_causal=True`. The check reads L * L booleans per row; attention reads
L * L * head_dim numbers per head.

While traced (torch.compile, torch.export, fake or functional tensors, dispatch modes such as
make_fx's and the memory planner's) it is plain masked SDPA:
the graph compiled or exported is the captured one. `use_causal_kernel(gm)` swaps every aten SDPA
node of a captured graph for it; attention sites are found through either.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["causal_sdpa", "use_causal_kernel", "traced_masks_are_causal", "SDPA"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_ASSUME_CAUSAL = contextvars.ContextVar("peftc_assume_causal_masks", default=False)


def causal_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`aten.scaled_dot_product_attention`, with a causal boolean mask computed as `is_causal`."""
    if _is_causal_mask(attn_mask, query, key):
        attn_mask, is_causal = None, True
    return SDPA(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


@contextlib.contextmanager
def traced_masks_are_causal() -> Iterator[None]:
    """While traced, take every square boolean mask as causal: for a tracer that runs the graph
    on fake tensors built from unpadded inputs, as the memory planner does, so that it follows
    the kernel the real run takes."""
    token = _ASSUME_CAUSAL.set(True)
    try:
        yield
    finally:
        _ASSUME_CAUSAL.reset(token)


def _is_causal_mask(mask: Any, query: Any, key: Any) -> bool:
    if torch.compiler.is_compiling():  # the compiled graph is the captured one
        return False
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return False
    length = query.shape[-2]
    if key.shape[-2] != length or mask.shape[-2:] != (length, length):
        return False
    if type(mask) is not torch.Tensor or _get_current_dispatch_mode() is not None:
        return _ASSUME_CAUSAL.get()
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril_()
    return bool(torch.equal(mask, causal.expand_as(mask)))


def use_causal_kernel(gm: fx.GraphModule) -> int:
    """Swap each `aten.scaled_dot_product_attention` node for `causal_sdpa` (same arguments, same
    metadata); returns how many."""
    nodes = list(gm.graph.find_nodes(op="call_function", target=SDPA))
    for node in nodes:
        node.target = causal_sdpa
    if nodes:
        gm.recompile()
    return len(nodes)
