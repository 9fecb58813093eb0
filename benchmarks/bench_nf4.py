"""Benchmark peftc's NF4 quantization against bitsandbytes' CPU path, measured in the same run.

What it measures (each row: peftc, bitsandbytes, ratio = peftc / bitsandbytes):

1. Quantize throughput (MB/s of input weight; higher is better, so a ratio < 1.0 means peftc is
   slower) of a 4096x4096 weight in bfloat16 and float32, blocksize 64 with double quantization:
   `peftc.quant.nf4.quantize_nf4` vs `bitsandbytes.functional.quantize_4bit(quant_type="nf4")`.
2. Dequantize time of the same weights (`dequantize_nf4` vs `dequantize_4bit`).
3. 4-bit linear forward (x: 16 x 4096 float32, no grad) and forward + backward w.r.t. x:
   `torch.ops.peftc.nf4_linear` vs `bitsandbytes.matmul_4bit`.
4. Storage of one weight: fp32, fp16 and NF4 (packed codes + block statistics) bytes, and bits per
   weight; the note gives each size as a fraction of fp32.

Before timing, the two sides are checked to agree (packed bytes equal, dequantized weights and
linear outputs/gradients `torch.testing.assert_close`). Both sides run with the same
`torch.set_num_threads`; each time is the median of repeats (time.perf_counter) after warm-up,
with peftc and bitsandbytes repeats interleaved.

Run:

    python benchmarks/bench_nf4.py                  # full run, 4096x4096 weights
    python benchmarks/bench_nf4.py --quick          # ~20 s smoke run, 1024x1024 weights
    python benchmarks/bench_nf4.py --json out.json  # also write the results as JSON

This is a benchmark, not part of the test suite; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Any

import torch

from common import begin, compare, write_json

SEED = 0


def row(measurement: str, peftc: float, bnb: float, unit: str, note: str = "") -> dict[str, Any]:
    return {
        "measurement": measurement,
        "peftc": peftc,
        "bnb": bnb,
        "unit": unit,
        "ratio": peftc / bnb,
        "note": note,
    }


def bnb_stats_bytes(state) -> int:
    """Bytes of bnb's block statistics: absmax (uint8 codes when nested) + nested absmax +
    offset."""
    total = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += (
            state.state2.absmax.numel() * state.state2.absmax.element_size()
            + state.offset.numel() * 4
        )
    return total


def bench(size: int, tokens: int, repeat: int, warmup: int) -> list[dict[str, Any]]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    import peftc.quant.ops  # noqa: F401  (registers torch.ops.peftc.nf4_linear)
    from peftc.quant.nf4 import bits_per_weight, dequantize_nf4, quantize_nf4

    rows = []
    generator = torch.Generator().manual_seed(SEED)
    w32 = torch.randn(size, size, generator=generator) * 0.02
    shape = f"{size}x{size}"
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        w = w32.to(dtype)
        ours = quantize_nf4(w, blocksize=64, double_quant=True)
        packed, state = bf.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        if not torch.equal(ours.packed, packed):
            raise RuntimeError(f"packed codes differ from bitsandbytes ({name})")
        torch.testing.assert_close(
            dequantize_nf4(ours), bf.dequantize_4bit(packed, state), atol=0, rtol=0
        )
        t = compare(
            {
                "peftc": lambda w=w: quantize_nf4(w, blocksize=64, double_quant=True),
                "bnb": lambda w=w: bf.quantize_4bit(
                    w, blocksize=64, compress_statistics=True, quant_type="nf4"
                ),
            },
            repeat,
            warmup,
        )
        mb = w.numel() * w.element_size() / 1e6
        rows.append(
            row(
                f"quantize {shape} {name} (MB/s)",
                mb / t["peftc"],
                mb / t["bnb"],
                "MB/s",
                f"peftc {t['peftc'] * 1e3:.1f} ms, bnb {t['bnb'] * 1e3:.1f} ms",
            )
        )
        t = compare(
            {
                "peftc": lambda q=ours: dequantize_nf4(q),
                "bnb": lambda p=packed, s=state: bf.dequantize_4bit(p, s),
            },
            repeat,
            warmup,
        )
        rows.append(row(f"dequantize {shape} {name}", t["peftc"], t["bnb"], "s"))

    # 4-bit linear on the fp32 weight
    ours = quantize_nf4(w32, blocksize=64, double_quant=True)
    packed, state = bf.quantize_4bit(w32, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(tokens, size, generator=generator)
    grad_out = torch.randn(tokens, size, generator=generator)

    def peftc_linear(inp):
        return torch.ops.peftc.nf4_linear(
            inp, ours.packed, ours.absmax, ours.absmax_scale, ours.offset, None, size, size, 64
        )

    def bnb_linear(inp):
        return bnb.matmul_4bit(inp, packed.t(), quant_state=state)

    with torch.no_grad():
        torch.testing.assert_close(peftc_linear(x), bnb_linear(x), atol=1e-4, rtol=1e-4)
    grads = []
    for fn in (peftc_linear, bnb_linear):
        xg = x.clone().requires_grad_()
        fn(xg).backward(grad_out)
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn(x)

        return run

    def fwd_bwd(fn):
        xg = x.clone().requires_grad_()

        def run():
            xg.grad = None
            fn(xg).backward(grad_out)

        return run

    note = f"x {tokens}x{size} fp32, W {shape} from fp32"
    t = compare({"peftc": no_grad(peftc_linear), "bnb": no_grad(bnb_linear)}, repeat, warmup)
    rows.append(row("linear forward (no grad)", t["peftc"], t["bnb"], "s", note))
    t = compare({"peftc": fwd_bwd(peftc_linear), "bnb": fwd_bwd(bnb_linear)}, repeat, warmup)
    rows.append(row("linear forward+backward (grad x)", t["peftc"], t["bnb"], "s", note))

    # storage of one weight
    n = w32.numel()
    ours_bytes = (
        ours.packed.numel()
        + ours.absmax.numel() * ours.absmax.element_size()
        + ours.absmax_scale.numel() * 4
        + 4
    )
    bnb_bytes = packed.numel() * packed.element_size() + bnb_stats_bytes(state)
    for label, a, b in (
        ("fp32", n * 4, n * 4),
        ("fp16", n * 2, n * 2),
        ("NF4 packed+stats", ours_bytes, bnb_bytes),
    ):
        rows.append(row(f"bytes {shape} {label}", a, b, "B", f"{a / (n * 4):.4f} of fp32"))
    rows.append(
        row(
            "NF4 bits per weight",
            bits_per_weight(ours),
            bnb_bytes * 8 / n,
            "bits",
            f"{bits_per_weight(ours) / 32:.4f} of fp32",
        )
    )
    return rows


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.2f} ms"
    if unit == "MB/s":
        return f"{value:.0f} MB/s"
    if unit == "B":
        return f"{value / 2**20:.3f} MiB"
    return f"{value:.4f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("measurement", "peftc", "bitsandbytes", "ratio (peftc/bnb)", "note")
    body = [
        (
            r["measurement"],
            fmt(r["peftc"], r["unit"]),
            fmt(r["bnb"], r["unit"]),
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
    lines += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1024x1024 weights, fewer repeats (~20 s)"
    )
    args, command, started = begin(parser, argv, __file__)
    import bitsandbytes as bnb

    import peftc

    size, tokens, repeat, warmup = (1024, 16, 5, 1) if args.quick else (4096, 16, 7, 2)
    print(
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peftc {peftc.__version__}; "
        f"{torch.get_num_threads()} threads; {'quick' if args.quick else 'full'} run",
        flush=True,
    )
    torch.manual_seed(SEED)
    rows = bench(size, tokens, repeat, warmup)
    wall = time.perf_counter() - started

    print()
    print(table(rows))
    print(
        f"\ntimes are medians of {repeat} interleaved repeats after {warmup} warm-up; for MB/s "
        "higher is better (ratio < 1: peftc slower), for times lower is better; wall time "
        f"{wall:.1f} s"
    )
    if args.json:
        write_json(
            args.json,
            {
                "command": command,
                "quick": args.quick,
                "threads": torch.get_num_threads(),
                "seed": SEED,
                "versions": {
                    "torch": torch.__version__,
                    "bitsandbytes": bnb.__version__,
                    "peftc": peftc.__version__,
                    "python": platform.python_version(),
                },
                "size": size,
                "tokens": tokens,
                "repeat": repeat,
                "warmup": warmup,
                "rows": rows,
                "wall_seconds": wall,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
