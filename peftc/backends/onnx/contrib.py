"""ONNX Runtime's 4-bit contrib ops, and how peftc's NF4 op lowers to them.

- `com.microsoft::MatMulBnb4` (quant_type 1 = NF4) reads bitsandbytes' byte layout, which is
  peftc's: the packed codes go into the file unchanged. It takes one absmax per block in the
  input's dtype, so double-quantized absmax values are decoded at export.
- `com.microsoft::MatMulNBits` (4-bit uniform, per-block scale and zero point) is what
  `quant="int4"` targets: the NF4 weight is decoded to a dense MatMul and requantized by ONNX
  Runtime's own `MatMulNBitsQuantizer`.

Attention lowers to `com.microsoft::MultiHeadAttention`, ONNX Runtime's fused attention kernel
(on CPU and CUDA): `aten.scaled_dot_product_attention`'s [B, N, S, H] query is laid out as the
[B, S, N*H] the op takes (key and value stay [B, N, L, H], a layout it reads), a boolean mask
becomes an additive bias of float32's lowest value, grouped key/value heads are repeated, and
`is_causal` is its `unidirectional`. Where that cannot hold (heads not static, a causal query
shorter than its keys, whose alignment differs between the two, values of another head size than
the keys, as in MLA, dropout) the attention is torch.onnx's own decomposition.

It also translates transformers' grouped matmul of mixture-of-experts layers (rows sorted by
expert): one MatMul per expert on its slice of rows, concatenated, as transformers' CPU fallback
computes it, so no expert multiplies a row it was not routed.

onnx ships no schemas for contrib ops; registering them lets onnxscript build the nodes and
`onnx.checker` check them.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.nn import (
    aten_scaled_dot_product_attention as torch_lib_sdpa,
)

__all__ = [
    "register_schemas",
    "nf4_linear_to_matmulbnb4",
    "sdpa_to_multihead_attention",
    "grouped_mm_to_onnx",
    "is_all_true",
    "requantize_int4",
    "quantize_int8",
    "kept",
    "quiet",
]

NF4 = 1  # MatMulBnb4's quant_type

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schemas() -> None:
    for schema in (
        _matmul_bnb4(),
        _matmul_nbits(),
        _multihead_attention(),
        _dynamic_quantize_matmul(),
    ):
        _register(schema)


def _matmul_bnb4() -> OpSchema:
    return _contrib(
        "MatMulBnb4",
        "Y = A @ dequantize_bnb4(B).T; B: bitsandbytes' packed 4-bit codes of the [N, K] weight.",
        ["A:T1", "B:T2", "absmax:T1"],
        [("T1", _FLOATS), ("T2", ["tensor(uint8)"])],
        [_attr(name) for name in ("K", "N", "block_size", "quant_type")],
    )


def _matmul_nbits() -> OpSchema:
    return _contrib(
        "MatMulNBits",
        "Y = A @ dequantize(B).T + bias; B: [N, K/block_size, block_size*bits/8] blockwise codes.",
        ["A:T1", "B:T2", "scales:T1", "zero_points:T3?", "g_idx:T4?", "bias:T1?"],
        [
            ("T1", _FLOATS),
            ("T2", ["tensor(uint8)", "tensor(int32)"]),
            ("T3", ["tensor(uint8)", "tensor(int32)", *_FLOATS]),
            ("T4", ["tensor(int32)"]),
        ],
        [
            *(_attr(name) for name in ("K", "N", "bits", "block_size")),
            _attr("accuracy_level", required=False),
        ],
    )


def _multihead_attention() -> OpSchema:
    return _contrib(
        "MultiHeadAttention",
        "softmax(scale * Q K^T + attention_bias) V over num_heads heads; query [B, S, D], key and "
        "value [B, L, D] or [B, N, L, H].",
        ["query:T", "key:T?", "value:T?", "bias:T?", "key_padding_mask:T?", "attention_bias:T?"],
        [("T", _FLOATS)],
        [
            _attr("num_heads"),
            _attr("unidirectional", required=False),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
        ],
    )


def _dynamic_quantize_matmul() -> OpSchema:
    return _contrib(
        "DynamicQuantizeMatMul",
        "Y = dequantize(quantize(A)) @ (B * b_scale) + bias; A quantized per tensor at run time, "
        "B int8 with a scale per column.",
        ["A:T1", "B:T2", "b_scale:T1", "b_zero_point:T2?", "bias:T1?"],
        [("T1", ["tensor(float)"]), ("T2", ["tensor(int8)", "tensor(uint8)"])],
    )


def _contrib(
    name: str,
    doc: str,
    inputs: list[str],
    types: list[tuple[str, list[str]]],
    attributes: list[OpSchema.Attribute] = (),
) -> OpSchema:
    """A com.microsoft schema; inputs as "name:type", "name:type?" when optional, one output."""
    optional = OpSchema.FormalParameterOption.Optional
    params = []
    for spec in inputs:
        param, type_str = spec.rstrip("?").split(":")
        params.append(
            _param(param, type_str, optional) if spec.endswith("?") else _param(param, type_str)
        )
    output = "output" if name == "MultiHeadAttention" else "Y"
    return OpSchema(
        name,
        "com.microsoft",
        1,
        doc=doc,
        inputs=params,
        outputs=[_param(output, types[0][0])],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=list(attributes),
    )


def _register(schema: OpSchema) -> None:
    if not onnx.defs.has(schema.name, schema.domain):
        onnx.defs.register_schema(schema)


def _param(
    name: str, type_str: str, option=OpSchema.FormalParameterOption.Single
) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, type_str, param_option=option)


def _attr(name: str, required: bool = True) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, OpSchema.AttrType.INT, "", required=required)


def nf4_linear_to_matmulbnb4(
    x,
    packed,
    absmax,
    absmax_scale,
    offset,
    bias,
    out_features: int,
    in_features: int,
    blocksize: int,
):
    """Translation of `peftc::nf4_linear` for `torch.onnx.export(custom_translation_table=...)`;
    the export lowering has decoded `absmax` to the input's dtype and flattened `packed` already."""
    msft = onnxscript.values.Opset("com.microsoft", 1)
    y = msft.MatMulBnb4(
        x, packed, absmax, K=in_features, N=out_features, block_size=blocksize, quant_type=NF4
    )
    return y if bias is None else op.Add(y, bias)


def sdpa_to_multihead_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Translation of `aten.scaled_dot_product_attention` (see the module docstring)."""
    if not _fusable(query, key, value, attn_mask, is_causal, dropout_p):
        return torch_lib_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        key, value = (_repeat_heads(t, heads // kv_heads) for t in (key, value))
    bias = None if attn_mask is None else _attention_bias(attn_mask, query, key)
    msft = onnxscript.values.Opset("com.microsoft", 1)
    flat_query = op.Reshape(
        op.Transpose(query, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1])
    )
    scaled = {} if scale is None else {"scale": float(scale)}
    out = msft.MultiHeadAttention(
        flat_query,
        key,
        value,
        None,
        None,
        bias,
        num_heads=heads,
        unidirectional=int(bool(is_causal)),
        **scaled,
    )
    heads_apart = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, -1]))
    return op.Transpose(heads_apart, perm=[0, 2, 1, 3])


def _fusable(query, key, value, attn_mask, is_causal, dropout_p) -> bool:
    shapes = (query.shape, key.shape, value.shape, () if attn_mask is None else attn_mask.shape)
    if any(shape is None for shape in shapes) or dropout_p:
        return False
    if not len(query.shape) == len(key.shape) == len(value.shape) == 4:  # [B, N, S, H] only
        return False
    heads = (query.shape[1], query.shape[3], key.shape[1], value.shape[3])
    static = all(isinstance(d, int) for d in heads)
    # torch aligns a causal mask top-left, ONNX Runtime bottom-right: equal when S == L
    causal_aligned = not is_causal or query.shape[2] == key.shape[2]
    # [B, N, L, H] key and value must have one head size (MLA's differ)
    return static and causal_aligned and value.shape[3] == query.shape[3]


def _repeat_heads(t, times: int):
    """[B, n, L, H] -> [B, n * times, L, H], each head `times` over (SDPA's `enable_gqa`)."""
    spread = op.Expand(
        op.Unsqueeze(t, op.Constant(value_ints=[2])),
        op.Concat(
            op.Shape(t, start=0, end=2),
            op.Constant(value_ints=[times]),
            op.Shape(t, start=2),
            axis=0,
        ),
    )
    return op.Reshape(spread, op.Constant(value_ints=[0, -1, 0, 0]))


def _attention_bias(mask, query, key):
    """SDPA's mask as MultiHeadAttention's [B or 1, N or 1, S, L] additive float bias."""
    rank = len(mask.shape)
    if mask.dtype == onnx.TensorProto.BOOL:
        lowest = float(np.finfo(np.float32).min)
        mask = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=lowest))
        mask = op.CastLike(mask, query)
    for _ in range(4 - rank):
        mask = op.Unsqueeze(mask, op.Constant(value_ints=[0]))
    size = op.Concat(
        op.Shape(mask, start=0, end=2),
        op.Shape(query, start=2, end=3),
        op.Shape(key, start=2, end=3),
        axis=0,
    )
    return op.Expand(mask, size)


def grouped_mm_to_onnx(input, weight, offs):
    """Translation of `transformers::grouped_mm_fallback(input (S, in), weight (E, in, out),
    offs (E,))`: rows offs[e-1]:offs[e] of `input` belong to expert e (E is static)."""
    experts = weight.shape[0]
    ends = op.Cast(offs, to=onnx.TensorProto.INT64)
    starts = op.Concat(op.Constant(value_ints=[0]), op.Slice(ends, [0], [experts - 1]), axis=0)
    pieces = [
        op.MatMul(
            op.Slice(input, op.Slice(starts, [e], [e + 1]), op.Slice(ends, [e], [e + 1]), [0]),
            op.Gather(weight, op.Constant(value_int=e), axis=0),
        )
        for e in range(experts)
    ]
    return op.Concat(*pieces, axis=0)


def is_all_true(x):
    """Translation of `aten._is_all_true` (a 0-dim bool: every element of `x` is true)."""
    as_int = op.Cast(x, to=onnx.TensorProto.INT64)
    return op.Cast(op.ReduceMin(as_int, keepdims=0), to=onnx.TensorProto.BOOL)


def requantize_int4(
    model: onnx.ModelProto, weight_names: set[str], block_size: int, accuracy_level: int = 0
) -> tuple[onnx.ModelProto, float]:
    """Replace each MatMul whose weight input is one of `weight_names` ([K, N] initializers) by
    ONNX Runtime's MatMulNBits (4 bits, asymmetric; `accuracy_level` 0: float activations, 4:
    activations quantized to int8 per block, int8 dot products).

    Returns the model and the error requantization adds: ||W_int4 - W|| / ||W|| over all weights."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nodes = [
        n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weight_names
    ]
    if len(nodes) != len(weight_names):
        raise RuntimeError(f"found {len(nodes)} MatMul nodes for {len(weight_names)} NF4 weights")
    sources = {
        i.name: onnx.numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.name in weight_names
    }
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=accuracy_level,
        nodes_to_include=nodes,
        # the quantizer takes every MatMul on an initializer besides those it is given
        nodes_to_exclude=[n.name for n in model.graph.node if n.name not in nodes],
    )
    with quiet():
        quantizer.process()
    model = quantizer.model.model
    inits = {i.name: i for i in model.graph.initializer}
    error = total = 0.0
    for name, weight in sources.items():
        arrays = [
            onnx.numpy_helper.to_array(inits[f"{name}{suffix}"])
            for suffix in ("_Q4", "_scales", "_zero_points")
        ]
        deviation = dequantize_int4(*arrays, k=weight.shape[0]) - weight.T
        error += float((deviation.astype(np.float64) ** 2).sum())
        total += float((weight.astype(np.float64) ** 2).sum())
    return model, (error / total) ** 0.5 if total else 0.0


def quantize_int8(
    model: onnx.ModelProto, keep: tuple[str, ...] = ()
) -> tuple[onnx.ModelProto, int]:
    """ONNX Runtime's dynamic int8 quantization of every linear (MatMul or Gemm on a weight
    initializer) but those whose weight is under a path in `keep` (heads): weights int8 per
    output channel, activations quantized at run time. The model and how many it quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    linears = [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights
    ]
    chosen = [n.name for n in linears if not kept({p.key: p.value for p in n.metadata_props}, keep)]
    with tempfile.TemporaryDirectory() as folder, quiet():
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, source)
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=chosen,
        )
        return onnx.load(target), len(chosen)


def kept(metadata: Mapping[str, str], keep: tuple[str, ...]) -> bool:
    """Whether torch.onnx recorded a node (its `metadata_props`) within a module path in `keep`."""
    scopes = metadata.get("pkg.torch.onnx.name_scopes")
    paths = ast.literal_eval(scopes) if scopes else []
    return any(path == m or path.startswith(f"{m}.") for path in paths for m in keep)


def dequantize_int4(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int
) -> np.ndarray:
    """MatMulNBits' weight, [N, K]: `(code - zero_point) * scale` per block along K; the even index
    of each pair (codes along K, zero points along blocks) is in the low nibble."""
    n, blocks, _ = packed.shape
    codes = (
        np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1).astype(np.float32)
    )
    zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[
        :, :blocks, None
    ]
    weight = (codes - zero) * scales.reshape(n, blocks, 1)
    return weight.reshape(n, -1)[:, :k]


@contextlib.contextmanager
def quiet():
    """torch.onnx prints progress lines and logs that torchvision is missing; keep output clean."""
    loggers = [
        logging.getLogger(name)
        for name in (
            "torch.onnx",
            "onnx_ir",
            "onnxscript",
            "onnxruntime",
            "",
        )  # "": the quantizer's
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
