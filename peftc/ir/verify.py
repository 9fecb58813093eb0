"""Checks the pass manager runs after every pass.

1. `graph.lint()`: the graph is well formed.
2. Shape propagation with fake tensors from the captured inputs (symbolic batch and
   sequence sizes for exported graphs): every op accepts its inputs' shapes and dtypes.
   Each node's `meta["val"]` is refreshed, so passes can read shapes of inserted nodes.
3. On request, numerics: a pass that declares `preserves_outputs` leaves the outputs
   on the example inputs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from peftc.errors import VerificationError
from peftc.ir.graph import module_path, peftc_meta

__all__ = ["lint", "propagate_shapes", "example_outputs", "compare_outputs"]


def lint(gm: fx.GraphModule, pass_name: str) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"pass {pass_name!r} left a malformed graph: {e}") from e


def propagate_shapes(gm: fx.GraphModule, pass_name: str) -> bool:
    """Fake-tensor shape propagation; False when the graph has no recorded input shapes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in placeholders]
    if not placeholders or any(v is None for v in values):
        return False
    mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if mode is None:
        mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
    interpreter = _NodeTrackingProp(gm, mode)
    # in eval mode: shapes are the same, and training's random draws would be data-dependent
    was_training = gm.training
    gm.eval()
    try:
        with mode:
            interpreter.propagate_dont_convert_inputs(*values)
    except Exception as e:
        node = interpreter.current
        raise VerificationError(
            f"after pass {pass_name!r}, shape propagation failed{_where(node)}: "
            f"{type(e).__name__}: {e}".strip()
        ) from e
    finally:
        gm.train(was_training)
    return True


class _NodeTrackingProp(FakeTensorProp):
    """Recomputes only nodes that are new, changed, or fed by a node whose shape or dtype
    changed: a pass touches a few sites, and symbolic-shape propagation costs about 1 ms a node."""

    current: fx.Node | None = None

    def __init__(self, gm: fx.GraphModule, mode: Any):
        super().__init__(gm, mode)
        self.recomputed: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        key = propagation_key(self.module, n)
        if n.op == "placeholder":  # fed its own meta["val"]
            return super().run_node(n)
        unchanged = (
            "val" in n.meta
            and n.meta.get("peftc_prop_key") == key
            and not any(a in self.recomputed for a in n.all_input_nodes)
        )
        if unchanged:
            return n.meta["val"]
        before = _signature(n.meta.get("val"))
        result = super().run_node(n)
        n.meta["peftc_prop_key"] = key
        # A branch added to a residual stream keeps its shape: stop there, not at the graph's end.
        if before is None or _signature(n.meta.get("val")) != before:
            self.recomputed.add(n)
        return result


def _signature(val: Any) -> str | None:
    """Shapes and dtypes of a node's value, as text (comparing symbolic sizes directly adds
    guards)."""
    leaves = pytree.tree_leaves(val)
    if not leaves:
        return None
    return repr(
        [(str(t.shape), t.dtype) if isinstance(t, torch.Tensor) else str(t) for t in leaves]
    )


def propagation_key(gm: fx.GraphModule, n: fx.Node) -> tuple:
    """What a node's fake value depends on besides its inputs' values."""
    args = fx.node.map_arg((n.args, n.kwargs), lambda a: a.name)
    key: tuple = (n.op, str(n.target), repr(args))
    if n.op == "get_attr":
        value = gm
        for part in str(n.target).split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor):
            key += (tuple(value.shape), value.dtype)
    return key


def mark_propagated(gm: fx.GraphModule) -> None:
    """Record that every node's `meta["val"]` is current (after capture)."""
    for n in gm.graph.nodes:
        if "val" in n.meta:
            n.meta["peftc_prop_key"] = propagation_key(gm, n)


def _where(node: fx.Node | None) -> str:
    """The failing node, and what inserted it where its tag says (a technique's adapter at a
    site)."""
    if node is None:
        return ""
    where = (
        f" at node {node.name} ({node.op} {_target(node)}) of module "
        f"{module_path(node) or '<root>'}"
    )
    tag = node.meta.get("peftc", {})
    if "adapter" in tag:
        site = f" at the {tag['kind']} site {tag['site']!r}" if tag.get("site") is not None else ""
        where += (
            f", inserted by {tag['pass']!r} for adapter {tag['adapter']!r}{site} (role "
            f"{tag['role']!r}); {tag['pass']} cannot act on this site: it should refuse it in its "
            "check()"
        )
    return where


def _target(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def example_outputs(gm: fx.GraphModule) -> list[torch.Tensor] | None:
    """Flat outputs of `gm` on its captured example inputs in eval mode, or None without
    examples."""
    inputs = peftc_meta(gm).get("example_inputs")
    if not inputs or any(
        isinstance(v, torch.Tensor) and v.device.type == "meta" for v in inputs.values()
    ):
        return None
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            out = gm(**inputs)
    finally:
        gm.train(was_training)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def compare_outputs(
    before: list[torch.Tensor],
    after: list[torch.Tensor] | None,
    pass_name: str,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    if after is None or len(before) != len(after):
        raise VerificationError(
            f"pass {pass_name!r} changed the number of outputs, though it declares "
            "preserves_outputs"
        )
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
            diff = (
                (a.float() - b.float()).abs().max().item()
                if a.shape == b.shape
                else f"shape {tuple(a.shape)} -> {tuple(b.shape)}"
            )
            raise VerificationError(
                f"pass {pass_name!r} declares preserves_outputs but changed output {i} (max abs "
                f"diff {diff}); fix the pass or register it with preserves_outputs=False"
            )
