"""Weight quantization: NF4 as in QLoRA.

`nf4` is the reference quantizer, byte-identical to bitsandbytes on the CPU; `ops` the `peftc::`
ops that compute through NF4 storage; `format` the weight format the technique layer sees (it
registers itself with `peftc.sites.formats`); `passes` the `nf4` pass. Importing this package
registers all of them.
"""

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

from peftc.quant import format, passes  # noqa: F401  (registers the NF4 format and the nf4 pass)
