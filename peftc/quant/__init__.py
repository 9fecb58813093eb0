"""Weight quantization: a reference NF4 quantizer, byte-identical to bitsandbytes on the CPU."""

from peftc.quant.nf4 import (
    NF4_CODE,
    NF4Weight,
    QuantizationError,
    bits_per_weight,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_map,
    quantize_nf4,
)

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "QuantizationError",
    "bits_per_weight",
    "dequantize_absmax",
    "dequantize_nf4",
    "dynamic_map",
    "quantize_nf4",
]
