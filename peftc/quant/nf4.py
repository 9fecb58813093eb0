"""Reference NF4 (4-bit NormalFloat, QLoRA) quantizer in plain torch, byte-identical to bitsandbytes
on the CPU.

Format (the one `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")` writes):

- The weight is flattened (row-major) and cut into blocks of `blocksize` values (a power of two,
  32..4096; default 64); the last block may be short.
- `absmax[b]` = max |w| over block b, in float32. Each value is scaled to w / absmax in [-1, 1] and
  coded as the index (0..15) of the nearest entry of `NF4_CODE`; a value exactly on a midpoint
  between two entries takes the lower one.
- `packed`: uint8 of shape (ceil(n/2), 1), two codes a byte: element 2i in the high nibble,
  element 2i+1 in the low one; an odd count is padded with code 7 (0.0).
- Dequantized value: `(NF4_CODE[code] * absmax[block]).to(dtype)`, the product in float32.
- Double quantization (bitsandbytes' `compress_statistics=True`): `offset = absmax.mean()`;
  `absmax - offset` is 8-bit quantized in blocks of 256 with the signed dynamic map
  (`dynamic_map()`): uint8 codes, one float32 `absmax_scale` per 256 blocks. It decodes as
  `DYNAMIC[code] * absmax_scale[block // 256] + offset`, all in float32.

Storage: 4 bits a weight plus 32 bits a block (4.5 bits at blocksize 64), or with double
quantization 8 bits a block plus 32 per 256 blocks plus 32 for the offset (about 4.127).

The arithmetic follows bitsandbytes 0.50 on the CPU step by step (its quirks included: a short last
block is scaled by division, full blocks by a reciprocal; an all-zero short last block stores absmax
1e-38, an all-zero full block 0). The 8-bit quantizer of double quantization is bitsandbytes' C
kernel's: it maps `x * (1 / absmax)` in [-1, 1] onto 65536 even bins and takes each bin's nearest
code from a table, so a value does not always get its own nearest code (mostly near zero, where the
codes are closer together than the bins); `_quantize_dynamic` does the same.

Other devices run the same torch ops; there only `absmax.mean()` may round differently.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from peftc.errors import PeftcError

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "QuantizationError",
    "bits_per_weight",
    "check_blocksize",
    "dequantize_absmax",
    "decode_nf4",
    "dequantize_nf4",
    "dynamic_map",
    "quantize_nf4",
]

# bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1), normalized to [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

STATS_BLOCKSIZE = 256  # blocks of absmax values in double quantization
_LUT_SIZE = 65536  # bins of bitsandbytes' CPU 8-bit quantizer


class QuantizationError(PeftcError):
    """A tensor or option that the quantizer cannot take."""


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """An NF4-quantized tensor; see the module docstring for the format.

    packed: uint8 (ceil(n/2), 1). absmax: float32 (blocks,), or uint8 codes (blocks,) when
    `double_quant`. absmax_scale: float32 (ceil(blocks/256),) and offset: float32 0-dim, only when
    `double_quant` (else None). shape, dtype: of the original tensor.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    double_quant: bool = False
    absmax_scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)


def check_blocksize(blocksize: object) -> int:
    ok = isinstance(blocksize, int) and not isinstance(blocksize, bool)
    if not ok or not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
        raise QuantizationError(
            f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}; use 64 (the NF4 "
            "default)"
        )
    return blocksize


def _check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if not dtype.is_floating_point:
        raise QuantizationError(
            f"NF4 quantizes floating-point tensors, but {what} is {dtype}; convert it first, e.g. "
            "`w.float()` (bitsandbytes takes float32, float16 and bfloat16)"
        )


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code`; ties go to the lower entry."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True)


def _absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and values scaled into [-1, 1] (bitsandbytes' default 4-bit kernel)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().max(dim=1).values
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:  # short last block: divided, and its absmax clamped before it is stored
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, (flat[full:] / last).clamp(-1, 1)])
    return absmax, scaled


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map()` (signed, 8 bits): 256 sorted float32 values in [-1,
    1]."""
    return _dynamic_code().clone()


@functools.cache
def _dynamic_code() -> torch.Tensor:
    data: list[float] = []
    for i in range(7):  # exponent 10**(i-6); 2**i fraction steps, each sign
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU table: bin i (value -1 + 2i/65535, in float32) -> nearest dynamic code."""
    i2 = torch.arange(0, 2 * _LUT_SIZE, 2, dtype=torch.float64)
    # float32 / and - rounded through float64: exact, as 53 >= 2 * 24 + 2
    values = ((i2 / (_LUT_SIZE - 1)).float().double() - 1.0).float()
    return _nearest(values, _dynamic_code()).to(torch.uint8)


def _quantize_dynamic(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of float32 `x` as bitsandbytes' CPU kernel does it."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    mags = torch.where(padded.isnan(), 0.0, padded.abs())  # the kernel's max skips NaN
    absmax = mags.amax(dim=1)
    scaled = (padded * torch.reciprocal(absmax).unsqueeze(1)).clamp(-1, 1)
    # bin = uint16((s + 1) * 0.5 * 65535 + 0.5); bnb fuses the last multiply-add, which gives the
    # same bin for every float32 s (checked exhaustively: s + 1 takes 2**25 + 1 values)
    pos = ((scaled + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).nan_to_num(nan=0.0).long()
    codes = _dynamic_lut().to(x.device)[pos]
    codes = torch.where((absmax == 0).unsqueeze(1), 0, codes)  # all-zero block: code 0
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def _dequantize_blocks(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """code[codes] * absmax per block, in float32 (flat)."""
    n = codes.numel()
    per_value = absmax.repeat_interleave(blocksize)[:n]
    return code.to(codes.device)[codes.long()] * per_value


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """NF4-quantize `w`; byte-identical to `bitsandbytes.functional.quantize_4bit(w,
    blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")` on the CPU."""
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"quantize_nf4 takes a torch.Tensor, got {type(w).__name__}")
    _check_float_dtype(w.dtype, "the tensor")
    blocksize = check_blocksize(blocksize)
    n = w.numel()
    if n == 0:
        raise QuantizationError(
            f"cannot quantize an empty tensor (shape {tuple(w.shape)}); skip it instead"
        )
    nblocks = -(-n // blocksize)

    if w.device.type == "meta":  # shapes only
        packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device="meta")
        if not double_quant:
            return NF4Weight(
                packed, torch.empty(nblocks, device="meta"), w.shape, w.dtype, blocksize
            )
        groups = -(-nblocks // STATS_BLOCKSIZE)
        return NF4Weight(
            packed,
            torch.empty(nblocks, dtype=torch.uint8, device="meta"),
            w.shape,
            w.dtype,
            blocksize,
            True,
            torch.empty(groups, device="meta"),
            torch.empty((), device="meta"),
        )

    with torch.no_grad():
        absmax, scaled = _absmax_and_scaled(w.detach().reshape(-1).float(), blocksize)
        if n % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _nearest(scaled, NF4_CODE.to(w.device)).to(torch.uint8)
        packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
        if not double_quant:
            return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
        offset = absmax.mean()
        codes, scale = _quantize_dynamic(absmax - offset, STATS_BLOCKSIZE)
        return NF4Weight(packed, codes, w.shape, w.dtype, blocksize, True, scale, offset)


def dequantize_absmax(state: NF4Weight) -> torch.Tensor:
    """The float32 per-block absmax of `state`, decoded when double-quantized."""
    if not state.double_quant:
        return state.absmax
    codes = _dequantize_blocks(state.absmax, state.absmax_scale, _dynamic_code(), STATS_BLOCKSIZE)
    return codes + state.offset


def dequantize_nf4(state: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized tensor (shape `state.shape`, dtype `dtype` or the original one).

    Equal to `bitsandbytes.functional.dequantize_4bit` on the CPU, except for bnb's shape quirks (a
    1-D input of even length comes back (1, n); outputs of at most two elements come back
    transposed) and the bits of NaNs in bfloat16 (bnb's C kernel does not canonicalize them)."""
    dtype = state.dtype if dtype is None else dtype
    _check_float_dtype(dtype, "the requested dtype")
    if state.packed.device.type == "meta":
        return torch.empty(state.shape, dtype=dtype, device="meta")
    out = torch.empty(state.numel, dtype=dtype, device=state.packed.device)
    decode_nf4(state.packed, dequantize_absmax(state), state.blocksize, 0, out)
    return out.view(state.shape)


# values decoded per step: the float32 tile (1 MiB) is still in cache for the scaling
_TILE = 1 << 18


def decode_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, start: int, out: torch.Tensor
) -> None:
    """Write values `[start, start + out.numel())` of an NF4 tensor into the flat, contiguous `out`.

    packed: the tensor's uint8 codes; absmax: its float32 absmax per block; start: a multiple of
    `blocksize`. The products are float32 and rounded once to `out.dtype`, as bitsandbytes does.
    Decoding in cache-sized steps into `out` itself (no full-size temporaries) keeps this within
    ~1.5x of bitsandbytes' C kernel: on the CPU, first touches of fresh memory cost more than the
    decoding (docs/performance.md)."""
    packed = packed.reshape(-1)
    if packed.storage_offset() % 2:
        packed = packed.clone()
    n = out.numel()
    full = n - n % blocksize  # only the tensor's last block can be short
    first_block = start // blocksize
    table = _pair_table(out.device)
    scratch = (
        None if out.dtype == torch.float32 else torch.empty(min(_TILE, full), device=out.device)
    )
    for lo in range(0, full, _TILE):
        hi = min(lo + _TILE, full)
        pairs = packed[(start + lo) // 2 : (start + hi) // 2].view(torch.uint16).int()
        codes = out[lo:hi] if scratch is None else scratch[: hi - lo]
        torch.index_select(table, 0, pairs, out=codes.view(-1, 4))
        scale = absmax[first_block + lo // blocksize : first_block + hi // blocksize].unsqueeze(1)
        torch.mul(codes.view(-1, blocksize), scale, out=out[lo:hi].view(-1, blocksize))
    if full < n:
        tail = packed[(start + full) // 2 : (start + n + 1) // 2].long()
        values = _byte_table(out.device)[tail].reshape(-1)[: n - full]
        out[full:] = values * absmax[first_block + full // blocksize]


@functools.cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """byte -> the code values of its (high, low) nibbles: (256, 2) float32."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]], dim=1).to(device)


@functools.cache
def _pair_table(device: torch.device) -> torch.Tensor:
    """Two packed bytes read as one uint16 -> their four code values: (65536, 4) float32, 1 MiB.
    Built from the bytes themselves, so it holds on either byte order."""
    two_bytes = torch.arange(65536, dtype=torch.int32).to(torch.uint16).view(torch.uint8).long()
    return _byte_table(torch.device("cpu"))[two_bytes].reshape(65536, 4).to(device)


def bits_per_weight(state: NF4Weight) -> float:
    """Storage bits per weight: packed codes plus block statistics (the code tables not counted)."""
    bits = state.packed.numel() * 8
    if state.double_quant:
        bits += state.absmax.numel() * 8 + state.absmax_scale.numel() * 32 + 32
    else:
        bits += state.absmax.numel() * 32
    return bits / state.numel
