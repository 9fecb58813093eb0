"""Prefix tuning the real all-MiniLM-L6-v2 for SST-2: trainable keys and values in front of every
attention's own.

    freeze, prefix(n=10, prefix_projection=true)
      ->  train the prefix (through peft's reparameterisation MLP) and the head
      ->  save the prefix in peft's format, load it into a fresh rewrite without the MLP

peft saves a projected prefix as its output, one flat (n, 2 * layers * hidden) table, so a
checkpoint loads into `prefix(n=10)` and gives the same predictions with no MLP left to run.

    python examples/prefix_tuning.py [--steps 150] [--data DIR] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import torch

import peftc

from sst2 import arguments, finetune

PIPELINE = "freeze, prefix(n=10, prefix_projection=true, encoder_hidden_size=128)"


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__, argv, pipeline=PIPELINE, lr=1e-3)
    run = finetune(args)
    model, tokenizer, dev = run["model"], run["tokenizer"], run["dev"]

    folder = peftc.save_adapter(model, Path(args.out) / "prefix")
    n = model.get_parameter("prompt_encoder.default.embedding.weight").shape[0]
    # rewritten by prefix(n=10) as it loads
    flat = peftc.load_adapter(peftc.apply(run["captured"], "freeze"), folder)
    # the head is ours, not part of peft's prefix checkpoint
    flat.head.load_state_dict(model.head.state_dict())
    batch = tokenizer(dev[0][:16], padding=True, return_tensors="pt")
    with torch.no_grad():
        reloaded_gap = (
            (
                flat(batch["input_ids"], batch["attention_mask"])
                - model(batch["input_ids"], batch["attention_mask"])
            )
            .abs()
            .max()
            .item()
        )
    print(
        f"saved the prefix to {folder}; loaded into prefix(n={n}) without the MLP, max |logit "
        f"diff| {reloaded_gap:.1e}"
    )
    return dict(
        run,
        reloaded_gap=reloaded_gap,
        checkpoint=folder,
        flat_parameters=sum(
            p.numel() for n_, p in flat.named_parameters() if n_.startswith("prompt_encoder")
        ),
    )


if __name__ == "__main__":
    main()
