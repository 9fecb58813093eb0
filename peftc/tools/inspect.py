"""Looking at a graph: node tables, parameter summaries, diffs, networkx and DOT/SVG views."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx

from peftc.ir.graph import input_dim_names, module_path, module_type, peftc_meta, shape_text
from peftc.ir.targets import compile_pattern, select
from peftc.tools.drawing import save_graph, to_dot

__all__ = ["show", "summary", "Summary", "diff", "GraphDiff", "to_networkx", "to_dot", "save_graph"]


def show(
    gm: fx.GraphModule,
    targets: str | None = None,
    *,
    max_rows: int | None = None,
    bookkeeping: bool = False,
) -> str:
    """A table of the graph's nodes (optionally only those under module paths matching
    `targets`), followed by the parameter summary and the passes that ran. Export's bookkeeping
    (shape asserts and size arithmetic) is left out and counted unless `bookkeeping`."""
    # a pattern that matches no module path is an error naming near paths, as everywhere
    if targets:
        select(
            targets,
            sorted({module_path(n) for n in gm.graph.nodes if module_path(n)}),
            what="module",
        )
    matches = compile_pattern(targets) if targets else None
    nodes = [n for n in gm.graph.nodes if not matches or matches(module_path(n))]
    kept = [n for n in nodes if bookkeeping or not is_bookkeeping(n)]
    hidden = len(nodes) - len(kept)
    rows = [("node", "op", "target", "module", "shape", "peftc"), *_rows(kept, gm)]
    shown = rows if max_rows is None else rows[: max_rows + 1]
    widths = [min(max(len(r[i]) for r in shown), 48) for i in range(len(rows[0]))]
    lines = [_header(gm, len(gm.graph.nodes))]
    lines += [
        "  ".join(c[:w].ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in shown
    ]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more nodes")
    if hidden:
        lines.append(f"({hidden} bookkeeping nodes not shown: shape asserts, size arithmetic)")
    lines += ["", str(summary(gm))]
    history = peftc_meta(gm).get("history") or []
    if history:
        lines += ["", "passes: " + ", ".join(h["pass"] for h in history)]
    return "\n".join(lines)


def _rows(nodes: list[fx.Node], gm: fx.GraphModule) -> list[tuple[str, ...]]:
    dims = input_dim_names(gm)
    rows = []
    for n in nodes:
        tag = n.meta.get("peftc")
        role = f"{tag['pass']}:{tag['role']}" if tag else ""
        rows.append((n.name, n.op, _target_name(n), module_path(n), _shape(n, dims), role))
    return rows


def is_bookkeeping(node: fx.Node) -> bool:
    """A node that computes no tensor of the model: export's asserts on shapes and dtypes, and the
    integer arithmetic on sizes."""
    if node.op != "call_function":
        return False
    if "assert" in getattr(node.target, "__name__", str(node.target)):
        return True
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool, int, bool))


@dataclass(frozen=True)
class Summary:
    """Parameter counts and storage. Weights stored quantized (as buffers) count as frozen
    parameters, as transformers counts a 4-bit model's; `bits_per_weight` is storage bits over
    them all."""

    total: int
    trainable: int
    frozen: int
    parameter_bytes: int
    buffer_bytes: int
    by_dtype: dict[str, int]
    quantized_weights: int = 0  # of `total`: weights stored quantized (buffers, not parameters)
    quantized_bytes: int = 0  # their storage, statistics included

    @property
    def bytes(self) -> int:
        return self.parameter_bytes + self.buffer_bytes

    @property
    def bits_per_weight(self) -> float:
        """Over every weight, parameters and quantized buffers together."""
        stored = self.parameter_bytes + self.quantized_bytes
        return 8 * stored / self.total if self.total else 0.0

    @property
    def quantized_bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        dtypes = ", ".join(f"{k}: {v:,}" for k, v in self.by_dtype.items())
        text = (
            f"parameters: {self.total:,} total, {self.trainable:,} trainable "
            f"({100 * self.trainable_fraction:.3f} %), {self.frozen:,} frozen\nstorage: "
            f"{_bytes(self.parameter_bytes)} parameters + {_bytes(self.buffer_bytes)} buffers, "
            f"{self.bits_per_weight:.2f} bits per weight ({dtypes})"
        )
        if self.quantized_weights:
            text += (
                f"\nquantized: {self.quantized_weights:,} of the frozen weights in "
                f"{_bytes(self.quantized_bytes)}, {self.quantized_bits_per_weight:.3f} bits each"
            )
        return text


def summary(gm: torch.nn.Module) -> Summary:
    params = list(gm.parameters())  # unique: tied weights count once
    by_dtype: dict[str, int] = defaultdict(int)
    for p in params:
        by_dtype[str(p.dtype).removeprefix("torch.")] += p.numel()
    quantized = peftc_meta(gm).get("quantized", {}) if isinstance(gm, fx.GraphModule) else {}
    prefixes = tuple(f"{path}.weight_" if path else "weight_" for path in quantized)
    quantized_bytes = sum(
        b.numel() * b.element_size() for name, b in gm.named_buffers() if name.startswith(prefixes)
    )
    quantized_weights = sum(quantized.values())
    return Summary(
        total=sum(p.numel() for p in params) + quantized_weights,
        trainable=sum(p.numel() for p in params if p.requires_grad),
        frozen=sum(p.numel() for p in params if not p.requires_grad) + quantized_weights,
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in gm.buffers()),
        by_dtype=dict(by_dtype),
        quantized_weights=quantized_weights,
        quantized_bytes=quantized_bytes if quantized else 0,
    )


@dataclass(frozen=True)
class GraphDiff:
    """What changed between two versions of a graph (nodes matched by name)."""

    nodes_added: tuple[str, ...]
    nodes_removed: tuple[str, ...]
    params_added: tuple[str, ...]
    params_removed: tuple[str, ...]
    now_frozen: tuple[str, ...]
    now_trainable: tuple[str, ...]
    modules: tuple[str, ...]
    before: Summary
    after: Summary

    @property
    def changed(self) -> bool:
        return any(
            (
                self.nodes_added,
                self.nodes_removed,
                self.params_added,
                self.params_removed,
                self.now_frozen,
                self.now_trainable,
            )
        )

    def __str__(self) -> str:
        if not self.changed:
            return "no changes"

        def listed(label: str, items: tuple[str, ...], limit: int = 8) -> str:
            more = f", ... {len(items) - limit} more" if len(items) > limit else ""
            return f"{label} ({len(items)}): {', '.join(items[:limit])}{more}"

        parts = [
            listed("nodes added", self.nodes_added),
            listed("nodes removed", self.nodes_removed),
            listed("parameters added", self.params_added),
            listed("parameters removed", self.params_removed),
            listed("now frozen", self.now_frozen),
            listed("now trainable", self.now_trainable),
            listed("modules touched", self.modules),
        ]
        lines = [p for p in parts if "(0)" not in p]
        lines.append(
            f"trainable parameters: {self.before.trainable:,} -> {self.after.trainable:,}; "
            f"storage: {_bytes(self.before.bytes)} -> {_bytes(self.after.bytes)}"
        )
        return "\n".join(lines)


def diff(before: fx.GraphModule, after: fx.GraphModule) -> GraphDiff:
    old = {n.name: n for n in before.graph.nodes}
    new = {n.name: n for n in after.graph.nodes}
    old_params = dict(before.named_parameters())
    new_params = dict(after.named_parameters())
    added = tuple(name for name in new if name not in old)
    removed = tuple(name for name in old if name not in new)
    modules = {module_path(new[n]) for n in added} | {module_path(old[n]) for n in removed}
    common = [k for k in new_params if k in old_params]
    return GraphDiff(
        nodes_added=added,
        nodes_removed=removed,
        params_added=tuple(k for k in new_params if k not in old_params),
        params_removed=tuple(k for k in old_params if k not in new_params),
        now_frozen=tuple(
            k for k in common if old_params[k].requires_grad and not new_params[k].requires_grad
        ),
        now_trainable=tuple(
            k for k in common if new_params[k].requires_grad and not old_params[k].requires_grad
        ),
        modules=tuple(sorted(m for m in modules if m)),
        before=summary(before),
        after=summary(after),
    )


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph as a networkx DiGraph: one vertex per node (keyed by name), edges from
    each input to its user, attributes `op`, `target`, `module_path`, `module_type`,
    `shape` and `peftc` (the tag of inserted nodes)."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(
            n.name,
            op=n.op,
            target=_target_name(n),
            module_path=module_path(n),
            module_type=module_type(n),
            shape=_shape(n),
            peftc=n.meta.get("peftc"),
        )
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g


def _header(gm: fx.GraphModule, count: int) -> str:
    info = peftc_meta(gm).get("capture")
    origin = f" captured by {info['method']} from {info['class']}" if info else ""
    return f"GraphModule{origin}: {count} nodes"


def _target_name(n: fx.Node) -> str:
    if isinstance(n.target, (str, torch._ops.OpOverload)):
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target))


def _shape(n: fx.Node, dims: dict[str, str] | None = None) -> str:
    """`[batch, sequence, 64] float32`: export's symbols named by `dims` where given."""
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"[{shape_text(val.shape, dims)}] {str(val.dtype).removeprefix('torch.')}"
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return f"{len(val)} tensors"
    return ""


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"
