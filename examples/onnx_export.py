"""Deploy to ONNX Runtime: a LoRA-finetuned model merged to fp32, and its NF4 version kept 4-bit.

python examples/onnx_export.py [--steps 30] [--out onnx-out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import peftc
from peftc.backends import onnx as peftc_onnx

from shakespeare import batch, capture_tiny_llama, corpus, finetune


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("onnx-out"))
    args = parser.parse_args(argv)
    gm = peftc.apply(capture_tiny_llama(), "nf4, freeze, lora(r=8, alpha=16, targets='all-linear')")
    finetune(gm, args.steps)
    # another batch size and length
    ids = batch(corpus()[0], 3, 40, torch.Generator().manual_seed(3))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    gaps = {}
    for name, pipeline, options in (
        ("dense", 'merge(dtype="float32")', {}),
        ("nf4", "merge(requantize=true)", {}),
        ("int4", "merge(requantize=true)", {"quant": "int4"}),
    ):
        merged = peftc.apply(gm, pipeline)
        exported = peftc_onnx.export(merged, args.out / f"{name}.onnx", merged=True, **options)
        (logits,) = ort.InferenceSession(str(exported.path)).run(None, feeds)
        with torch.no_grad():
            eager = merged(ids, torch.ones_like(ids)).logits.numpy()
        gaps[name] = float(np.abs(logits - eager).max())
        print(exported)
        print(f"  ONNX Runtime vs eager {name}: max |diff| {gaps[name]:.1e}")
    return {"gaps": gaps}


if __name__ == "__main__":
    main()
