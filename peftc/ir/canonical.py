"""Canonical forms: every computation equal to a linear layer becomes one `aten.linear` node.

Sites are recognised by what a computation is, not by the op that spelt it, so a module that
writes `x @ self.weight.T + self.bias` (Falcon's `FalconLinear`, hand-written layers) is a linear
site like `nn.Linear`. `canonicalize(gm)` rewrites, in place:

1. `matmul(x, W.T)` -> `linear(x, W)`: any rank of x (`aten.matmul`, `operator.matmul`,
   `torch.matmul`, `Tensor.matmul`).
2. `mm(x, W.T)` -> `linear(x, W)`: 2-D x.
3. `addmm(b, x, W.T)` -> `linear(x, W, b)` when beta = alpha = 1.
4. Case 1 or 2 followed by `add(., b)` or `add(b, .)` -> `linear(x, W, b)` when that add is the
   product's only user.

`W` is a `get_attr` of a 2-D tensor stored (out, in); `W.T` is any transpose of it (`t`,
`numpy_T`, `mT`, `transpose(0, 1)`, `permute([1, 0])`, `.T`, as aten ops, torch functions or
methods); `b` is a `get_attr` of a 1-D tensor of size out. Nothing else is rewritten, in
particular not GPT-2's `Conv1D` (`addmm(b, x, W)` with W stored (in, out)): linear sites take it as
it is (`fan_in_fan_out=True`), where a rewrite would need a transposed copy of the weight.

The new node takes the metadata of the node it replaces (`val`, `nn_module_stack`, ...), with
`module_path` set to the module owning W and no `peftc` tag, so sites see it as a base node.
Transposes left without users are erased; nothing else is.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from peftc.ir.graph import get_attr_path, get_tensor, peftc_meta

__all__ = ["canonicalize"]

aten = torch.ops.aten

# x @ W.T, for x of any rank (1) or 2-D (2)
_PRODUCTS = {
    aten.matmul.default,
    operator.matmul,
    torch.matmul,
    "matmul",
    aten.mm.default,
    torch.mm,
    "mm",
}
# b + x @ W.T with beta = alpha = 1 (3)
_ADDMMS = {aten.addmm.default, torch.addmm}
# product + b (4)
_ADDS = {aten.add.Tensor, operator.add, torch.add}
# W.T of a 2-D W
_TRANSPOSE_ATTRS = {"T", "mT"}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.mT.default, torch.t, "t"}
_TRANSPOSES_DIMS = {aten.transpose.int, torch.transpose, "transpose"}
_PERMUTES = {aten.permute.default, torch.permute, "permute"}


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite every linear computation of `gm` to `aten.linear`; the number of rewrites."""
    count = 0
    for node in list(gm.graph.nodes):
        if node._erased or "peftc" in node.meta:  # erased by an earlier rewrite, or a pass's own
            continue
        match = _match_linear(gm, node)
        if match is not None:
            _rewrite(gm, *match)
            count += 1
    if count:
        gm.recompile()
    return count


def _match_linear(
    gm: fx.GraphModule, node: fx.Node
) -> tuple[list[fx.Node], fx.Node, fx.Node, fx.Node | None] | None:
    """(replaced nodes, last first; x; W; b) when `node` starts a linear computation, else None."""
    if _is(node, _ADDMMS):  # (3)
        b, x, wt = node.args
        w = _transposed_weight(gm, wt)
        if w is None or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        return ([node, wt], x, w, b) if _is_bias(gm, b, w) else None
    if not _is(node, _PRODUCTS) or len(node.args) != 2 or node.kwargs:
        return None
    x, wt = node.args
    w = _transposed_weight(gm, wt)
    if w is None:
        return None
    users = list(node.users)
    # (4)
    if len(users) == 1 and _is(users[0], _ADDS) and not users[0].kwargs and len(users[0].args) == 2:
        add = users[0]
        b = add.args[1] if add.args[0] is node else add.args[0]
        if _is_bias(gm, b, w):
            return [add, node, wt], x, w, b
    return [node, wt], x, w, None  # (1), (2)


def _is(node: fx.Node, targets: set) -> bool:
    if node.op == "call_method":
        return node.target in targets
    return (
        node.op == "call_function" and not isinstance(node.target, str) and node.target in targets
    )


def _transposed_weight(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The `get_attr` W when `node` is W.T for a 2-D W, else None."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    w, rest = node.args[0], node.args[1:]
    path = get_attr_path(w)
    if (
        path is None
        or not isinstance(tensor := get_tensor(gm, path), torch.Tensor)
        or tensor.dim() != 2
    ):
        return None
    if node.op == "call_function" and node.target is getattr:
        return w if rest and rest[0] in _TRANSPOSE_ATTRS else None
    if _is(node, _TRANSPOSES) and not rest:
        return w
    if _is(node, _TRANSPOSES_DIMS) and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        return w if {d % 2 for d in rest} == {0, 1} else None
    if _is(node, _PERMUTES):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return (
            w
            if len(dims) == 2
            and all(isinstance(d, int) for d in dims)
            and [d % 2 for d in dims] == [1, 0]
            else None
        )
    return None


def _is_bias(gm: fx.GraphModule, node: Any, w: fx.Node) -> bool:
    path = get_attr_path(node)
    if path is None:
        return False
    tensor = get_tensor(gm, path)
    return isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (
        get_tensor(gm, str(w.target)).shape[0],
    )


def _rewrite(
    gm: fx.GraphModule, replaced: list[fx.Node], x: fx.Node, w: fx.Node, b: fx.Node | None
) -> None:
    graph, last = gm.graph, replaced[0]
    with graph.inserting_before(last):
        linear = graph.call_function(aten.linear.default, (x, w) if b is None else (x, w, b))
    linear.meta.update({k: v for k, v in last.meta.items() if k != "peftc"})
    owner = str(w.target).rpartition(".")[0]
    # e.g. `x @ self.proj.weight.T` written in a parent module
    if linear.meta.get("module_path") != owner:
        linear.meta["module_path"] = owner
        linear.meta["module_type"] = peftc_meta(gm).get("module_types", {}).get(owner, "")
    last.replace_all_uses_with(linear)
    for node in replaced:  # last first, so each is free once the ones after it are gone
        if not node.users:
            graph.erase_node(node)
