"""bitsandbytes as the NF4 oracle, and the one place the tests let it decode.

Its quantizer's bytes are the oracle (byte equality, always). Its CPU dequantize, and the native
4-bit matmul of `Linear4bit`, are wrong on some CPUs while the bytes are right, by amounts that
differ from one CPU to the next. So every value bitsandbytes decodes here goes through
`dequantize`: compared with a plain decode of bitsandbytes' own bytes, and replaced by that
decode wherever the two differ, by any amount, with one warning per process saying so.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    MISSING = (
        "bitsandbytes' CPU library is not loaded"
        if isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
        else ""
    )
except ImportError:
    bnb = F = None
    MISSING = "bitsandbytes (the NF4 oracle) is not installed: pip install bitsandbytes"

needs_bnb = pytest.mark.skipif(bool(MISSING), reason=MISSING)
# bitsandbytes' own, whatever tests patch later
raw_dequantize = F.dequantize_4bit if F is not None else None
_warned = False


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """bitsandbytes' packed bytes and QuantState for `w`."""
    # eager: bitsandbytes wraps its pure-torch fallbacks in torch.compile (~25 s to compile here)
    with torch.compiler.set_stance("force_eager"):
        return F.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
        )


def plain_decode(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' bytes decoded the obvious way, with its own code tables: two codes a byte, high
    nibble first, each the NF4 value times its block's absmax; a double-quantized absmax is its
    8-bit code's value times its group's scale, plus the offset."""
    n = math.prod(state.shape)
    nibbles = (
        torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[:n].long()
    )
    absmax = state.absmax
    if state.nested:
        groups = torch.arange(absmax.numel()) // state.state2.blocksize
        absmax = state.state2.code[absmax.long()] * state.state2.absmax[groups] + state.offset
    blocks = torch.arange(n) // state.blocksize
    return (state.code[nibbles] * absmax.float()[blocks]).to(state.dtype).reshape(state.shape)


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantized tensor where it equals the plain decode of its bytes, else that
    decode."""
    global _warned
    with torch.compiler.set_stance("force_eager"):
        out = raw_dequantize(packed.reshape(-1, 1), state).reshape(state.shape)
    plain = plain_decode(packed, state)
    if torch.equal(out, plain):
        return out
    if not _warned:
        _warned = True
        warnings.warn(
            "bitsandbytes' dequantize_4bit is wrong on this CPU (seen at shape "
            f"{tuple(state.shape)}, blocksize {state.blocksize}, {state.dtype}, "
            f"nested={state.nested}): it differs from a plain decode of its own bytes, so the "
            "tests use that decode as the oracle (bytes stay bnb's)",
            stacklevel=2,
        )
    return plain


def dequantized_model(
    model: torch.nn.Module, paths: list[str], blocksize: int = 64
) -> torch.nn.Module:
    """A copy of `model` with each weight at `paths` replaced by its NF4 round trip through
    bitsandbytes."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for path in paths:
            weight = reference.get_submodule(path).weight
            weight.copy_(dequantize(*quantize(weight, blocksize)))
    return reference


def linear4bit_model(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """`model` with every linear but the LM head swapped for bitsandbytes' NF4 `Linear4bit`,
    decoding through `dequantize` for the rest of the test (its forward, peft's bitsandbytes layers,
    DoRA)."""
    monkeypatch.setattr(F, "dequantize_4bit", dequantize)
    monkeypatch.setattr(bnb, "matmul_4bit", _matmul_4bit)
    _swap_linears(model)
    return model


def _matmul_4bit(x, weight, bias=None, quant_state=None, out=None):
    return torch.nn.functional.linear(x, F.dequantize_4bit(weight, quant_state).to(x.dtype), bias)


def _swap_linears(model: torch.nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear) and name != "lm_head":
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=True,
                quant_type="nf4",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data.clone(),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                blocksize=64,
            )
            quantized.weight = weight._quantize("cpu")
            # eval mode would repack the bytes for its CPU kernel
            quantized.support_avx512bf16_for_cpu = False
            setattr(model, name, quantized)
        else:
            _swap_linears(child)
