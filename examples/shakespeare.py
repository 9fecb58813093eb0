"""Tiny Shakespeare as bytes, and a short finetune of a tiny Llama on it: shared by the technique
examples.

Byte-level modelling needs no tokenizer: the tiny Llama's vocabulary is 256. The corpus is read from
$PEFTC_SHAKESPEARE or ../shared/data/tinyshakespeare/input.txt beside the repository; without it,
a sonnet kept here stands in (the examples say which).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.nn import functional as F

import peftc
from peftc.tools.models import tiny_model

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
SONNET_18 = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


def corpus() -> tuple[torch.Tensor, str]:
    """The corpus as a uint8 tensor, and where it came from."""
    path = Path(os.environ.get("PEFTC_SHAKESPEARE", DEFAULT))
    if path.is_file():
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), str(path)
    return torch.frombuffer(
        bytearray(SONNET_18.encode()), dtype=torch.uint8
    ), "Sonnet 18 (Tiny Shakespeare not found)"


def batch(data: torch.Tensor, size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length, (size,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()]).long()


def lm_loss(gm: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = gm(ids, torch.ones_like(ids)).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def capture_tiny_llama() -> torch.fx.GraphModule:
    model = tiny_model("llama", seed=0)
    ids = torch.arange(32).view(2, 16) + 65
    return peftc.capture(model, (ids,), {"attention_mask": torch.ones_like(ids)})


def finetune(
    gm: torch.fx.GraphModule, steps: int = 30, lr: float = 1e-2, seed: int = 0
) -> list[float]:
    """AdamW on `gm`'s trainable weights, next-byte prediction on batches of 8 x 64 bytes."""
    data, _ = corpus()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    gm.train()
    losses = []
    for _ in range(steps):
        loss = lm_loss(gm, batch(data, 8, 64, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    gm.eval()
    return losses


@torch.no_grad()
def held_out_loss(gm: torch.fx.GraphModule, seed: int = 1) -> float:
    data, _ = corpus()
    return lm_loss(gm, batch(data, 16, 64, torch.Generator().manual_seed(seed))).item()


def adapt_train_merge(pipeline: str, steps: int, merge: str = "merge") -> dict:
    """Capture the tiny Llama, run `pipeline`, finetune, merge; report the losses and how far the
    merged model's logits are from the unmerged ones."""
    gm = peftc.apply(capture_tiny_llama(), pipeline)
    before = held_out_loss(gm)
    losses = finetune(gm, steps)
    after = held_out_loss(gm)
    merged = peftc.apply(gm, merge)
    ids = batch(corpus()[0], 2, 48, torch.Generator().manual_seed(2))
    with torch.no_grad():
        gap = (
            (merged(ids, torch.ones_like(ids)).logits - gm(ids, torch.ones_like(ids)).logits)
            .abs()
            .max()
            .item()
        )
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    print(f"data: {corpus()[1]}\npipeline: {pipeline}\ntrainable parameters: {trainable:,}")
    print(
        f"held-out loss {before:.3f} -> {after:.3f} after {steps} steps; {merge}: merged vs "
        f"unmerged max |diff| {gap:.1e}"
    )
    return {
        "gm": gm,
        "merged": merged,
        "before": before,
        "after": after,
        "losses": losses,
        "merge_gap": gap,
        "trainable": trainable,
    }


def steps_from(argv: list[str] | None, doc: str, default: int = 30) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=default)
    return parser.parse_args(argv).steps
