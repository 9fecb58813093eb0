"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on a tiny Llama, trained on Tiny Shakespeare
bytes.

freeze, adapter(placement=...)  ->  train the adapters  ->  save and reload (peftc's checkpoint)
->  merge: the blocks stay (they are not a weight update) and the report says so

python examples/adapters.py [--steps 30] [--placement houlsby|pfeiffer|parallel] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import peftc

from shakespeare import batch, capture_tiny_llama, corpus, finetune, held_out_loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--placement", default="houlsby", choices=["houlsby", "pfeiffer", "parallel"]
    )
    parser.add_argument(
        "--reduction-factor",
        type=int,
        default=4,
        help="bottleneck width d / factor (tiny model: d = 64)",
    )
    parser.add_argument("--out", default="peftc-out")
    args = parser.parse_args(argv)

    base = capture_tiny_llama()
    pipeline = (
        f"freeze, adapter(placement='{args.placement}', reduction_factor={args.reduction_factor})"
    )
    gm = peftc.apply(base, pipeline)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    before = held_out_loss(gm)
    finetune(gm, args.steps)
    after = held_out_loss(gm)
    print(
        f"data: {corpus()[1]}\npipeline: {pipeline}\ntrainable parameters: {trainable:,} "
        f"({100 * trainable / peftc.summary(base).total:.1f}% of the base)"
    )
    print(f"held-out loss {before:.3f} -> {after:.3f} after {args.steps} steps")

    # safetensors + the pass options as JSON
    folder = peftc.save_adapter(gm, Path(args.out) / "adapter")
    reloaded = peftc.load_adapter(base, folder)
    ids = batch(corpus()[0], 2, 48, torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = gm(ids, torch.ones_like(ids)).logits
        reload_gap = (reloaded(ids, torch.ones_like(ids)).logits - logits).abs().max().item()
    merge = peftc.Pipeline.parse("merge").run(gm)
    print(f"saved to {folder} and reloaded: max |logit diff| {reload_gap:.1e}")
    print(f"merge: {merge.results[0].report}")
    return {
        "gm": gm,
        "before": before,
        "after": after,
        "trainable": trainable,
        "reload_gap": reload_gap,
        "merge": merge.results[0],
    }


if __name__ == "__main__":
    main()
