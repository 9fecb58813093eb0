"""Drawings of a graph for people: one display graph, written as DOT for Graphviz or laid out in
layers by peftc itself as SVG (the same picture whether or not Graphviz is installed).

The display graph labels nodes by what they are (`lora: A` of `q_proj`, `NF4 linear` of `o_proj`,
`attention`), bridges shape-only plumbing (views, transposes, slices) so the dataflow shows, and
marks where a selected block's inputs come in and its outputs leave.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import zlib
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import networkx as nx
import torch
from torch import fx

from peftc._io import atomic_write
from peftc.errors import PeftcError
from peftc.ir.graph import input_dim_names, module_path, shape_text
from peftc.ir.targets import compile_pattern

__all__ = ["display_graph", "to_dot", "to_svg", "save_graph"]

# Ops that only move or re-view data: drawn as edges, not boxes.
_PLUMBING = {
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "expand",
    "slice",
    "select",
    "contiguous",
    "clone",
    "alias",
    "detach",
    "t",
    "flatten",
    "unflatten",
    "_to_copy",
    "to",
    "type_as",
    "getitem",
    "sym_size",
    "lift_fresh_copy",
    "_assert_tensor_metadata",
    "split",
    "chunk",
    "split_with_sizes",
    "unbind",
}
_NAMES = {
    "scaled_dot_product_attention": "attention",
    "causal_sdpa": "attention",
    "nf4_linear": "NF4 linear",
    "native_layer_norm": "layer norm",
    "layer_norm": "layer norm",
    "multi_lora_delta": "stacked LoRA",
    "triton_linear": "Triton linear",
}
# Fill colours of inserted nodes, by the pass that made them.
_PALETTE = ["#fde68a", "#bbf7d0", "#bfdbfe", "#fecaca", "#ddd6fe", "#fbcfe8", "#c7d2fe", "#a7f3d0"]
_BASE, _EDGE_IN, _MODULE = "#f3f4f6", "#ffffff", "#e0e7ff"


def pass_colour(pass_name: str) -> str:
    return _PALETTE[zlib.crc32(pass_name.encode()) % len(_PALETTE)]


def display_graph(
    gm: fx.GraphModule,
    *,
    targets: str | None = None,
    collapse: str | None = None,
    params: bool = False,
    detail: bool = False,
) -> nx.DiGraph:
    """What a drawing shows: vertices with `lines` (label), `fill`, `kind` (node, inserted, input,
    output, module) and `cluster` (module path); edges bridged over hidden nodes. `targets` keeps
    nodes under matching module paths (their outside inputs and users become input/output marks),
    `collapse` draws each matching module as one box, `params` shows weights, `detail` shows
    shape-only ops too."""
    keep = compile_pattern(targets) if targets else None
    folds = compile_pattern(collapse) if collapse else None
    g = nx.DiGraph()
    vertex = _add_vertices(g, gm, keep, folds, params=params, detail=detail)
    _add_edges(g, vertex)
    return g


def _add_vertices(
    g: nx.DiGraph, gm: fx.GraphModule, keep, folds, *, params: bool, detail: bool
) -> dict[fx.Node, str | None]:
    """Add a vertex to `g` per shown node, one per folded module; return the vertex of each
    selected node, None for a hidden one (its inputs are bridged)."""
    dims = input_dim_names(gm)
    vertex: dict[fx.Node, str | None] = {}
    folded: dict[str, int] = defaultdict(int)
    for n in gm.graph.nodes:
        if keep is not None and not keep(module_path(n)):
            continue
        hidden = (n.op == "get_attr" and not params) or (_op(n) in _PLUMBING and not detail)
        box = _fold(module_path(n), folds) if folds else None
        if hidden and box is None:
            vertex[n] = None
        elif box is not None:
            vertex[n] = f"module:{box}"
            folded[box] += 1
            g.add_node(
                vertex[n],
                lines=[box, f"{folded[box]} nodes"],
                fill=_MODULE,
                kind="module",
                cluster=box.rpartition(".")[0],
            )
        else:
            vertex[n] = n.name
            g.add_node(n.name, **_describe(n, dims))
    return vertex


def _add_edges(g: nx.DiGraph, vertex: dict[fx.Node, str | None]) -> None:
    """Edges between the vertices, bridged over hidden nodes, and an output mark after each vertex
    read outside the selection."""
    sources: dict[fx.Node, set[str]] = {}
    for n, v in vertex.items():
        for i in n.all_input_nodes if v is not None else ():
            g.add_edges_from((s, v) for s in _visible_sources(i, g, vertex, sources) if s != v)
        if any(u not in vertex for u in n.users):
            leaving = {v} if v is not None else _visible_sources(n, g, vertex, sources)
            for s in leaving - {m for m in g if m.startswith("in:")}:
                g.add_node(f"out:{s}", lines=["output"], fill=_EDGE_IN, kind="output", cluster="")
                g.add_edge(s, f"out:{s}")


def _visible_sources(
    n: fx.Node, g: nx.DiGraph, vertex: dict[fx.Node, str | None], memo: dict[fx.Node, set[str]]
) -> set[str]:
    """The vertices `n`'s value comes from: its own, its inputs' when it is hidden, or an input
    mark (added to `g`) when it is outside the selection."""
    if n in memo:
        return memo[n]
    if n not in vertex and _op(n) == "sym_size":
        found = set()
    elif n not in vertex:  # outside the selection: mark the block input at the first real node
        real = _through_plumbing(n)
        name = f"in:{real.name}"
        g.add_node(
            name,
            lines=["input", _short(module_path(real) or real.name)],
            fill=_EDGE_IN,
            kind="input",
            cluster="",
        )
        found = {name}
    elif vertex[n] is None:  # bridged; weights and sizes (sym_size) carry no dataflow worth an edge
        sized = _op(n) == "sym_size" or n.op == "get_attr"
        found = (
            set()
            if sized
            else set().union(*(_visible_sources(i, g, vertex, memo) for i in n.all_input_nodes))
        )
    else:
        found = {vertex[n]}
    memo[n] = found
    return found


def to_dot(gm: fx.GraphModule, **options: object) -> str:
    """DOT text of `display_graph(gm, **options)`, nodes clustered by module path."""
    g = display_graph(gm, **options)  # type: ignore[arg-type]
    lines = [
        "digraph peftc {",
        '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica", '
        'fontsize=10, fillcolor="#f3f4f6"];',
    ]
    groups: dict[str, list[str]] = defaultdict(list)
    for v, attrs in g.nodes(data=True):
        groups[attrs["cluster"]].append(v)
    _emit_cluster("", _cluster_tree(list(groups)), groups, g, lines, 1)
    lines += [f"  {_q(a)} -> {_q(b)};" for a, b in sorted(g.edges)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(gm: fx.GraphModule, *, title: str = "", **options: object) -> str:
    """An SVG of `display_graph(gm, **options)` in layers, top to bottom, drawn without Graphviz."""
    g = display_graph(gm, **options)  # type: ignore[arg-type]
    return _layered_svg(g, title)


def save_graph(
    gm: fx.GraphModule,
    path: str | Path,
    *,
    renderer: str = "auto",
    title: str | None = None,
    **options: object,
) -> Path:
    """Write a drawing of `gm` to `path`: DOT text for `.dot`; for `.svg`, Graphviz's layout
    (`renderer="graphviz"`), peftc's own layered layout (`"peftc"`, titled `title`), or Graphviz
    when installed else peftc's (`"auto"`). Options as `display_graph`."""
    path = Path(path)
    if renderer not in ("auto", "graphviz", "peftc"):
        raise PeftcError(
            f"save_graph: unknown renderer {renderer!r}; use 'auto', 'graphviz' or 'peftc'"
        )
    if path.suffix == ".dot":
        return atomic_write(path, to_dot(gm, **options))
    if path.suffix != ".svg":
        raise PeftcError(f"save_graph writes .dot or .svg files, not {path.suffix!r}")
    dot = shutil.which("dot")
    if renderer == "graphviz" and dot is None:
        raise PeftcError(
            "renderer='graphviz' needs Graphviz's `dot` program; install graphviz (apt-get install "
            "graphviz) or use renderer='peftc'"
        )
    if dot is not None and renderer != "peftc":
        done = subprocess.run(
            [dot, "-Tsvg"], input=to_dot(gm, **options).encode(), capture_output=True
        )
        if done.returncode == 0 or renderer == "graphviz":
            if done.returncode != 0:
                raise PeftcError(f"Graphviz failed: {done.stderr.decode(errors='replace').strip()}")
            return atomic_write(path, done.stdout)
    return atomic_write(path, to_svg(gm, title=title or path.stem, **options))


# --- labels ---------------------------------------------------------------------------------


def _op(n: fx.Node) -> str:
    if n.op == "call_function":
        if isinstance(n.target, torch._ops.OpOverload):
            return n.target._schema.name.split("::")[-1]
        return getattr(n.target, "__name__", str(n.target))
    if n.op == "call_module":
        return n.meta.get("module_type", str(n.target)).rpartition(".")[2] or str(n.target)
    if n.op == "call_method":
        return str(n.target)
    return n.op


def _describe(n: fx.Node, dims: dict[str, str]) -> dict:
    op, path = _op(n), module_path(n)
    tag = n.meta.get("peftc")
    if n.op == "placeholder":
        lines, fill = [f"input {n.target}"], _EDGE_IN
    elif n.op == "output":
        lines, fill = ["output"], _EDGE_IN
    elif tag:
        role = tag["role"].removeprefix(f"{tag['pass']}_").removesuffix("_out")
        title = (
            _NAMES.get(op, op) if role == "inserted" else f"{tag['pass']}: {role.replace('_', ' ')}"
        )
        lines, fill = [title, _short(tag.get("site") or path)], pass_colour(tag["pass"])
    else:
        weighted = n.op == "call_module" or any(i.op == "get_attr" for i in n.all_input_nodes)
        lines, fill = (
            [_NAMES.get(op, op.replace("_", " "))] + ([_short(path)] if weighted and path else []),
            _BASE,
        )
    val = n.meta.get("val")
    shape = f"[{shape_text(val.shape, dims)}]" if isinstance(val, torch.Tensor) else ""
    return {
        "lines": [line for line in lines if line] + ([shape] if shape else []),
        "fill": fill,
        "kind": "inserted" if tag else "node",
        "cluster": path if n.op not in ("placeholder", "output") else "",
        "pass": tag["pass"] if tag else "",
    }


def _short(path: str) -> str:
    """The last two parts of a module path: `self_attn.q_proj`."""
    return ".".join(path.split(".")[-2:])


def _through_plumbing(n: fx.Node) -> fx.Node:
    while _op(n) in _PLUMBING and n.all_input_nodes:
        n = n.all_input_nodes[0]
    return n


def _fold(path: str, folds) -> str | None:
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        if folds(".".join(parts[:i])):
            return ".".join(parts[:i])
    return None


# --- DOT ------------------------------------------------------------------------------------


def _emit_cluster(
    prefix: str, tree: dict, groups: dict, g: nx.DiGraph, lines: list[str], depth: int
) -> None:
    pad = "  " * depth
    for v in groups.get(prefix, []):
        attrs = g.nodes[v]
        label = "\\n".join(line.replace('"', '\\"') for line in attrs["lines"])
        style = ', style="rounded,dashed"' if attrs["kind"] in ("input", "output") else ""
        shape = ", shape=box3d" if attrs["kind"] == "module" else ""
        lines.append(f'{pad}{_q(v)} [label="{label}", fillcolor="{attrs["fill"]}"{style}{shape}];')
    for child, subtree in tree.items():
        lines.append(
            f'{pad}subgraph {_q("cluster_" + child)} {{ label="{child}"; fontsize=9; '
            'color="#9ca3af";'
        )
        _emit_cluster(child, subtree, groups, g, lines, depth + 1)
        lines.append(f"{pad}}}")


def _cluster_tree(paths: list[str]) -> dict:
    """Nested dict of module paths: `a.b.c` sits under `a.b` under `a`."""
    root: dict = {}
    for path in sorted(set(p for p in paths if p)):
        node = root
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            node = node.setdefault(".".join(parts[:i]), {})
    return root


def _q(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


# --- peftc's layered layout -----------------------------------------------------------------

_W, _GAP, _LINE, _PAD, _RANK_GAP, _MARGIN = 176, 18, 14, 6, 34, 24


class _Layout(NamedTuple):
    """Box centres, each edge's route through its waypoints, and the canvas's left edge and size."""

    x: dict
    y: dict
    routes: dict
    x_min: float
    width: float
    height: float


def _layered_svg(g: nx.DiGraph, title: str) -> str:
    """Sugiyama-style: longest-path layers, long edges split by waypoints, barycentre ordering
    sweeps, then each box pulled towards its neighbours without overlapping."""
    layout = _layout(g)
    out = _svg_head(g, layout, title) + _svg_edges(g, layout) + _svg_boxes(g, layout)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _layout(g: nx.DiGraph) -> _Layout:
    h, layer, routes = _with_waypoints(g)
    ranks = _ordered_ranks(h, layer)
    x = _x_positions(g, h, ranks)
    y, bottom = _y_positions(g, ranks)
    x_min = min((x[v] - _width(g, v) / 2 for v in x), default=0) - _MARGIN
    x_max = max((x[v] + _width(g, v) / 2 for v in x), default=0) + _MARGIN
    return _Layout(x, y, routes, x_min, max(x_max - x_min, 360), bottom + _MARGIN)


def _width(g: nx.DiGraph, v) -> int:
    return _W if v in g else 8


def _height(g: nx.DiGraph, v) -> int:
    return len(g.nodes[v]["lines"]) * _LINE + 2 * _PAD if v in g else 0


def _with_waypoints(g: nx.DiGraph) -> tuple[nx.DiGraph, dict, dict]:
    """(`g` with a waypoint on each layer a long edge crosses, the layer of every vertex and
    waypoint (longest path), the route of each edge of `g`)."""
    layer: dict = {}
    for v in nx.topological_sort(g):
        layer[v] = max((layer[u] + 1 for u in g.predecessors(v)), default=0)
    h = nx.DiGraph()
    h.add_nodes_from(nx.topological_sort(g))
    routes = {}
    for u, v in g.edges:
        route = [u] + [("via", u, v, k) for k in range(layer[u] + 1, layer[v])] + [v]
        for k, point in enumerate(route[1:-1]):
            layer[point] = layer[u] + 1 + k
        nx.add_path(h, route)
        routes[(u, v)] = route
    return h, layer, routes


def _ordered_ranks(h: nx.DiGraph, layer: dict) -> list[list]:
    """The vertices of each layer, ordered by sweeps down and up that sort a layer by the mean
    position of its neighbours in the layer just swept."""
    ranks: list[list] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for v in h:
        ranks[layer[v]].append(v)
    for sweep in range(12):
        down = sweep % 2 == 0
        for r in range(1, len(ranks)) if down else range(len(ranks) - 2, -1, -1):
            ref = {v: k for k, v in enumerate(ranks[r - 1 if down else r + 1])}
            near = h.predecessors if down else h.successors
            current = {v: k for k, v in enumerate(ranks[r])}

            def barycentre(v, ref=ref, near=near, current=current) -> tuple[float, int]:
                at = [ref[u] for u in near(v) if u in ref]
                return (sum(at) / len(at) if at else current[v], current[v])

            ranks[r].sort(key=barycentre)
    return ranks


def _x_positions(g: nx.DiGraph, h: nx.DiGraph, ranks: list[list]) -> dict:
    """Centres across: each layer centred, then pulled towards its neighbours, keeping order and
    spacing."""
    x: dict = {}
    for rank in ranks:
        left = -sum(_width(g, v) + _GAP for v in rank) / 2
        for v in rank:
            x[v] = left + _width(g, v) / 2
            left += _width(g, v) + _GAP
    for _ in range(8):
        for rank in ranks:
            wanted = {
                v: sum(x[u] for u in nx.all_neighbors(h, v))
                / max(1, len(list(nx.all_neighbors(h, v))))
                if list(nx.all_neighbors(h, v))
                else x[v]
                for v in rank
            }
            for k, v in enumerate(rank):
                x[v] = (
                    wanted[v]
                    if k == 0
                    else max(
                        wanted[v],
                        x[rank[k - 1]] + (_width(g, rank[k - 1]) + _width(g, v)) / 2 + _GAP,
                    )
                )
            shift = sum(wanted.values()) / len(rank) - sum(x[v] for v in rank) / len(rank)
            for v in rank:
                x[v] += shift
    return x


def _y_positions(g: nx.DiGraph, ranks: list[list]) -> tuple[dict, float]:
    """Centres down, each layer as tall as its tallest box, below the title and legend; and the
    bottom of the last layer."""
    y, top = {}, _MARGIN + 34
    for rank in ranks:
        tallest = max((_height(g, v) for v in rank), default=0)
        for v in rank:
            y[v] = top + tallest / 2
        top += tallest + _RANK_GAP
    return y, top


def _svg_head(g: nx.DiGraph, layout: _Layout, title: str) -> list[str]:
    """The SVG's opening, the arrowhead, the title and a legend of the passes' colours."""
    x_min, svg_w, svg_h = layout.x_min, layout.width, layout.height
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{svg_w:.0f}" height="{svg_h:.0f}" '
        f'viewBox="{x_min:.0f} 0 {svg_w:.0f} {svg_h:.0f}" font-family="Helvetica, Arial, '
        'sans-serif" font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'fill="#6b7280"/></marker></defs>',
    ]
    legend = sorted({a["pass"] for _, a in g.nodes(data=True) if a.get("pass")})
    out.append(
        f'<text x="{x_min + _MARGIN:.0f}" y="{_MARGIN + 4}" font-size="13" font-weight="bold">'
        f"{html.escape(title)}</text>"
    )
    lx = x_min + _MARGIN
    for name in legend:
        out.append(
            f'<rect x="{lx:.0f}" y="{_MARGIN + 12}" width="12" height="12" '
            f'fill="{pass_colour(name)}" '
            f'stroke="#374151"/><text x="{lx + 16:.0f}" y="{_MARGIN + 22}">inserted by '
            f"{html.escape(name)}</text>"
        )
        lx += 30 + 7 * len(f"inserted by {name}")
    return out


def _svg_edges(g: nx.DiGraph, layout: _Layout) -> list[str]:
    """Each edge as a path from the bottom of its source through its waypoints to the top of its
    target."""
    x, y, out = layout.x, layout.y, []
    for (u, v), route in layout.routes.items():
        points = (
            [(x[u], y[u] + _height(g, u) / 2)]
            + [(x[p], y[p]) for p in route[1:-1]]
            + [(x[v], y[v] - _height(g, v) / 2)]
        )
        d = "M " + " L ".join(f"{px:.1f} {py:.1f}" for px, py in points)
        out.append(
            f'<path d="{d}" fill="none" stroke="#6b7280" stroke-width="1.2" '
            'marker-end="url(#arrow)"/>'
        )
    return out


def _svg_boxes(g: nx.DiGraph, layout: _Layout) -> list[str]:
    """Each vertex as a rounded box with its label lines, the first in bold."""
    x, y, out = layout.x, layout.y, []
    for v, attrs in g.nodes(data=True):
        w, hgt = _width(g, v), _height(g, v)
        dash = ' stroke-dasharray="4 3"' if attrs["kind"] in ("input", "output") else ""
        stroke = "#374151" if attrs["kind"] == "inserted" else "#9ca3af"
        out.append(
            f'<rect x="{x[v] - w / 2:.1f}" y="{y[v] - hgt / 2:.1f}" width="{w}" height="{hgt}" '
            'rx="5" '
            f'fill="{attrs["fill"]}" stroke="{stroke}"{dash}/>'
        )
        for k, line in enumerate(attrs["lines"]):
            weight = ' font-weight="bold"' if k == 0 else ' fill="#4b5563"'
            text = line if len(line) <= 28 else line[:27] + "…"
            out.append(
                f'<text x="{x[v]:.1f}" y="{y[v] - hgt / 2 + _PAD + _LINE * (k + 1) - 3:.1f}" '
                f'text-anchor="middle"{weight}>{html.escape(text)}</text>'
            )
    return out
