import shutil

import networkx as nx
import pytest
import torch

import peftc
import peftc.tools.inspect

from conftest import captured, loaded


def test_show_lists_nodes_with_paths_and_shapes():
    text = peftc.show(captured("tiny-llama"), "model.layers.0.self_attn.q_proj")
    assert (
        "captured by export from transformers.models.llama.modeling_llama.LlamaForCausalLM" in text
    )
    line = next(row for row in text.splitlines() if row.startswith("linear "))
    assert (
        "aten.linear.default" in line
        and "model.layers.0.self_attn.q_proj" in line
        and "[batch, sequence, 64] float32" in line
    )
    placeholders = [
        row for row in peftc.show(captured("tiny-llama")).splitlines() if " placeholder " in row
    ]
    # one batch, one length
    assert len(placeholders) == 2 and all("[batch, sequence] int64" in row for row in placeholders)
    assert "model.layers.1" not in text.split("parameters:")[0]
    assert "... 1 more nodes" in peftc.show(
        captured("tiny-llama"), "model.layers.0.self_attn.q_proj", max_rows=1
    )


def test_show_leaves_export_s_bookkeeping_out_unless_asked():
    gm = captured("tiny-llama")
    short, full = peftc.show(gm), peftc.show(gm, bookkeeping=True)
    asserts = [n for n in gm.graph.nodes if "assert" in str(n.target)]
    assert asserts and not any(f"{n.name} " in short for n in asserts)
    assert all(f"{n.name} " in full for n in asserts)
    hidden = sum(peftc.tools.inspect.is_bookkeeping(n) for n in gm.graph.nodes)
    assert f"({hidden} bookkeeping nodes not shown" in short and "not shown" not in full


def test_summary_counts_match_the_model():
    model = loaded("tiny-gpt2").model
    gm = captured("tiny-gpt2")
    stats = peftc.summary(gm)
    assert stats.total == sum(p.numel() for p in model.parameters())
    assert stats.trainable == stats.total and stats.frozen == 0
    assert stats.parameter_bytes == 4 * stats.total
    assert stats.bits_per_weight == 32.0
    frozen = peftc.summary(peftc.apply(gm, "freeze"))
    assert (frozen.trainable, frozen.frozen) == (0, stats.total)
    assert "0 trainable" in str(frozen)


def test_diff_reports_added_nodes_parameters_and_modules():
    import examples.custom_pass  # noqa: F401  registers attn_scale

    gm = captured("tiny-llama")
    after = peftc.apply(gm, "freeze, attn_scale")
    d = peftc.diff(gm, after)
    assert d.params_added == (
        "model.layers.0.self_attn.attn_scale",
        "model.layers.1.self_attn.attn_scale",
    )
    assert len(d.nodes_added) == 4 and not d.nodes_removed
    assert d.modules == ("model.layers.0.self_attn", "model.layers.1.self_attn")
    assert len(d.now_frozen) == len(list(gm.parameters()))
    assert (d.before.trainable, d.after.trainable) == (d.before.total, 2)
    assert "parameters added (2)" in str(d)
    assert str(peftc.diff(gm, gm)) == "no changes"


def test_to_networkx_mirrors_the_graph():
    gm = captured("tiny-bert")
    g = peftc.to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.number_of_edges() == sum(len(set(n.all_input_nodes)) for n in gm.graph.nodes)
    assert nx.is_directed_acyclic_graph(g)
    node = next(
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default
    )
    assert g.nodes[node.name]["module_path"] == "encoder.layer.0.attention.self.query"
    output = next(n for n in gm.graph.nodes if n.op == "output").name
    assert nx.has_path(g, "input_ids", output)


def test_to_dot_clusters_and_collapses_blocks(tmp_path):
    import examples.custom_pass  # noqa: F401

    gm = peftc.apply(captured("tiny-llama"), "attn_scale")
    full = peftc.to_dot(gm)
    assert 'subgraph "cluster_model.layers.0.self_attn"' in full and "fillcolor" in full
    collapsed = peftc.to_dot(gm, collapse="model.layers.*")
    assert '"module:model.layers.0"' in collapsed and "q_proj" not in collapsed
    assert collapsed.count("->") < full.count("->")
    only = peftc.to_dot(gm, targets="model.layers.1.*")
    assert "model.layers.0" not in only
    assert peftc.save_graph(gm, tmp_path / "g.dot").read_text() == full
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed; Graphviz's SVG not checked")
    svg = peftc.save_graph(
        gm, tmp_path / "g.svg", collapse="model.layers.*", renderer="graphviz"
    ).read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "model.layers.1" in svg


def test_drawing_labels_roles_and_marks_the_blocks_edges():
    from peftc.tools.drawing import display_graph

    gm = peftc.apply(captured("tiny-llama"), "nf4, freeze, lora(r=4)")
    g = display_graph(gm, targets="model.layers.0|model.layers.0.*")
    labels = {v: a["lines"][:2] for v, a in g.nodes(data=True)}
    assert ["lora: A", "self_attn.q_proj"] in labels.values() and [
        "NF4 linear",
        "self_attn.o_proj",
    ] in labels.values()
    assert ["attention"] in [label[:1] for label in labels.values()]
    inputs = [v for v, a in g.nodes(data=True) if a["kind"] == "input"]
    outputs = [v for v, a in g.nodes(data=True) if a["kind"] == "output"]
    # the residual stream leaves once
    assert inputs and all(g.in_degree(v) == 0 for v in inputs) and len(outputs) == 1
    # bridged
    assert not any(a["lines"][0] in ("view", "transpose", "reshape") for _, a in g.nodes(data=True))
    assert nx.is_directed_acyclic_graph(g) and nx.is_weakly_connected(g)
    original = {n.name for n in gm.graph.nodes}
    assert all(v in original or v.startswith(("in:", "out:")) for v in g)


def test_svg_without_graphviz_is_layered_and_readable(tmp_path):
    import xml.etree.ElementTree as ET

    gm = peftc.apply(captured("tiny-llama"), "nf4, freeze, lora(r=4)")
    path = peftc.save_graph(
        gm, tmp_path / "block.svg", renderer="peftc", targets="model.layers.0.*", title="layer 0"
    )
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert (
        "layer 0" in texts
        and "lora: B" in texts
        and "inserted by lora" in texts
        and "inserted by nf4" in texts
    )
    boxes = [
        tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))
        for r in root.iter(f"{ns}rect")
        if float(r.get("width")) > 20
    ]
    for i, (x, y, w, h) in enumerate(boxes):  # no two boxes overlap
        for x2, y2, w2, h2 in boxes[i + 1 :]:
            assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
    assert (
        min(float(t.get("font-size", root.get("font-size"))) for t in root.iter(f"{ns}text")) >= 11
    )
    whole = peftc.save_graph(
        gm, tmp_path / "whole.svg", renderer="peftc", collapse="model.layers.*"
    ).read_text()
    assert "model.layers.1" in whole and "lora: A" not in whole
