"""`fused_loss` against transformers' own loss in a graph captured with labels: the peak bytes of a
training step (PyTorch profiler's memory timeline, above the weights) and its time, in one run.

    python benchmarks/bench_fused_loss.py                    # vocabularies 8000 and 32000
    python benchmarks/bench_fused_loss.py --vocab 128000     # one vocabulary

Llama of bench_lora (4 layers, width 512), 8 x 128 tokens, LoRA r=8 on q,v, AdamW. This is a
benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse

from bench_compile import peak_bytes
from bench_lora import LLAMA_20M, batch, llama

import peftc

from common import begin, compare, print_table

VARIANTS = (None, "fused_loss", "fused_loss(logits=false)")


def step(gm, ids, mask):
    import torch

    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        gm(ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, action="append")
    args, _, _ = begin(parser, argv, "benchmarks/bench_fused_loss.py")
    rows = []
    for vocab in args.vocab or [8000, 32000]:
        model = llama(**{**LLAMA_20M["model"], "vocab": vocab})
        ids, mask = batch(vocab, *LLAMA_20M["batch"])
        captured = peftc.capture(model, (ids,), {"attention_mask": mask, "labels": ids})
        gm = peftc.apply(captured, "freeze, lora(r=8, alpha=16, targets='*.q_proj|*.v_proj')")
        fns = {
            v or "unfused": step(gm if v is None else peftc.apply(gm, v), ids, mask)
            for v in VARIANTS
        }
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
        times = compare(fns, repeat=5, warmup=1)
        for name in fns:
            rows.append(
                [
                    vocab,
                    name,
                    f"{peaks[name] / 2**20:.1f}",
                    f"{peaks[name] / peaks['unfused']:.2f}",
                    f"{times[name] * 1e3:.0f}",
                    f"{times[name] / times['unfused']:.2f}",
                ]
            )
    print_table(["vocabulary", "graph", "peak MiB", "vs unfused", "step ms", "vs unfused"], rows)


if __name__ == "__main__":
    main()
