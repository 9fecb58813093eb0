"""ONNX export for ONNX Runtime: merged, NF4-quantized and multi-adapter models.

    from peftc.backends import onnx as peftc_onnx
    peftc_onnx.export(gm, "model.onnx")                       # merged or plain graphs, fp32/fp16
    peftc_onnx.export(gm, "model.onnx", quant="int4")         # NF4 -> MatMulNBits; or int8
    peftc_onnx.export_fastest(gm, "model.onnx", accuracy=dev_accuracy)  # measured, chosen
    served = peftc_onnx.export_adapters(gm, "base.onnx")      # one base, an adapter file each
    session = peftc_onnx.AdapterSession(served); session.run(feeds, adapter="sst2")

See docs/architecture.md (backends) for the lowering of each peftc op.
"""

from .exporter import TRANSLATIONS, OnnxExport, export, linear_weight_bytes
from .serving import AdapterSession, ServedAdapters, export_adapters
from .tuning import export_fastest

__all__ = [
    "export",
    "export_fastest",
    "OnnxExport",
    "export_adapters",
    "ServedAdapters",
    "AdapterSession",
    "TRANSLATIONS",
    "linear_weight_bytes",
]
