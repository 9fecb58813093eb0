"""Quantized side tuning (QST) on a tiny Llama, trained on Tiny Shakespeare bytes, planned against
QLoRA.

    nf4, side  ->  plan the step's memory next to QLoRA's  ->  train the side network
      ->  save and reload

The base is NF4 and frozen; taps on every block feed a small side network whose output is mixed into
the final hidden state (from 0: the model starts as the base). Autograd records no base op, so the
base keeps no activations for backward, which the plan shows against QLoRA at the same batch.

    python examples/side_tuning.py [--steps 30] [--reduction-factor 4] [--out DIR]
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
        "--reduction-factor", type=int, default=4, help="side width d / factor (tiny model: d = 64)"
    )
    parser.add_argument("--out", default="peftc-out")
    args = parser.parse_args(argv)

    base = capture_tiny_llama()
    qst = peftc.apply(base, f"nf4, side(reduction_factor={args.reduction_factor})")
    qlora = peftc.apply(base, "nf4, freeze, lora(r=8, targets='all-linear')")
    # finetune's batch
    plans = {
        "qlora": peftc.plan(qlora, batch=8, seq=64),
        "qst": peftc.plan(qst, batch=8, seq=64),
    }
    for name, plan in plans.items():
        print(
            f"{name}: activations saved {plan.activations / 2**20:.2f} MiB, predicted peak "
            f"{plan.peak / 2**20:.2f} MiB"
        )

    before = held_out_loss(qst)
    finetune(qst, args.steps)
    after = held_out_loss(qst)
    trainable = sum(p.numel() for p in qst.parameters() if p.requires_grad)
    print(
        f"data: {corpus()[1]}\ntrainable parameters: {trainable:,}\nheld-out loss {before:.3f} -> "
        f"{after:.3f} after {args.steps} steps"
    )

    folder = peftc.save_adapter(qst, Path(args.out) / "side")
    reloaded = peftc.load_adapter(peftc.apply(base, "nf4"), folder)
    ids = batch(corpus()[0], 2, 48, torch.Generator().manual_seed(2))
    with torch.no_grad():
        gap = (
            (reloaded(ids, torch.ones_like(ids)).logits - qst(ids, torch.ones_like(ids)).logits)
            .abs()
            .max()
            .item()
        )
    print(
        f"saved the side network to {folder}; reloaded over a fresh NF4 base: max |logit diff| "
        f"{gap:.1e}"
    )
    return {
        "gm": qst,
        "plans": plans,
        "before": before,
        "after": after,
        "trainable": trainable,
        "reload_gap": gap,
    }


if __name__ == "__main__":
    main()
