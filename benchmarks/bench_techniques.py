"""PEFT methods side by side on the real all-MiniLM-L6-v2 and GLUE SST-2: dev accuracy for the same
steps.

Full finetuning, LoRA, QLoRA, QST, bottleneck adapters (Houlsby, Pfeiffer, parallel) and the prompt
methods: the lecture's adapter table in miniature.

Each method's pipeline runs over the same captured classifier (MiniLM + a fresh linear head on its
mean-pooled token states, `peftc.tools.demo.build_mean_pooled`); the pipeline's parameters and the
head train with AdamW for the same steps, batch and data order; each method gets its usual
learning rate (prompts and prefixes are trained with larger steps than LoRA). Reported per method:
trainable parameters, dev accuracy before and after, ms per training step and its ratio to LoRA's in
the same run.

    python benchmarks/bench_techniques.py      # 150 steps of 32, full dev set, ~35 min on 2 cores
    python benchmarks/bench_techniques.py --steps 30 --dev-size 200 --only prompt

Accuracy, not speed, is the point; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import time
from statistics import mean

import peftc
from peftc.tools.demo import build_mean_pooled, evaluate, load_data, train

from common import begin, print_table, write_json

METHODS = {  # name: (pipeline, learning rate)
    "full": ("identity", 5e-5),  # every weight trains
    "lora": ('freeze, lora(r=8, alpha=16, dropout=0.1, targets="*.query|*.value")', 1e-3),
    "qlora": (
        'nf4(targets="encoder.*"), freeze, lora(r=8, alpha=16, dropout=0.1, '
        'targets="*.query|*.value")',
        1e-3,
    ),
    "qst": ('nf4(targets="encoder.*"), side', 1e-3),
    "houlsby": ("freeze, adapter(placement='houlsby')", 1e-3),
    "pfeiffer": ("freeze, adapter(placement='pfeiffer')", 1e-3),
    "parallel": ("freeze, adapter(placement='parallel')", 1e-3),
    "prompt": (
        'freeze, prompt(n=20, init="text", text="Is the sentiment of this movie review positive or '
        'negative?")',
        3e-2,
    ),
    "ptuning": ("freeze, ptuning(n=20, encoder='mlp', hidden=128)", 1e-3),
    "prefix": ("freeze, prefix(n=10, prefix_projection=true, encoder_hidden_size=128)", 1e-3),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dev-size", type=int, help="the first N dev sentences (default: all 872)")
    parser.add_argument("--data", help="SST-2 folder (default: $PEFTC_SST2, ../shared/data/sst2)")
    parser.add_argument(
        "--only", action="append", choices=sorted(METHODS), help="run only these methods"
    )
    args, command, _ = begin(parser, argv, "benchmarks/bench_techniques.py")
    data = load_data(args.data)
    dev = (data.dev[0][: args.dev_size], data.dev[1][: args.dev_size])
    print(
        f"data: {data.name}; {args.steps} steps of {args.batch_size}; {len(dev[0])} dev sentences"
    )
    rows = {}
    for name in args.only or METHODS:
        pipeline, lr = METHODS[name]
        captured, model, tokenizer = build_mean_pooled(pipeline)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = peftc.summary(captured).total
        before = evaluate(model, tokenizer, dev)
        started = time.perf_counter()
        losses = train(
            model,
            tokenizer,
            data.train,
            args.steps,
            args.batch_size,
            lr,
            progress=False,
            compile="off",  # every method timed eager
        ).losses
        step_ms = 1000 * (time.perf_counter() - started) / args.steps
        rows[name] = {
            "pipeline": pipeline,
            "lr": lr,
            "trainable": trainable,
            "percent": 100 * trainable / base,
            "before": before,
            "after": evaluate(model, tokenizer, dev),
            "step_ms": step_ms,
            "first_loss": mean(losses[:10]),
            "last_loss": mean(losses[-10:]),
        }
        print(f"{name}: {rows[name]}", flush=True)
    lora_ms = rows.get("lora", {}).get("step_ms")
    print_table(
        [
            "method",
            "pipeline",
            "lr",
            "trainable (head's 770 included)",
            "% of base",
            "dev acc before",
            "after",
            "loss first 10 -> last 10",
            "ms/step",
            "vs LoRA",
        ],
        [
            [
                name,
                f"`{r['pipeline']}`",
                f"{r['lr']:g}",
                f"{r['trainable']:,}",
                f"{r['percent']:.2f}",
                f"{r['before']:.4f}",
                f"{r['after']:.4f}",
                f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}",
                f"{r['step_ms']:.0f}",
                f"{r['step_ms'] / lora_ms:.2f}" if lora_ms else "-",
            ]
            for name, r in rows.items()
        ],
    )
    result = {"command": command, "peftc": peftc.__version__, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
