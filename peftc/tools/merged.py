"""A finetuned graph as a transformers model folder: `save_merged(gm, "out/")`.

    graph (adapters merged, or merged here) -> out/config.json + model.safetensors (+ tokenizer)

1. Every active adapter is merged (`merge`, dense over NF4 bases); a technique that does not merge
   (prompts, bottleneck adapters) is refused by name: the folder could not hold it.
2. NF4 weights are dequantized: the folder holds the dense model (float32, or `dtype`), as
   `AutoModel*.from_pretrained` loads it; quantize again when loading (BitsAndBytesConfig).
3. The model is the class the graph was captured from, built from its config with the merged
   state dict, saved with `save_pretrained` (atomically) and loaded back: its outputs on the
   capture's example inputs must be the graph's, or nothing is written.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import fx

from peftc._io import atomic_dir
from peftc.errors import CheckpointError
from peftc.ir.graph import get_attr_path, peftc_meta
from peftc.ir.pipeline import apply
from peftc.quant.format import nf4_state
from peftc.quant.nf4 import dequantize_nf4
from peftc.technique.adapters import adapters
from peftc.tools.parity import close, first_output

__all__ = ["save_merged"]


def save_merged(
    gm: fx.GraphModule,
    folder: str | Path,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `gm`, its adapters merged, as a transformers folder (and `tokenizer` beside it);
    checked against `gm`'s outputs before it is written."""
    capture = peftc_meta(gm).get("capture", {})
    if not peftc_meta(gm).get("configs", {}).get(""):
        raise CheckpointError(
            f"save_merged writes a transformers folder, and this graph was captured from "
            f"{capture.get('class', 'a model')}, no transformers model; save its state_dict"
        )
    merged = _merged(gm)
    model = _rebuilt(gm, capture["class"], _dense_state(merged), dtype)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _check(type(model).from_pretrained(tmp, dtype=dtype), merged)
    return Path(folder)


def _merged(gm: fx.GraphModule) -> fx.GraphModule:
    active = [name for name, r in adapters(gm).items() if r.active and not r.merged]
    left = [n for n in active if not adapters(gm)[n].method().mergeable]
    if left:
        raise CheckpointError(
            f"adapter {left[0]!r} ({adapters(gm)[left[0]].technique}) does not merge into the "
            "weights, so a transformers folder cannot hold it; save it with save_adapter"
        )
    return apply(gm, 'merge(dtype="float32")') if active else gm


def _dense_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The state dict with each NF4 weight dequantized under its module's `weight` name."""
    state = dict(gm.state_dict())
    out_in = set()  # weights in (out, in) layout, as NF4 and `linear` hold them
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.peftc.nf4_linear.default):
        path = get_attr_path(node.args[1]).rpartition(".")[0]
        out_in.add(name := f"{path}.weight" if path else "weight")
        state[name] = dequantize_nf4(nf4_state(gm, node))
    linear = torch.ops.aten.linear.default
    out_in |= {
        str(n.target)
        for n in gm.graph.find_nodes(op="get_attr")
        if any(u.target == linear and u.args[1] is n for u in n.users)
    }
    # GPT-2's Conv1D keeps (in, out): its weights quantized or merged over NF4 are transposed back
    types = peftc_meta(gm).get("module_types", {})
    for name in out_in:
        if types.get(name.rpartition(".")[0], "").endswith("Conv1D"):
            state[name] = state[name].t()
    if any(n.target == torch.ops.peftc.nf4_dequantize_experts.default for n in gm.graph.nodes):
        raise CheckpointError(
            "save_merged: NF4 expert stacks are not written yet; quantize with nf4(experts=false)"
        )
    return state


def _rebuilt(gm: fx.GraphModule, qualname: str, state: dict, dtype: torch.dtype | None):
    from peftc.tools.hf import captured_config  # imports transformers

    module, _, name = qualname.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = cls(captured_config(gm))  # its own init fills non-persistent buffers
    missing, _ = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing:
        raise CheckpointError(
            f"save_merged: the graph has no tensor for {', '.join(missing[:4])} of {name}; "
            "capture the model whole"
        )
    model.tie_weights()
    return model.to(dtype) if dtype is not None else model


@torch.no_grad()
def _check(reloaded: torch.nn.Module, merged: fx.GraphModule) -> None:
    inputs = peftc_meta(merged).get("example_inputs") or {}
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return
    expected = first_output(merged.eval()(*inputs.values()))
    got = first_output(reloaded.eval()(**tensors))
    tol = 1e-5 if got.dtype == torch.float32 else 1e-2
    try:
        close(got.float(), expected.float(), "the saved transformers model", tol)
    except AssertionError as e:
        raise CheckpointError(f"save_merged wrote nothing: {e} (against the graph)") from None
