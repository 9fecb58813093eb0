"""Export-time rewrites of the ONNX graph that ONNX Runtime's own optimizer does not make.

`pack_sibling_linears`: linears that read the same tensor (an attention block's query, key and
value projections; a gated MLP's gate and up projections) become one MatMul on their weights
concatenated along N, one Add of the concatenated biases, and a Split back into the tensors the
graph used. One wide matmul keeps more of a CPU busy than three narrow ones, and 4-bit kernels
(MatMulNBits) that trail fp32 at N=384 pull ahead at N=1152. Each output column is the same dot
product as before, so the outputs are the same.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["pack_sibling_linears", "linears", "Linear", "take_place"]


@dataclass
class Linear:
    """A MatMul on a weight initializer and the bias Add after it when there is one, or a plain
    Gemm (torch.onnx's linear on 2-D inputs) with its bias."""

    matmul: ir.Node  # MatMul or Gemm
    weight: ir.Value  # initializer: [K, N], or [N, K] for a Gemm with transB
    add: ir.Node | None  # the bias Add the MatMul feeds, when it feeds only that
    bias: ir.Value | None  # [N] initializer

    @property
    def output(self) -> ir.Value:
        return (self.add or self.matmul).outputs[0]

    @property
    def nodes(self) -> list[ir.Node]:
        return [self.matmul, self.add] if self.add else [self.matmul]

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored [N, K] (a Gemm with transB)."""
        return self.matmul.op_type == "Gemm" and bool(self.matmul.attributes.get_int("transB", 0))

    def weight_kn(self) -> np.ndarray:
        weight = self.weight.const_value.numpy()
        return weight.T if self.transposed else weight


def pack_sibling_linears(
    model: onnx.ModelProto, kind: Callable[[ir.Node], Hashable]
) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """Pack linears that read the same input and have the same `kind(matmul)`: only linears of one
    kind (weights to quantize alike, say) share a MatMul. Returns the model and, per packed
    weight, the names of the weights it holds, in order."""
    graph = ir.from_proto(model)
    groups: dict[Hashable, list[Linear]] = defaultdict(list)
    for linear in linears(graph.graph):
        node = linear.matmul
        groups[(id(node.inputs[0]), linear.bias is not None, kind(node))].append(linear)
    packed = {}
    for members in groups.values():
        if len(members) > 1:
            name, holds = _pack(graph.graph, members)
            packed[name] = holds
    return ir.to_proto(graph), packed


def linears(graph: ir.Graph) -> list[Linear]:
    """The graph's linears, in order."""
    return [linear for node in graph if (linear := _linear(node)) is not None]


def _linear(node: ir.Node) -> Linear | None:
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
        return None
    weight = node.inputs[1]
    if weight is None or not weight.is_initializer() or len(weight.const_value.shape) != 2:
        return None
    if node.op_type == "Gemm":
        return _gemm(node, weight)
    output = node.outputs[0]
    uses = list(output.uses())
    if output.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add":
        return Linear(node, weight, None, None)
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    if not _is_vector(bias, weight.const_value.shape[1]):
        return Linear(node, weight, None, None)
    return Linear(node, weight, add, bias)


def _gemm(node: ir.Node, weight: ir.Value) -> Linear | None:
    """A Gemm that is a linear: A not transposed, alpha and beta 1, a bias of N values or none."""
    attributes = node.attributes
    if attributes.get_int("transA", 0) or attributes.get_float("alpha", 1.0) != 1.0:
        return None
    if attributes.get_float("beta", 1.0) != 1.0:
        return None
    n = weight.const_value.shape[0 if attributes.get_int("transB", 0) else 1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not _is_vector(bias, n):
        return None
    return Linear(node, weight, None, bias)


def _is_vector(value: ir.Value | None, n: int) -> bool:
    return value is not None and value.is_initializer() and tuple(value.const_value.shape) == (n,)


def _pack(graph: ir.Graph, members: list[Linear]) -> tuple[str, list[str]]:
    first = members[0]
    weights = [m.weight_kn() for m in members]
    weight = _initializer(graph, f"{first.weight.name}_packed", np.concatenate(weights, axis=1))
    widths = [w.shape[1] for w in weights]
    name = first.matmul.name
    matmul = ir.node(
        "MatMul",
        [first.matmul.inputs[0], weight],
        name=f"{name}_packed",
        metadata_props=dict(first.matmul.metadata_props),
    )
    nodes = [matmul]
    if first.bias is not None:
        bias = np.concatenate([m.bias.const_value.numpy() for m in members])
        bias = _initializer(graph, f"{first.bias.name}_packed", bias)
        nodes.append(ir.node("Add", [matmul.outputs[0], bias], name=f"{name}_packed_bias"))
    sizes = _initializer(graph, f"{first.weight.name}_split", np.array(widths, dtype=np.int64))
    split = ir.node(
        "Split",
        [nodes[-1].outputs[0], sizes],
        {"axis": -1},
        num_outputs=len(members),
        name=f"{name}_packed_split",
    )
    nodes.append(split)
    graph.insert_before(first.matmul, nodes)
    old = [m.output for m in members]
    ir.convenience.replace_all_uses_with(old, list(split.outputs), replace_graph_outputs=True)
    for m in members:
        graph.remove(m.nodes, safe=True)
        for value in (m.weight, m.bias):
            if value is not None and not value.uses():
                graph.initializers.pop(value.name)
    for value, replaced in zip(split.outputs, old, strict=True):
        take_place(value, replaced)
    return weight.name, [m.weight.name for m in members]


def take_place(value: ir.Value, replaced: ir.Value) -> None:
    """`value` under the name, type and shape of the value it replaced (graph outputs keep their
    names and types)."""
    value.name, value.type, value.shape = replaced.name, replaced.type, replaced.shape


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer, named `name` or, where the optimizer shares that tensor (zero biases),
    `name_1`, ..."""
    taken, base, i = graph.initializers, name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
