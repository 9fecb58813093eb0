"""4-bit weights that ONNX Runtime runs with its int8 kernels (`export(quant="int4_int8")`).

ONNX Runtime's 4-bit matmul (MatMulNBits) is built for decoding one token at a time; at prefill
sizes on a CPU it runs about as fast as fp32, while its int8 kernels run twice as fast. A
block-wise 4-bit weight cannot go through an int8 kernel as it is, since the kernel takes one
scale per output channel and block-wise weights have one per block. So the scales are split, as
llama.cpp's k-quants do:

    W[k, n] = scale[n] * multiplier[k // 32, n] * code[k, n]
    scale: float32 per output channel; multiplier: 1..16 per block of 32 (4 bits); code: -8..7

`multiplier * code` lies in -128..112: an exact int8. The file holds the 4-bit codes and
multipliers (ONNX's INT4/UINT4 types, about 4.2 bits per weight with the scales); the graph
multiplies them out with standard ops (Cast, Mul, Reshape) on constants only, which ONNX Runtime
folds when it loads the file, and feeds the int8 weight to `com.microsoft::DynamicQuantizeMatMul`
(activations quantized per tensor at run time, int8 dot products, the bias added in the kernel).
The weights take int8's memory once loaded: 4-bit is the file's size, not the run's.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from peftc.backends.onnx.contrib import kept
from peftc.backends.onnx.rewrites import Linear, linears
from peftc.backends.onnx.rewrites import take_place as _take_place

__all__ = ["quantize_int4_int8", "int4_int8_weight", "GROUP"]

GROUP = 32  # weights per multiplier, along K
_OPSET = 21  # Cast from INT4/UINT4


def int4_int8_weight(weight: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, ...]:
    """`weight` [K, N] as (codes [K', N] in -8..7, multipliers [K' / group, N] in 1..16, scales
    [N]); K' is K rounded up to `group` (zero rows). Each block's multiplier is the one of the two
    nearest its ideal scale with the smaller squared error."""
    k, n = weight.shape
    padded = np.zeros((-(-k // group) * group, n), dtype=np.float64)
    padded[:k] = weight
    blocks = padded.reshape(-1, group, n)
    ideal = np.abs(blocks).max(axis=1) / 7  # [blocks, N]: the scale that maps absmax to 7
    scales = ideal.max(axis=0) / 16
    scales[scales == 0] = 1.0

    def rounded(rounding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        multipliers = np.clip(rounding(ideal / scales), 1, 16)
        step = (scales * multipliers)[:, None, :]
        codes = np.clip(np.round(blocks / step), -8, 7)
        return codes, multipliers, ((codes * step - blocks) ** 2).sum(axis=1)

    (low_codes, low, low_error), (high_codes, high, high_error) = map(rounded, (np.floor, np.ceil))
    better = high_error < low_error  # [blocks, N]
    codes = np.where(better[:, None, :], high_codes, low_codes)
    multipliers = np.where(better, high, low)
    return (
        codes.reshape(-1, n).astype(np.int8),
        multipliers.astype(np.uint8),
        scales.astype(np.float32),
    )


def quantize_int4_int8(
    model: onnx.ModelProto, keep: tuple[str, ...] = (), group: int = GROUP
) -> tuple[onnx.ModelProto, int, float]:
    """Every linear but those under a module path in `keep` (heads) as int4 weights run by
    DynamicQuantizeMatMul. The model, how many linears it quantized, and the weight error it adds:
    ||W_int4 - W|| / ||W|| over them all."""
    graph = ir.from_proto(model)
    chosen = [
        linear
        for linear in linears(graph.graph)
        if not kept(linear.matmul.metadata_props, keep)
        and linear.weight.const_value.dtype == ir.DataType.FLOAT
    ]
    error = total = 0.0
    expanded: dict[tuple[str, bool], tuple[ir.Value, ir.Value]] = {}  # a shared weight, once
    for linear in chosen:
        key = (linear.weight.name, linear.transposed)
        if key not in expanded:
            weight = linear.weight_kn()
            parts = int4_int8_weight(weight, group)
            deviation = _dequantized(*parts, group)[: weight.shape[0]] - weight
            error += float((deviation.astype(np.float64) ** 2).sum())
            total += float((weight.astype(np.float64) ** 2).sum())
            expanded[key] = _expansion(graph.graph, linear, *parts, group, k=weight.shape[0])
        _replace(graph.graph, linear, *expanded[key])
    if chosen:
        graph.opset_imports[""] = max(graph.opset_imports.get("", _OPSET), _OPSET)
        graph.opset_imports.setdefault("com.microsoft", 1)
    return ir.to_proto(graph), len(chosen), (error / total) ** 0.5 if total else 0.0


def _dequantized(codes, multipliers, scales, group: int) -> np.ndarray:
    return codes.astype(np.float32) * np.repeat(multipliers, group, axis=0) * scales


def _expansion(
    graph: ir.Graph, linear: Linear, codes, multipliers, scales, group: int, k: int
) -> tuple[ir.Value, ir.Value]:
    """Nodes before `linear` that multiply its 4-bit codes and multipliers out to the int8 [K, N]
    weight (constants only: ONNX Runtime folds them at load); the int8 weight and the scales."""
    name = linear.weight.name + ("_t" if linear.transposed else "")
    k_padded, n = codes.shape
    stored_codes = _constant(graph, f"{name}_int4_codes", codes.reshape(-1, group, n), "INT4")
    stored_multipliers = _constant(
        graph, f"{name}_int4_multipliers", (multipliers - 1)[:, None, :], "UINT4"
    )
    one = _constant(graph, f"{name}_int4_one", np.array(1, dtype=np.int32))
    shape = _constant(graph, f"{name}_int4_shape", np.array([k_padded, n], dtype=np.int64))
    int32 = ir.DataType.INT32
    code_values = ir.node("Cast", [stored_codes], {"to": int32})
    multiplier_values = ir.node("Cast", [stored_multipliers], {"to": int32})
    multiplier = ir.node("Add", [multiplier_values.outputs[0], one])
    product = ir.node("Mul", [code_values.outputs[0], multiplier.outputs[0]])
    rows = ir.node("Reshape", [product.outputs[0], shape])
    nodes = [code_values, multiplier_values, multiplier, product, rows]
    if k != k_padded:
        bounds = [
            _constant(graph, f"{name}_int4_{b}", np.array([v])) for b, v in (("0", 0), ("k", k))
        ]
        nodes.append(ir.node("Slice", [rows.outputs[0], *bounds]))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT8}))
    for i, node in enumerate(nodes):
        node.name = f"{name}_int4_int8_{i}"
    graph.insert_before(linear.matmul, nodes)
    return nodes[-1].outputs[0], _constant(graph, f"{name}_int4_scales", scales)


def _replace(graph: ir.Graph, linear: Linear, weight: ir.Value, scales: ir.Value) -> None:
    """The linear's MatMul or Gemm (and bias Add) -> DynamicQuantizeMatMul on the int8 weight."""
    matmul = ir.node(
        "DynamicQuantizeMatMul",
        [linear.matmul.inputs[0], weight, scales, None, linear.bias],
        domain="com.microsoft",
        name=f"{linear.matmul.name}_int4_int8",
        metadata_props=dict(linear.matmul.metadata_props),
    )
    graph.insert_before(linear.matmul, [matmul])
    old = linear.output
    ir.convenience.replace_all_uses_with(old, matmul.outputs[0], replace_graph_outputs=True)
    graph.remove(linear.nodes, safe=True)
    for value in (linear.weight, linear.bias):
        if value is not None and not value.uses():
            graph.initializers.pop(value.name)
    _take_place(matmul.outputs[0], old)


def _constant(graph: ir.Graph, name: str, array: np.ndarray, dtype: str | None = None) -> ir.Value:
    if dtype is None:
        tensor = ir.tensor(array, name=name)
    else:  # INT4 / UINT4: two values per byte in the file, the first in the low nibble
        tensor = ir.Tensor(array.astype(getattr(ml_dtypes, dtype.lower())), name=name)
    value = ir.Value(name=name, const_value=tensor)
    graph.register_initializer(value)
    return value
