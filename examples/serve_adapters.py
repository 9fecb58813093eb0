"""Serve several LoRA adapters over one base: in ONNX Runtime, chosen per request, and in PyTorch,
one per row.

Two adapters are trained on different parts of the corpus, then
1. exported as ONNX Runtime adapter files next to one base model; each request picks its adapter,
   and each equals its own merged model;
2. stacked by `multi_lora` into one graph that generates for a batch whose rows use different
   adapters (`peftc.generate`, with a key/value cache); each row equals what its adapter's merged
   model generates alone.

    python examples/serve_adapters.py [--steps 20] [--out served]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import peftc
from peftc.backends import onnx as peftc_onnx

from shakespeare import batch, capture_tiny_llama, corpus, finetune


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("served"))
    args = parser.parse_args(argv)
    gm = peftc.apply(capture_tiny_llama(), "freeze")
    for name, seed in (("early", 0), ("late", 1)):
        gm = peftc.apply(
            gm,
            f"lora(r=4, alpha=8, targets='*.q_proj|*.v_proj', adapter={name!r}), "
            f"set_adapter(name={name!r})",
        )
        finetune(gm, args.steps, seed=seed)
    served = peftc_onnx.export_adapters(gm, args.out / "base.onnx")
    print(served)
    session = peftc_onnx.AdapterSession(served)
    ids = batch(corpus()[0], 2, 40, torch.Generator().manual_seed(4))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gaps = {}
    for name in (None, "early", "late"):
        reference = peftc.apply(
            gm, "disable_adapters" if name is None else f"set_adapter(name={name!r}), merge"
        )
        with torch.no_grad():
            expected = reference(ids, torch.ones_like(ids)).logits.numpy()
        gaps[name or "base"] = float(np.abs(session.run(feeds, adapter=name)[0] - expected).max())
        print(
            f"adapter {name or '(none: base)'}: ONNX Runtime vs eager max |diff| "
            f"{gaps[name or 'base']:.1e}"
        )

    stacked = peftc.apply(gm, "multi_lora")
    prompts = [list(b"ROMEO:\n"), list(b"ROMEO:\n"), list(b"To be")]
    names = [None, "early", "late"]
    rows = peftc.generate(stacked, prompts, adapter_ids=names, max_new_tokens=24)
    alone = []
    for prompt, name in zip(prompts, names, strict=True):
        merged = peftc.apply(
            gm, "disable_adapters" if name is None else f"set_adapter(name={name!r}), merge"
        )
        alone.append(peftc.generate(merged, [prompt], max_new_tokens=24)[0])
    for prompt, name, tokens in zip(prompts, names, rows, strict=True):
        print(f"{name or 'base'}: {bytes(prompt + tokens).decode('utf-8', 'replace')!r}")
    return {"gaps": gaps, "adapters": session.adapters, "generated": rows, "alone": alone}


if __name__ == "__main__":
    main()
