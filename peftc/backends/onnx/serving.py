"""Many LoRA adapters over one exported base model, switched per ONNX Runtime run.

The base is exported once with one LoRA slot per adapted site: `x @ A.T @ B.T` added to the
site's output, where A and B are graph inputs with same-name rank-0 initializers as defaults (so
a run without an adapter computes the base model exactly). Each adapter becomes an ONNX Runtime
adapter file (`onnxruntime.AdapterFormat`) holding its A and scale * B under the slot's names;
`RunOptions.add_active_adapter` feeds them to a run. Adapters may have different ranks and
cover different sites: a site an adapter does not cover keeps its rank-0 default.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from peftc._io import atomic_path, atomic_write
from peftc.backends.onnx.contrib import requantize_int4
from peftc.backends.onnx.exporter import (
    OnnxExport,
    finish,
    onnx_model,
    optimize,
    writable_path,
    write,
)
from peftc.errors import ExportError
from peftc.ir.graph import get_tensor, qualify
from peftc.ir.pipeline import apply
from peftc.technique.adapters import Adapter, adapters

__all__ = ["export_adapters", "ServedAdapters", "AdapterSession", "SLOT"]

SLOT = "serving"  # adapter name of the slot: its tensors are `<site>.lora_A.serving.weight`, ...


@dataclass
class ServedAdapters:
    """The base model file, one ONNX Runtime adapter file per adapter, and the manifest naming
    them."""

    base: OnnxExport
    adapters: dict[str, Path]
    manifest: Path

    def __str__(self) -> str:
        listed = "\n".join(f"  adapter {name!r}: {path}" for name, path in self.adapters.items())
        return f"{self.base}\n{listed}\n  manifest: {self.manifest}"


def export_adapters(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    args: tuple | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    names: list[str] | None = None,
    dynamic: bool = True,
    quant: str = "nf4",
) -> ServedAdapters:
    """Export the base of `gm` to `path` with a LoRA slot, and each of its LoRA adapters `names`
    (default: all) to `<stem>.<name>.onnx_adapter` beside it; `<stem>.adapters.json` lists them."""
    start = time.perf_counter()
    path = writable_path(path)
    record = adapters(gm)
    names = list(record) if names is None else list(names)
    if not names:
        raise ExportError(
            'the graph has no adapters to serve; add one (pipeline "..., lora(...)") or load one'
        )
    for name in names:
        _check_servable(record, name)
    sites = list(dict.fromkeys(path for name in names for path, _ in record[name].sites))
    model, slot_inputs = _base_with_slot(gm, sites, args, kwargs, dynamic, quant)
    base = write(
        model,
        path,
        dtype="float32",
        quant=quant,
        seconds=0.0,
        notes=[f"LoRA slot inputs on {len(sites)} sites (rank-0 defaults: the base model)"],
    )
    written = {
        name: _write_adapter(
            gm, name, path.with_name(f"{path.stem}.{name}.onnx_adapter"), slot_inputs
        )
        for name in names
    }
    manifest = path.with_name(f"{path.stem}.adapters.json")
    listing = {"model": path.name, "adapters": {n: p.name for n, p in written.items()}}
    atomic_write(manifest, json.dumps(listing, indent=2))
    base.seconds = time.perf_counter() - start
    base.inputs = [i for i in base.inputs if i not in slot_inputs]
    return ServedAdapters(base, written, manifest)


def _base_with_slot(
    gm: fx.GraphModule,
    sites: list[str],
    args: tuple | None,
    kwargs: dict[str, Any] | None,
    dynamic: bool,
    quant: str,
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The base model in ONNX with a rank-1 LoRA slot at `sites` whose tensors are graph inputs
    (second: input name -> element type)."""
    pattern = "re:" + "|".join(re.escape(p) for p in sites)
    serving = apply(
        gm,
        f"disable_adapters, lora(r=1, alpha=1, targets={pattern!r}, adapter={SLOT!r})",
        verify=False,
    )
    model, int4_weights = onnx_model(serving, args, kwargs, dynamic=dynamic, quant=quant)
    if int4_weights:
        model, _ = requantize_int4(model, int4_weights, 32)
    slot_inputs = _slot_to_inputs(model, sites)
    return finish(optimize(model), "float32"), slot_inputs


def _check_servable(record: dict[str, Adapter], name: str) -> None:
    if name not in record:
        raise ExportError(f"no adapter named {name!r}; the graph has {', '.join(record) or 'none'}")
    adapter = record[name]
    problem = ""
    if adapter.technique != "lora":
        problem = (
            f"it is {adapter.technique}; only LoRA adapters are served as ONNX Runtime adapter "
            "files"
        )
    elif adapter.options.dora:
        problem = (
            "it is DoRA, whose weight norm cannot be fed as an input; merge it and export that "
            "model"
        )
    elif adapter.merged:
        problem = "it is merged into the base weights; unmerge it first"
    elif any(kind != "linear" for _, kind in adapter.sites):
        problem = (
            "it adapts embeddings or convolutions; serve adapters on linear layers, or merge it"
        )
    if problem:
        raise ExportError(f"cannot serve adapter {name!r}: {problem}")


def _slot_to_inputs(model: onnx.ModelProto, sites: list[str]) -> dict[str, int]:
    """Turn the slot's initializers into graph inputs with rank-0 defaults; name -> element type."""
    graph = model.graph
    by_name = {init.name: init for init in graph.initializer}
    slot = {}
    for site in sites:
        for part, rank_axis in (("lora_A", 0), ("lora_B", 1)):
            name = qualify(site, part, SLOT, "weight")
            if name not in by_name:
                raise ExportError(
                    f"the exported model lost the LoRA slot tensor {name!r}; cannot serve adapters"
                )
            init = by_name[name]
            dims = list(init.dims)
            dims[rank_axis] = 0
            empty = onnx.helper.make_tensor(name, init.data_type, dims, [])
            init.CopyFrom(empty)
            # one symbol per site: ONNX Runtime plans memory assuming equal symbols are equal sizes
            shape = [f"rank:{site}" if axis == rank_axis else d for axis, d in enumerate(dims)]
            graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, shape))
            slot[name] = init.data_type
    del graph.value_info[:]  # inferred with rank 1; ONNX Runtime infers the shapes again
    return slot


def _write_adapter(gm: fx.GraphModule, name: str, path: Path, slot_inputs: dict[str, int]) -> Path:
    import onnxruntime as ort

    record = adapters(gm)[name]
    parameters = {}
    for site, _ in record.sites:
        scaling = record.options_at(site).scaling
        A = get_tensor(gm, qualify(site, "lora_A", name, "weight")).detach()
        B = get_tensor(gm, qualify(site, "lora_B", name, "weight")).detach() * scaling
        for part, value in (("lora_A", A), ("lora_B", B)):
            slot_name = qualify(site, part, SLOT, "weight")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(slot_inputs[slot_name])
            parameters[slot_name] = ort.OrtValue.ortvalue_from_numpy(
                value.float().numpy().astype(dtype)
            )
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(parameters)
    with atomic_path(path) as tmp:
        adapter.export_adapter(str(tmp))
    return path


class AdapterSession:
    """An ONNX Runtime session over a served base model; `run(feeds, adapter=name)` picks the
    adapter for that call (None: the base model). Adapter files are loaded once, memory-mapped."""

    def __init__(
        self, served: ServedAdapters | str | os.PathLike[str], providers: list[str] | None = None
    ):
        import onnxruntime as ort

        manifest = Path(served.manifest if isinstance(served, ServedAdapters) else served)
        if manifest.suffix == ".onnx":
            manifest = manifest.with_name(f"{manifest.stem}.adapters.json")
        if not manifest.exists():
            raise ExportError(
                f"no adapter manifest at {manifest}; export with "
                "peftc.backends.onnx.export_adapters"
            )
        listing = json.loads(manifest.read_text())
        options = ort.SessionOptions()
        # the slot inputs are overridable initializers, by design: no warning each
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(manifest.parent / listing["model"]), options, providers=providers
        )
        self.adapter_files = {
            name: manifest.parent / file for name, file in listing["adapters"].items()
        }
        self._loaded: dict[str, Any] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_files)

    def run(
        self,
        feeds: dict[str, Any],
        adapter: str | None = None,
        output_names: list[str] | None = None,
    ) -> list:
        import onnxruntime as ort

        options = ort.RunOptions()
        if adapter is not None:
            options.add_active_adapter(self._adapter(adapter))
        arrays = {
            k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in feeds.items()
        }
        return self.session.run(output_names, arrays, options)

    def _adapter(self, name: str):
        import onnxruntime as ort

        if name not in self.adapter_files:
            raise ExportError(
                f"no adapter {name!r} in this model; it serves "
                f"{', '.join(self.adapter_files) or 'none'}"
            )
        if name not in self._loaded:
            adapter = ort.LoraAdapter()
            adapter.Load(str(self.adapter_files[name]))
            self._loaded[name] = adapter
        return self._loaded[name]
