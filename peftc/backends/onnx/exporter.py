"""Export a captured, rewritten graph to an ONNX file for ONNX Runtime.

    gm -> lower (NF4 nodes -> MatMulBnb4 inputs, or dense weights for int4)
       -> torch.onnx.export(dynamo=True, optimize=False)     initializer names survive
       -> [MatMulNBits requantization] [LoRA weights -> graph inputs] [float16]
       -> onnxscript optimizer                               graph inputs are never folded
       -> onnx.checker -> temp file + rename

The exporter's own optimizer is off because it folds `Transpose(weight)` into new initializers
named `val_N`; the same optimizer runs afterwards, once the tensors that must keep their names
are graph inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.utils._pytree as pytree
from torch import fx

from peftc._io import atomic_write
from peftc.backends.onnx.contrib import (
    grouped_mm_to_onnx,
    is_all_true,
    kept,
    nf4_linear_to_matmulbnb4,
    quantize_int8,
    quiet,
    register_schemas,
    requantize_int4,
    sdpa_to_multihead_attention,
)
from peftc.backends.onnx.int4_int8 import GROUP as INT4_INT8_GROUP
from peftc.backends.onnx.int4_int8 import quantize_int4_int8
from peftc.backends.onnx.rewrites import pack_sibling_linears
from peftc.errors import CaptureError, ExportError
from peftc.ir.attention import causal_sdpa
from peftc.ir.capture import export_program
from peftc.ir.graph import (
    clone,
    dim_names,
    get_attr_path,
    peftc_meta,
    qualify,
    set_tensor,
)
from peftc.quant.format import nf4_state
from peftc.quant.nf4 import dequantize_absmax, dequantize_nf4
from peftc.technique.adapters import adapters

__all__ = ["export", "OnnxExport", "onnx_model", "quantized_file", "linear_weight_bytes"]

aten = torch.ops.aten
NF4_LINEAR = torch.ops.peftc.nf4_linear.default
NF4_EXPERTS = torch.ops.peftc.nf4_dequantize_experts.default
TRANSLATIONS = {
    NF4_LINEAR: nf4_linear_to_matmulbnb4,
    aten.scaled_dot_product_attention.default: sdpa_to_multihead_attention,
    # torch.onnx has none; transformers' checks (Llava's image tokens) call it
    aten._is_all_true.default: is_all_true,
}
# ops of other libraries, translated when that library has registered them
_LIBRARY_TRANSLATIONS = {("transformers", "grouped_mm_fallback"): grouped_mm_to_onnx}
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_QUANT = ("nf4", "int4", "int8", "int4_int8", "float")
_ATTENTION = ("fused", "standard")


@dataclass
class OnnxExport:
    """What `export` wrote: the file, its interface and sizes."""

    path: Path
    inputs: list[str]
    outputs: list[str]
    bytes: int
    dtype: str
    quant: str
    quantized_weights: int = 0  # 4-bit weights (count of values)
    quantized_bits_per_weight: float = 0.0  # of those weights in the file, statistics included
    attention: int = 0  # attention ops in the graph
    fused_attention: int = 0  # of those, run as com.microsoft::MultiHeadAttention
    seconds: float = 0.0
    # (step, nodes after it): torch.onnx's graph, optimized (constants folded, Identity and
    # transpose pairs gone), sibling linears packed, quantized
    node_counts: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    candidates: list = field(default_factory=list)  # export_fastest's measurements

    def __str__(self) -> str:
        lines = [
            f"wrote {self.path} ({self.bytes / 2**20:.2f} MiB, {self.dtype}, {self.seconds:.1f} s)",
            f"  inputs:  {', '.join(self.inputs)}",
            f"  outputs: {', '.join(self.outputs)}",
        ]
        if self.attention:
            lines.append(
                f"  attention: {self.fused_attention} of {self.attention} fused "
                "(com.microsoft::MultiHeadAttention)"
            )
        if self.node_counts:
            steps = " -> ".join(f"{step} {count}" for step, count in self.node_counts)
            lines.append(f"  nodes: {steps}")
        if self.quantized_weights:
            lines.append(
                f"  {self.quant} weights: {self.quantized_weights:,} at "
                f"{self.quantized_bits_per_weight:.3f} bits each"
            )
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def export(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    args: tuple | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
    dtype: str = "float32",
    quant: str = "nf4",
    merged: bool = False,
    int4_block_size: int = 32,
    int4_accuracy_level: int = 0,
    attention: str = "fused",
) -> OnnxExport:
    """Export `gm` (called as `gm(*args, **kwargs)`; default: its example inputs) to `path`.

    dynamic: batch and sequence axes (dims 0 and 1 of each input) stay symbolic.
    dtype: "float32", or "float16" (ONNX Runtime's float16 converter; inputs and outputs stay
    float32).
    quant: "nf4": NF4 weights as MatMulBnb4 (the file keeps peftc's bytes), other weights float;
    "int4": NF4 weights requantized to MatMulNBits (`int4_block_size`, `int4_accuracy_level`: 4
    computes in int8; adds error, see `notes`); "int8": every linear weight but the heads
    (capture's `full_precision`) int8 per output channel, activations quantized at run time (ONNX
    Runtime's dynamic quantization; NF4 weights decoded first); "int4_int8": the same linears as
    4-bit codes with a 4-bit multiplier per block of 32 and a scale per channel, which Runtime
    expands to int8 at load and runs with its int8 kernels (a 4-bit file at int8's speed, see
    `int4_int8.py`); "float": NF4 weights decoded to
    float MatMuls (no contrib op for them; the largest file).
    merged: require that no unmerged adapter branch is left (a deployment check).
    attention: "fused" (ONNX Runtime's MultiHeadAttention where it computes the op) or "standard"
    (ONNX's own ops, for runtimes without Microsoft's contrib ops).
    """
    start = time.perf_counter()
    path = writable_path(path)
    _check_options(gm, quant, dtype)
    model, int4_weights = onnx_model(
        gm, args, kwargs, dynamic=dynamic, merged=merged, quant=quant, attention=attention
    )
    return quantized_file(
        gm, model, int4_weights, path, quant, dtype, int4_block_size, int4_accuracy_level, start
    )


def quantized_file(
    gm: fx.GraphModule,
    model: onnx.ModelProto,
    int4_weights: set[str],
    path: Path,
    quant: str,
    dtype: str = "float32",
    int4_block_size: int = 32,
    int4_accuracy_level: int = 0,
    start: float | None = None,
) -> OnnxExport:
    """`onnx_model`'s model of `gm` (exported for `quant`: NF4 weights kept for "nf4", decoded
    otherwise) quantized as `quant` asks, optimized and written to `path`."""
    start = time.perf_counter() if start is None else start
    notes: list[str] = []
    counts = [("torch.onnx", len(model.graph.node))]
    model = optimize(model)
    counts.append(("optimized", len(model.graph.node)))
    model, int4_weights = _packed(model, int4_weights, peftc_meta(gm).get("full_precision", ()))
    counts.append(("sibling linears packed", len(model.graph.node)))
    if quant == "int4":
        model = _int4(model, int4_weights, int4_block_size, int4_accuracy_level, notes)
    model = finish(model, dtype)
    if quant == "int8":
        model = _int8(model, gm, notes)
    elif quant == "int4_int8":
        model = _int4_int8(model, gm, notes)
    if len(model.graph.node) != counts[-1][1]:
        counts.append((quant if dtype == "float32" else f"{quant}, {dtype}", len(model.graph.node)))
    seconds = time.perf_counter() - start
    info = dict(dtype=dtype, quant=quant, seconds=seconds, notes=notes, node_counts=counts)
    return write(model, path, attention=attention_count(gm), **info)


def _packed(
    model: onnx.ModelProto, int4_weights: set[str], keep: tuple[str, ...]
) -> tuple[onnx.ModelProto, set[str]]:
    """Sibling linears packed into one MatMul each; only weights quantized alike share one (NF4
    weights to requantize, heads int8 leaves in float)."""
    model, packed = pack_sibling_linears(
        model, lambda node: (node.inputs[1].name in int4_weights, kept(node.metadata_props, keep))
    )
    for name, holds in packed.items():
        if holds[0] in int4_weights:
            int4_weights = (int4_weights - set(holds)) | {name}
    return model, int4_weights


def _int4(
    model: onnx.ModelProto, weights: set[str], block_size: int, level: int, notes: list[str]
) -> onnx.ModelProto:
    model, error = requantize_int4(model, weights, block_size, level)
    notes.append(
        f"{len(weights)} NF4 weights requantized to int4 (MatMulNBits, blocks of {block_size}, "
        f"accuracy level {level}): adds a relative weight error ||W_int4 - W_nf4|| / ||W_nf4|| = "
        f"{error:.4f}"
    )
    return model


def _int8(model: onnx.ModelProto, gm: fx.GraphModule, notes: list[str]) -> onnx.ModelProto:
    model, count = quantize_int8(model, tuple(peftc_meta(gm).get("full_precision", ())))
    notes.append(
        f"{count} linear weights int8 per output channel, activations quantized at run time "
        "(ONNX Runtime's dynamic quantization)"
    )
    return model


def _int4_int8(model: onnx.ModelProto, gm: fx.GraphModule, notes: list[str]) -> onnx.ModelProto:
    keep = tuple(peftc_meta(gm).get("full_precision", ()))
    model, count, error = quantize_int4_int8(model, keep)
    if not count:
        notes.append(
            "int4_int8 left every weight float: the graph has no float32 linear (MatMul or Gemm on "
            f"a weight) outside the heads kept in full precision ({', '.join(keep) or 'none'})"
        )
        return model
    notes.append(
        f"{count} linear weights int4 in blocks of {INT4_INT8_GROUP} (4-bit multipliers of a "
        "per-channel scale), expanded to int8 when ONNX Runtime loads the file and run by its int8 "
        f"kernels; adds a relative weight error ||W_int4 - W|| / ||W|| = {error:.4f}"
    )
    return checked(model)


def _check_options(gm: fx.GraphModule, quant: str, dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if quant not in _QUANT:
        raise ExportError(f"quant must be one of {', '.join(_QUANT)}, got {quant!r}")
    if quant == "int4" and not any(n.target is NF4_LINEAR for n in gm.graph.nodes):
        raise ExportError(
            "quant='int4' requantizes the graph's NF4 weights, and it has none: apply nf4 first "
            "(heads stay float, as in QLoRA), or choose quant='int8'"
        )
    if quant in ("int8", "int4_int8") and dtype != "float32":
        raise ExportError(f"quant={quant!r} quantizes float32 weights: export with dtype='float32'")


def attention_count(gm: fx.GraphModule) -> int:
    """The graph's attention ops (aten's SDPA, or peftc's causal form of it)."""
    return sum(
        n.op == "call_function"
        and n.target in (aten.scaled_dot_product_attention.default, causal_sdpa)
        for n in gm.graph.nodes
    )


def onnx_model(
    gm: fx.GraphModule,
    args: tuple | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
    merged: bool = False,
    quant: str = "nf4",
    attention: str = "fused",
) -> tuple[onnx.ModelProto, set[str]]:
    """The unoptimized float32 ONNX model of `gm`, and the names of the dense weights that stand in
    for NF4 weights when `quant="int4"` ([K, N] initializers, to requantize)."""
    if attention not in _ATTENTION:
        raise ExportError(f"attention must be one of {', '.join(_ATTENTION)}, got {attention!r}")
    inputs = _positional(gm, args, kwargs)
    _check_translatable(gm)
    if merged:
        _check_merged(gm)
    lowered, int4_weights = _lower(gm, quant)
    register_schemas()
    try:
        program = export_program(lowered, inputs, dynamic=dynamic)
    except CaptureError as e:
        raise ExportError(
            f"could not export the graph again before translating it to ONNX: {e}"
        ) from e
    try:
        with quiet():
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                optimize=False,
                custom_translation_table=translations(attention == "fused"),
            )
    except Exception as e:
        raise ExportError(_conversion_message(gm, e)) from e
    named = set()
    for value, name in zip(onnx_program.model.graph.outputs, _output_names(program), strict=True):
        if id(value) not in named:  # one tensor returned twice keeps its first name
            value.name = name
            named.add(id(value))
    model = onnx_program.model_proto
    _name_dims(model, [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"])
    return model, int4_weights


def _name_dims(model: onnx.ModelProto, user_inputs: list[str]) -> None:
    """Export's symbols (`s72`, `s43`) renamed by `dim_names`, for people and for ONNX Runtime (one
    batch dim)."""
    inputs = [i for i in model.graph.input if i.name in user_inputs]
    renamed = dim_names(
        [
            (i.name, [d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim])
            for i in inputs
        ]
    )
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renamed:
                dim.dim_param = renamed[dim.dim_param]


def _output_names(program: torch.export.ExportedProgram) -> list[str]:
    """Names from the model's output structure: `logits` for a ModelOutput, `output_0`, ... for
    tuples."""
    spec = program.call_spec.out_spec
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    computed = program.graph_signature.user_outputs  # None: a constant, not an ONNX output
    for (path, _), value in zip(pytree.tree_flatten_with_path(tree)[0], computed, strict=True):
        if value is None:
            continue
        parts = [
            str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path
        ]
        names.append("_".join(parts) if parts else "output")
    return [name if name[0].isalpha() else f"output_{name}" for name in names]


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer (never folding graph inputs), the Identity nodes torch.onnx leaves
    where a transpose pair cancelled removed, and equal constants stored once."""
    import onnxscript.optimizer
    from onnxscript import ir

    with quiet():
        model = onnxscript.optimizer.optimize(model)
        graph = ir.from_proto(model)
        ir.passes.common.IdentityEliminationPass()(graph)
        # a weight used twice is transposed into two equal constants by the folding
        ir.passes.common.DeduplicateHashedInitializersPass()(graph)
        cleaned = ir.to_proto(graph)
    # an Identity between two outputs (one tensor returned twice) goes with a name: keep it
    if [o.name for o in cleaned.graph.output] == [o.name for o in model.graph.output]:
        model = cleaned
    return model


def finish(model: onnx.ModelProto, dtype: str) -> onnx.ModelProto:
    """Convert an optimized model to float16 if asked, and check it."""
    with quiet():
        if dtype == "float16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    return checked(model)


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {e}") from e
    return model


def write(model: onnx.ModelProto, path: Path, **info: Any) -> OnnxExport:
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf's 2 GiB limit
        raise ExportError(
            f"the ONNX model is too large for one protobuf file ({e}); export a smaller model, or "
            "quantize it first (nf4) so its weights fit in 2 GiB"
        ) from e
    atomic_write(path, data)
    bits, count = _quantized_bits(model)
    return OnnxExport(
        path,
        [i.name for i in model.graph.input if not _is_initializer(model, i.name)],
        [o.name for o in model.graph.output],
        len(data),
        quantized_weights=count,
        quantized_bits_per_weight=bits,
        fused_attention=sum(n.op_type == "MultiHeadAttention" for n in model.graph.node),
        **info,
    )


def writable_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give a file path such as {path / 'model.onnx'}")
    folder = path.parent
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(
            f"cannot write {path}: {folder} is not a writable folder; choose another path"
        )
    return path


def _positional(gm: fx.GraphModule, args: tuple | None, kwargs: dict[str, Any] | None) -> tuple:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    if args is None and kwargs is None:
        example = peftc_meta(gm).get("example_inputs")
        if not example:
            raise ExportError("this graph has no example inputs; pass args=(...) to export")
        return tuple(example.values())
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args or ())
    kwargs = dict(kwargs or {})
    unknown = set(kwargs) - set(names[len(args) :])
    if len(args) > len(names) or unknown:
        raise ExportError(
            f"the graph takes ({', '.join(names)}); got {len(args)} positional inputs and keyword "
            f"inputs {sorted(kwargs)}"
        )
    missing = [n for n in names[len(args) :] if n not in kwargs]
    if missing:
        raise ExportError(f"missing inputs {missing}: the graph takes ({', '.join(names)})")
    return args + tuple(kwargs[n] for n in names[len(args) :])


def translations(fused_attention: bool = True) -> dict:
    """`TRANSLATIONS` (less attention's, unless fused) and those of `_LIBRARY_TRANSLATIONS` whose
    op is registered."""
    table = dict(TRANSLATIONS)
    if not fused_attention:
        del table[aten.scaled_dot_product_attention.default]
    for (namespace, name), translation in _LIBRARY_TRANSLATIONS.items():
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if packet is not None:
            table.setdefault(packet.default, translation)
    return table


def _check_translatable(gm: fx.GraphModule) -> None:
    """Ops outside aten/prims need a translation; name the first one without, and where it sits."""
    table = translations()
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace in ("aten", "prims") or target in table:
            continue
        where = node.meta.get("module_path") or "the top-level module"
        inserted_by = node.meta.get("peftc", {}).get("pass")
        if target is NF4_EXPERTS:
            raise ExportError(
                f"node {node.name!r} decodes the NF4 expert stack {node.args[0].target!r} in "
                f'{where}, which no ONNX Runtime op computes: merge(dtype="float32") first (the '
                "file then holds the experts in float), or quantize with nf4(experts=false)"
            )
        hint = (
            f"it belongs to a {inserted_by} branch: merge it first (on NF4 weights: "
            'merge(dtype="float16")), or '
            if inserted_by
            else ""
        )
        raise ExportError(
            f"node {node.name!r} ({target}) in {where} has no ONNX translation; {hint}register one "
            "in peftc.backends.onnx.TRANSLATIONS (an onnxscript function taking the op's "
            "arguments), or rewrite the node into aten ops before exporting"
        )


def _check_merged(gm: fx.GraphModule) -> None:
    record = adapters(gm)
    in_graph = {
        n.meta["peftc"]["adapter"] for n in gm.graph.nodes if n.meta.get("peftc", {}).get("adapter")
    }
    # bottleneck blocks are the model now
    unmerged = sorted(
        name
        for name in in_graph | {name for name, r in record.items() if r.active and not r.merged}
        if name not in record or record[name].method().mergeable
    )
    if unmerged:
        kinds = ", ".join(
            f"{name!r} ({record[name].technique if name in record else 'tagged nodes'})"
            for name in unmerged
        )
        raise ExportError(
            f"merged=True, but the graph still computes the branches of adapter(s) {kinds}. "
            'Merge first (pipeline "..., merge"), or export without merged=True (on the command '
            "line: without --merged) to keep them as separate ops"
        )


def _lower(gm: fx.GraphModule, quant: str) -> tuple[fx.GraphModule, set[str]]:
    """A copy whose NF4 nodes ONNX can take: for "nf4", a flat packed buffer and absmax decoded to
    the input's dtype; for "int4", a dense float32 matmul on a [K, N] weight to requantize."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is NF4_LINEAR]
    if not nodes:
        return gm, set()
    lowered = clone(gm)
    graph = lowered.graph
    int4_weights = set()
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is NF4_LINEAR]:
        x, packed, _, _, _, bias, out_features, in_features, blocksize = node.args
        path = node.meta.get("module_path") or get_attr_path(packed).rpartition(".")[0]
        state = nf4_state(lowered, node)
        with graph.inserting_before(node):
            if quant == "nf4":
                x_dtype = x.meta["val"].dtype if "val" in x.meta else torch.float32
                flat = qualify(path, "weight_nf4_flat")
                decoded = qualify(path, "weight_absmax_decoded")
                set_tensor(lowered, flat, state.packed.reshape(-1), buffer=True)
                set_tensor(lowered, decoded, dequantize_absmax(state).to(x_dtype), buffer=True)
                new_args = (x, graph.get_attr(flat), graph.get_attr(decoded), None, None)
                new_args += (bias, out_features, in_features, blocksize)
                replacement = graph.call_function(NF4_LINEAR, new_args)
            else:
                name = qualify(path, "weight_int4_source")
                dense = dequantize_nf4(state, torch.float32).T.contiguous()
                set_tensor(lowered, name, dense, buffer=True)
                int4_weights.add(name)
                replacement = graph.call_function(aten.matmul.default, (x, graph.get_attr(name)))
                if bias is not None:
                    replacement = graph.call_function(aten.add.Tensor, (replacement, bias))
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)
    lowered.recompile()
    return lowered, int4_weights


def _conversion_message(gm: fx.GraphModule, error: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch.onnx colours its messages
    first = text.partition("\n")[0]
    cause = re.search(r"^<class '(?:[\w.]+\.)?(\w+)'>: (.*)$", text, re.MULTILINE)
    summary = f"{cause.group(1)}: {cause.group(2)}" if cause else f"{type(error).__name__}: {first}"
    found = re.search(r"Error when translating node %(\w+) : .*?target=([\w.:]+)\]", text)
    # decomposition, ONNX building, serialization: torch.onnx's own steps, not a node of the user's
    if not found:
        step = first.removesuffix(" Next steps:") if cause else "torch.onnx.export raised"
        return (
            f"torch.onnx failed in its own export steps, not on a node of this graph. {step} "
            f"{summary}. The chained exception has torch's full trace; to reproduce it outside "
            "peftc: torch.onnx.export(peftc.export_program(gm), dynamo=True)"
        )
    op_name = found.group(2).split("::")[-1].split(".")[0]
    paths = sorted(
        {
            n.meta.get("module_path") or "top level"
            for n in gm.graph.nodes
            if n.op == "call_function" and op_name in str(n.target)
        }
    )
    where = f"node {found.group(1)} ({found.group(2)})" + (
        f" in {', '.join(paths[:5])}" if paths else ""
    )
    return (
        f"torch.onnx could not translate {where}: {summary}. Rewrite that node into ops ONNX has, "
        "or register a translation in peftc.backends.onnx.TRANSLATIONS"
    )


def _is_initializer(model: onnx.ModelProto, name: str) -> bool:
    return any(init.name == name for init in model.graph.initializer)


def _quantized_bits(model: onnx.ModelProto) -> tuple[float, int]:
    """Bits per weight of the 4-bit weights in the file (codes plus their statistics)."""
    inits = {init.name: init for init in model.graph.initializer}
    bits = count = 0
    counted = set()  # a weight two nodes share counts once
    for node in model.graph.node:
        if node.op_type in ("MatMulBnb4", "MatMulNBits"):
            stored = [inits[name] for name in node.input[1:4] if name in inits]
        elif node.op_type == "DynamicQuantizeMatMul":
            stored = _int4_int8_parts(node, inits)
        else:
            continue
        if not stored or stored[0].name in counted:
            continue
        counted.add(stored[0].name)
        if node.op_type == "DynamicQuantizeMatMul":
            count += math.prod(stored[0].dims)
        else:
            attrs = {a.name: a.i for a in node.attribute}
            count += attrs["K"] * attrs["N"]
        bits += sum(_tensor_bytes(tensor) * 8 for tensor in stored)
    return (bits / count if count else 0.0), count


def _int4_int8_parts(node: onnx.NodeProto, inits: dict) -> list[onnx.TensorProto]:
    """The int4 codes, multipliers and scales an int4_int8 DynamicQuantizeMatMul reads."""
    prefix = node.input[2].removesuffix("_int4_scales")
    names = [f"{prefix}_int4_{part}" for part in ("codes", "multipliers", "scales")]
    return [inits[n] for n in names] if all(n in inits for n in names) else []


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (math.prod(tensor.dims) + 1) // 2
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize


def linear_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights of matrix products in `model` (MatMul/Gemm initializers and 4-bit
    weights with their statistics, each tensor once); embeddings and norms not counted."""
    inits = {init.name: init for init in model.graph.initializer}
    weights: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            stored = [inits[n] for n in node.input[1:2] if n in inits and len(inits[n].dims) == 2]
        elif node.op_type in ("MatMulBnb4", "MatMulNBits"):
            stored = [inits[n] for n in node.input[1:4] if n in inits]
        elif node.op_type == "MatMulInteger":
            stored = [inits[n] for n in node.input[1:2] if n in inits]  # int8's scales not counted
        elif node.op_type == "DynamicQuantizeMatMul":
            stored = _int4_int8_parts(node, inits)
        else:
            continue
        weights.update((tensor.name, tensor) for tensor in stored)
    return sum(_tensor_bytes(tensor) for tensor in weights.values())
