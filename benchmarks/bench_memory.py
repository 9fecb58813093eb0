"""Memory of one training step, measured and planned: full finetuning, LoRA, QLoRA, adapters, QST.

The same random-init Llama-shaped model (hidden 768, 12 layers, vocab 32000: ~134M parameters,
~540 MB in fp32), batch and length for every method. For each pipeline:

1. measured peak: PyTorch's profiler memory timeline (every allocation and free, the tensors alive
   before the profile included) over one AdamW step (forward, cross-entropy, backward, step) taken
   after a warm-up step, so optimizer states exist;
2. planned peak: `peftc.plan` on fake tensors, and its error against the measurement;
3. step time: the median of timed steps without the profiler.

    python benchmarks/bench_memory.py                  # batch 8 x 256, ~20 min on 2 cores
    python benchmarks/bench_memory.py --batch 2 --seq 64 --layers 2 --only qlora --only qst

Nothing is asserted; the ratios are printed against QLoRA measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

import peftc

from common import begin, print_table, write_json

METHODS = {
    "full": "identity",
    "lora": "freeze, lora(r=8, targets='all-linear')",
    "qlora": "nf4, freeze, lora(r=8, targets='all-linear')",
    "adapters": "freeze, adapter(placement='houlsby')",
    "qst": "nf4, side",
}
_MiB = 2**20


def _model(layers: int, seq: int) -> torch.fx.GraphModule:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=max(seq, 512),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32000, (2, 16))
    return peftc.capture(model, (ids,), {"attention_mask": torch.ones_like(ids)})


def _step(gm, optimizer, ids) -> None:
    logits = gm(ids, attention_mask=torch.ones_like(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _measured_peak(gm, optimizer, ids) -> int:
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        _step(gm, optimizer, ids)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max(sum(s) for s in sizes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", action="append", choices=sorted(METHODS))
    args, command, _ = begin(parser, argv, "benchmarks/bench_memory.py")
    base = _model(args.layers, args.seq)
    ids = torch.randint(
        0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    print(
        f"model: Llama-shaped, hidden 768, {args.layers} layers, {peftc.summary(base).total:,} "
        f"parameters; batch {args.batch} x {args.seq}",
        flush=True,
    )
    rows = {}
    for name in args.only or METHODS:
        gm = peftc.apply(base, METHODS[name])
        gm.train()
        started = time.perf_counter()
        planned = peftc.plan(gm, batch=args.batch, seq=args.seq)
        plan_seconds = time.perf_counter() - started
        optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)
        _step(gm, optimizer, ids)  # warm-up: optimizer states exist from here on
        measured = _measured_peak(gm, optimizer, ids)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            _step(gm, optimizer, ids)
            times.append(time.perf_counter() - started)
        rows[name] = {
            "pipeline": METHODS[name],
            "measured_peak": measured,
            "planned_peak": planned.peak,
            "planner_error": planned.peak / measured - 1,
            "activations": planned.activations,
            "step_seconds": statistics.median(times),
            "plan_seconds": plan_seconds,
        }
        print(f"{name}: {rows[name]}", flush=True)
    ref = rows.get("qlora", {}).get("measured_peak")
    print_table(
        [
            "method",
            "pipeline",
            "measured peak",
            "planned peak",
            "planner error",
            "saved activations (planned)",
            "step",
            "peak vs QLoRA",
        ],
        [
            [
                name,
                f"`{r['pipeline']}`",
                f"{r['measured_peak'] / _MiB:.0f} MiB",
                f"{r['planned_peak'] / _MiB:.0f} MiB",
                f"{100 * r['planner_error']:+.1f} %",
                f"{r['activations'] / _MiB:.0f} MiB",
                f"{r['step_seconds']:.2f} s",
                f"{r['measured_peak'] / ref:.2f}" if ref else "-",
            ]
            for name, r in rows.items()
        ],
    )
    result = {
        "command": command,
        "batch": args.batch,
        "seq": args.seq,
        "layers": args.layers,
        "rows": rows,
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
