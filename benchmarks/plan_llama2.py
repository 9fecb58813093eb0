"""Planned memory of QLoRA and QST at the lecture's model sizes: LLaMA-2-7B and LLaMA-2-70B shapes.

Each model is built on the `meta` device in bfloat16 (no weights allocated), captured, rewritten by
both pipelines and planned by `peftc.plan` (fake tensors, AdamW). Nothing runs on real data; the
point is the breakdown and that a 70B plan takes seconds, not a GPU.

    python benchmarks/plan_llama2.py                  # batch 4 x 512, both sizes, ~3 min on 2 cores
    python benchmarks/plan_llama2.py --only 7b --batch 1 --seq 2048
    # QLoRA per rank under FSDP2:
    python benchmarks/plan_llama2.py --only 70b --world-size 2 --world-size 4 --world-size 8
    python benchmarks/plan_llama2.py --only 70b --batch 1 --world-size 2 --checkpoint  # recomputed
"""

from __future__ import annotations

import argparse
import time

import torch

import peftc

from common import begin, print_table, write_json

SHAPES = {  # the published LLaMA-2 configurations
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}
PIPELINES = {"QLoRA": "nf4, freeze, lora(r=64, targets='all-linear')", "QST": "nf4, side"}
_GiB = 2**30


def _captured(shape: dict) -> torch.fx.GraphModule:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    # batch 1 would specialize the batch dimension
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    return peftc.capture(model, (ids,), {"attention_mask": torch.ones_like(ids)})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--only", action="append", choices=sorted(SHAPES))
    parser.add_argument(
        "--world-size",
        action="append",
        type=int,
        default=[],
        help="also plan QLoRA per rank of N-way FSDP2 (blocks sharded; the batch is per rank)",
    )
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="also plan QLoRA with each block recomputed in backward (outline(checkpoint=true)), "
        "on one device and per rank",
    )
    args, command, _ = begin(parser, argv, "benchmarks/plan_llama2.py")
    rows = []
    for size in args.only or SHAPES:
        started = time.perf_counter()
        base = _captured(SHAPES[size])
        capture_seconds = time.perf_counter() - started
        runs = [(method, pipeline, 1) for method, pipeline in PIPELINES.items()]
        runs += [("QLoRA", PIPELINES["QLoRA"], n) for n in args.world_size]
        if args.checkpoint:
            recompute = PIPELINES["QLoRA"] + ", outline(checkpoint=true)"
            runs += [("QLoRA + checkpointing", recompute, n) for n in [1, *args.world_size]]
        for method, pipeline, world in runs:
            started = time.perf_counter()
            gm = peftc.apply(base, pipeline)
            gm.train()
            rewrite_seconds = time.perf_counter() - started
            started = time.perf_counter()
            planned = peftc.plan(
                gm,
                batch=args.batch,
                seq=args.seq,
                optimizer="adamw",
                dtype="bfloat16",
                world_size=world,
            )
            plan_seconds = time.perf_counter() - started
            method = method if world == 1 else f"{method}, FSDP2 x{world} (per rank)"
            print(
                f"LLaMA-2-{size} {method} (capture {capture_seconds:.0f} s, rewrite "
                f"{rewrite_seconds:.0f} s, plan {plan_seconds:.0f} s)\n{planned}",
                flush=True,
            )
            rows.append(
                {
                    "model": f"LLaMA-2-{size}",
                    "method": method,
                    "pipeline": pipeline,
                    "weights": planned.weights,
                    "optimizer_states": planned.optimizer_states,
                    "activations": planned.activations,
                    "peak": planned.peak,
                    "plan_seconds": plan_seconds,
                    "capture_seconds": capture_seconds,
                    "world_size": world,
                    "gathered": planned.gathered,
                }
            )
    print_table(
        [
            "model",
            "method",
            "weights (dense + NF4 + trainable)",
            "optimizer states",
            "saved activations",
            "predicted peak",
            "plan time",
        ],
        [
            [
                r["model"],
                r["method"],
                f"{sum(r['weights'].values()) / _GiB:.1f} GiB",
                f"{r['optimizer_states'] / _GiB:.2f} GiB",
                f"{r['activations'] / _GiB:.1f} GiB",
                f"**{r['peak'] / _GiB:.1f} GiB**",
                f"{r['plan_seconds']:.0f} s",
            ]
            for r in rows
        ],
    )
    result = {"command": command, "batch": args.batch, "seq": args.seq, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
