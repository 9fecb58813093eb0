"""The fastest ONNX export that keeps accuracy: `export_fastest(gm, "model.onnx", accuracy=...)`.

    candidates (float; nf4; int4 at two block sizes; int4 run by int8 kernels; int8)
      -> export each to a temporary folder
      -> time each in ONNX Runtime on `inputs` (medians of interleaved runs, `threads` threads)
      -> score each with `accuracy(path)`
      -> write the fastest whose score is within `tolerance` of the float export's (of those
         within 5 % of its time, the best scoring)

The float export (NF4 weights decoded) is the reference: quantization may only cost what the
caller allows, on the caller's own measure (dev-set accuracy, say). The timings are this
machine's, so choose on the machine that will serve, or force one with `export(quant=...)`.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from peftc.backends.onnx.exporter import (
    NF4_LINEAR,
    OnnxExport,
    onnx_model,
    quantized_file,
    writable_path,
)
from peftc.errors import ExportError
from peftc.ir.graph import peftc_meta

__all__ = ["export_fastest", "choose", "Candidate", "CANDIDATES"]

# (name, export options); int4 needs NF4 weights to requantize
CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("float", {"quant": "float"}),
    ("nf4", {"quant": "nf4"}),
    ("int4 b128", {"quant": "int4", "int4_block_size": 128, "int4_accuracy_level": 4}),
    ("int4 b32", {"quant": "int4", "int4_block_size": 32, "int4_accuracy_level": 4}),
    ("int4_int8", {"quant": "int4_int8"}),
    ("int8", {"quant": "int8"}),
)


TIE = 0.05  # times this close are one speed


@dataclass
class Candidate:
    name: str
    options: dict[str, Any]
    seconds: float  # median time of one run on `inputs`
    score: float  # accuracy(path)
    bytes: int

    def row(self, reference: Candidate) -> str:
        return (
            f"{self.name}: {1e3 * self.seconds:.1f} ms ({self.seconds / reference.seconds:.2f}x "
            f"float), accuracy {self.score:.4f}, {self.bytes / 2**20:.1f} MiB"
        )


def export_fastest(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    *,
    accuracy: Callable[[Path], float],
    inputs: dict[str, torch.Tensor] | None = None,
    tolerance: float = 0.005,
    threads: int | None = None,
    repeat: int = 7,
    **options: Any,
) -> OnnxExport:
    """Write to `path` the fastest of `CANDIDATES` whose `accuracy` (higher is better) is at most
    `tolerance` below the float export's (`choose`: times within 5 % count as one speed). The
    result's `quant` names the one chosen, its `candidates` and notes hold every measurement.
    `inputs`: what to time (default: the capture's example inputs); `options`: `onnx_model`'s
    (args, kwargs, dynamic, merged, attention)."""
    path = writable_path(path)
    refused = sorted(set(options) & {"quant", "int4_block_size", "int4_accuracy_level", "dtype"})
    if refused:
        raise ExportError(
            f"export_fastest chooses {', '.join(refused)} itself; to force one, call export"
        )
    threads = threads or torch.get_num_threads()
    quantized = any(n.target is NF4_LINEAR for n in gm.graph.nodes)
    chosen = [(n, o) for n, o in CANDIDATES if quantized or o["quant"] not in ("nf4", "int4")]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".peftc-tuning-") as folder:
        exports = _exported(gm, chosen, Path(folder), options)
        seconds = _timed(exports, inputs or _example(gm), threads, repeat)
        measured = [
            Candidate(name, extra, seconds[name], accuracy(exports[name].path), exports[name].bytes)
            for name, extra in chosen
        ]
        best = choose(measured, tolerance)
        result = exports[best.name]
        os.replace(result.path, path)  # the same folder: a rename
    result.path = path
    result.notes.append(
        f"chosen by export_fastest: {best.name}, the fastest within {tolerance} of the float "
        f"export's accuracy (times within {TIE:.0%} as one speed) on {threads} threads; measured: "
        + "; ".join(c.row(measured[0]) for c in measured)
    )
    result.candidates, result.quant = measured, best.name
    return result


def choose(measured: list[Candidate], tolerance: float) -> Candidate:
    """The fastest candidate scoring within `tolerance` of the first (float); among those within
    `TIE` of its time (a difference timing noise makes), the best scoring, then the smallest."""
    kept = [c for c in measured if c.score >= measured[0].score - tolerance]
    fastest = min(c.seconds for c in kept)
    tied = [c for c in kept if c.seconds <= fastest * (1 + TIE)]
    return max(tied, key=lambda c: (c.score, -c.bytes))


def _exported(
    gm: fx.GraphModule, chosen: list, folder: Path, options: dict[str, Any]
) -> dict[str, OnnxExport]:
    """Each candidate's file. torch.onnx runs once per lowering (NF4 weights kept, or decoded:
    what float, int4 and int8 start from), not once per candidate."""
    lowered: dict[str, tuple] = {}
    exports = {}
    for i, (name, settings) in enumerate(chosen):
        kind = "nf4" if settings["quant"] == "nf4" else "float"
        if kind not in lowered:
            lowered[kind] = onnx_model(gm, **options, quant=kind)
        model, int4_weights = lowered[kind]
        exports[name] = quantized_file(
            gm, copy.deepcopy(model), int4_weights, folder / f"{i}.onnx", **settings
        )
    return exports


def _example(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    example = peftc_meta(gm).get("example_inputs") or {}
    return {k: v for k, v in example.items() if isinstance(v, torch.Tensor)}


def _timed(
    exports: dict[str, OnnxExport], inputs: dict[str, torch.Tensor], threads: int, repeat: int
) -> dict[str, float]:
    """Median seconds per run of each file, runs interleaved after one warm-up each."""
    import onnxruntime as ort

    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    sessions = {
        name: ort.InferenceSession(str(e.path), settings, providers=["CPUExecutionProvider"])
        for name, e in exports.items()
    }
    feeds = {
        name: {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
        for name, session in sessions.items()
    }
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for run in range(repeat + 1):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            if run:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
