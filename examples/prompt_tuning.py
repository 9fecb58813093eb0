"""Prompt tuning the real all-MiniLM-L6-v2 for SST-2: 20 trainable virtual tokens in front of every
sentence.

    freeze, prompt(n=20, init="text", text=...)  ->  train the prompt and the head
      ->  save the prompt in peft's format, load it into the frozen classifier
      ->  export to ONNX (the prompt is an initializer)

The prompt starts as the embeddings of a task description (peft's PromptTuningInit.TEXT), tokenized
by the captured model's own tokenizer. The model keeps its interface: the same inputs, per-token
states of the user's positions only, so the head's mean pooling needs no change.

    python examples/prompt_tuning.py [--steps 150] [--data DIR] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import peftc
from peftc.tools.demo import evaluate_onnx

from sst2 import arguments, finetune

PIPELINE = (
    'freeze, prompt(n=20, init="text", text="Is the sentiment of this movie review positive '
    'or negative?")'
)


def main(argv: list[str] | None = None) -> dict:
    # prompts want a larger step than LoRA's 1e-3
    args = arguments(__doc__, argv, pipeline=PIPELINE, lr=3e-2)
    run = finetune(args)
    model, tokenizer, dev = run["model"], run["tokenizer"], run["dev"]
    out = Path(args.out)

    # adapter_config.json + adapter_model.safetensors, as peft writes
    folder = peftc.save_adapter(model, out / "prompt")
    # a copy rewritten by prompt(n=20)
    fresh = peftc.load_adapter(peftc.apply(run["captured"], "freeze"), folder)
    # the head is ours, not part of peft's prompt checkpoint
    fresh.head.load_state_dict(model.head.state_dict())
    batch = tokenizer(dev[0][:16], padding=True, return_tensors="pt")
    with torch.no_grad():
        reloaded_gap = (
            (
                fresh(batch["input_ids"], batch["attention_mask"])
                - model(batch["input_ids"], batch["attention_mask"])
            )
            .abs()
            .max()
            .item()
        )
    print(
        f"saved the prompt to {folder}; loaded into the frozen classifier, max |logit diff| "
        f"{reloaded_gap:.1e}"
    )

    from peftc.backends import onnx as peftc_onnx

    exported = peftc_onnx.export(model, out / "prompt_tuned.onnx")
    onnx_accuracy = evaluate_onnx(exported.path, tokenizer, dev)
    import onnx
    from onnx import numpy_helper

    # peft's name
    learned = model.get_parameter("prompt_encoder.default.embedding.weight").detach().numpy()
    kept = any(
        np.array_equal(numpy_helper.to_array(t).reshape(-1), learned.reshape(-1))
        for t in onnx.load(str(exported.path)).graph.initializer
    )
    print(
        f"ONNX Runtime dev accuracy {onnx_accuracy:.4f}; the learned prompt is an initializer: "
        f"{kept}"
    )
    return dict(
        run,
        reloaded_gap=reloaded_gap,
        onnx_accuracy=onnx_accuracy,
        prompt_in_onnx=kept,
        checkpoint=folder,
    )


if __name__ == "__main__":
    main()
