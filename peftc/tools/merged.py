"""A finetuned graph as a transformers model folder: `save_merged(gm, "out/")`.

    graph (adapters merged, or merged here) -> out/config.json + model.safetensors (+ tokenizer)

1. Every active adapter is merged (`merge`, dense over NF4 bases); a technique that does not merge
   (prompts, bottleneck adapters) is refused by name: the folder could not hold it.
2. NF4 weights are dequantized: the folder holds the dense model (float32, or `dtype`), as
   `AutoModel*.from_pretrained` loads it. With `nf4=True` they stay 4-bit instead (the merge
   requantizes them, as peft's merge into a bitsandbytes layer does), written as transformers
   writes a bitsandbytes model (`weight` bytes, `absmax`, `quant_map`, the nested statistics and
   the `quant_state` JSON; `quantization_config` in config.json, the linears the graph keeps dense
   in `llm_int8_skip_modules`): `from_pretrained` loads it 4-bit, with bitsandbytes installed.
3. The model is the class the graph was captured from, built from its config with the merged
   state dict, saved with `save_pretrained` (atomically) and loaded back: its outputs on the
   capture's example inputs must be the graph's, or nothing is written. A 4-bit folder is read
   back by decoding its bytes here (bitsandbytes' CPU decode is wrong on some CPUs).
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import fx

from peftc._io import atomic_dir
from peftc.errors import CheckpointError
from peftc.ir.graph import get_attr_path, peftc_meta
from peftc.ir.pipeline import apply
from peftc.quant.format import nf4_state
from peftc.quant.nf4 import NF4_CODE, STATS_BLOCKSIZE, NF4Weight, dequantize_nf4, dynamic_map
from peftc.technique.adapters import adapters
from peftc.tools.parity import close, first_output

__all__ = ["save_merged"]


def save_merged(
    gm: fx.GraphModule,
    folder: str | Path,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    nf4: bool = False,
) -> Path:
    """Write `gm`, its adapters merged, as a transformers folder (and `tokenizer` beside it);
    checked against `gm`'s outputs before it is written. `nf4`: NF4 weights stay 4-bit, as a
    bitsandbytes checkpoint."""
    capture = peftc_meta(gm).get("capture", {})
    if not peftc_meta(gm).get("configs", {}).get(""):
        raise CheckpointError(
            f"save_merged writes a transformers folder, and this graph was captured from "
            f"{capture.get('class', 'a model')}, no transformers model; save its state_dict"
        )
    merged = _merged(gm, "requantize=true" if nf4 else 'dtype="float32"')
    model = _rebuilt(gm, capture["class"], _dense_state(merged), dtype)
    quantized = _nf4_weights(merged) if nf4 else {}
    state = _4bit_state(model, quantized, merged, dtype) if nf4 else None
    with atomic_dir(folder) as tmp:
        # one file: `_decoded` reads it back
        model.save_pretrained(tmp, state_dict=state, max_shard_size="1000GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if nf4:
            reloaded = type(model)(model.config)
            reloaded.load_state_dict(_decoded(tmp / "model.safetensors"), strict=False)
            reloaded.tie_weights()
        else:
            reloaded = type(model).from_pretrained(tmp, dtype=dtype)
        _check(reloaded, merged)
    return Path(folder)


def _nf4_weights(gm: fx.GraphModule) -> dict[str, NF4Weight]:
    """Each NF4 weight by its module's path."""
    nodes = gm.graph.find_nodes(op="call_function", target=torch.ops.peftc.nf4_linear.default)
    weights = {get_attr_path(n.args[1]).rpartition(".")[0]: nf4_state(gm, n) for n in nodes}
    if not weights:
        raise CheckpointError(
            "save_merged(nf4=True) writes the graph's NF4 weights as 4-bit, and it has none: "
            "apply nf4 first, or write the dense folder"
        )
    types = peftc_meta(gm).get("module_types", {})
    conv1d = [p for p in weights if types.get(p, "").endswith("Conv1D")]
    if conv1d:
        raise CheckpointError(
            f"save_merged(nf4=True): {conv1d[0]} is a Conv1D (GPT-2), which transformers does "
            "not load 4-bit from a checkpoint; write the dense folder"
        )
    return weights


def _dense_linears(gm: fx.GraphModule, quantized: dict[str, NF4Weight]) -> list[str]:
    """The nn.Linear modules the graph keeps dense: transformers must not quantize them."""
    types = peftc_meta(gm).get("module_types", {})
    return [
        path
        for path, kind in types.items()
        if kind == "torch.nn.modules.linear.Linear" and path not in quantized
    ]


def _4bit_state(
    model: torch.nn.Module,
    weights: dict[str, NF4Weight],
    merged: fx.GraphModule,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """`model`'s state with each NF4 module's dense `weight` replaced by bitsandbytes' serialized
    4-bit state; its config gets `quantization_config` (transformers' BitsAndBytesConfig), the
    linears the graph keeps dense named in `llm_int8_skip_modules`."""
    from transformers import BitsAndBytesConfig

    state = dict(model.state_dict())
    for module, weight in weights.items():
        del state[f"{module}.weight"]
        state.update(_bnb_entries(module, weight, dtype or torch.float32))
    dense = _dense_linears(merged, weights)
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=all(w.double_quant for w in weights.values()),
        bnb_4bit_compute_dtype=dtype or torch.float32,
        llm_int8_skip_modules=[re.escape(p) for p in dense] or None,
    )
    return state


def _bnb_entries(module: str, w: NF4Weight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """bitsandbytes' `Params4bit` state dict of `w` (as `Linear4bit` saves it)."""
    key = f"{module}.weight"
    quant_state = {
        "quant_type": "nf4",
        "blocksize": w.blocksize,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(w.shape),
    }
    entries = {key: w.packed, f"{key}.absmax": w.absmax, f"{key}.quant_map": NF4_CODE.clone()}
    if w.double_quant:
        quant_state.update(
            nested_blocksize=STATS_BLOCKSIZE, nested_dtype="float32", nested_offset=w.offset.item()
        )
        entries[f"{key}.nested_absmax"] = w.absmax_scale
        entries[f"{key}.nested_quant_map"] = dynamic_map()
    text = json.dumps(quant_state).encode()
    entries[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(text), dtype=torch.uint8)
    return {k: v.contiguous() for k, v in entries.items()}


def _decoded(path: Path) -> dict[str, torch.Tensor]:
    """A 4-bit file's state dict with every bitsandbytes weight decoded to float32."""
    state = load_file(path)
    suffix = ".weight.quant_state.bitsandbytes__nf4"
    for name in [n for n in state if n.endswith(suffix)]:
        key = name.removesuffix(".quant_state.bitsandbytes__nf4")
        meta = json.loads(bytes(state.pop(name).tolist()))
        nested = "nested_blocksize" in meta
        weight = NF4Weight(
            state[key],
            state.pop(f"{key}.absmax"),
            torch.Size(meta["shape"]),
            torch.float32,
            meta["blocksize"],
            nested,
            state.pop(f"{key}.nested_absmax", None),
            torch.tensor(meta["nested_offset"]) if nested else None,
        )
        state[key] = dequantize_nf4(weight)
        for extra in ("quant_map", "nested_quant_map"):
            state.pop(f"{key}.{extra}", None)
    return state


def _merged(gm: fx.GraphModule, how: str) -> fx.GraphModule:
    active = [name for name, r in adapters(gm).items() if r.active and not r.merged]
    left = [n for n in active if not adapters(gm)[n].method().mergeable]
    if left:
        raise CheckpointError(
            f"adapter {left[0]!r} ({adapters(gm)[left[0]].technique}) does not merge into the "
            "weights, so a transformers folder cannot hold it; save it with save_adapter"
        )
    return apply(gm, f"merge({how})") if active else gm


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
