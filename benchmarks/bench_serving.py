"""Serving a batch of requests spread over many LoRA adapters of one base, three ways, in one run:

1. peftc `multi_lora`: the whole mixed batch in one forward (each row picks its adapter by id);
2. the adapter-by-adapter loop: peft's `set_adapter(name)`, then a forward of that adapter's requests;
3. peft's mixed batch: one forward with `adapter_names=` (peft loops over adapters inside each layer).

A random-init Llama-shaped model (hidden 512, 4 layers, vocab 32000) with N rank-8 LoRA adapters on
every linear; 32 requests of 128 tokens, round-robin over the adapters; forward passes (prefill) in
float32 with no gradients. Rows of every method are checked against each other before timing.

    python benchmarks/bench_serving.py               # 8 and 32 adapters, ~3 min on 2 cores
    python benchmarks/bench_serving.py --adapters 4 --requests 8 --seq 32
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from common import begin, compare, print_table, write_json

import peftc


def _setup(adapters: int, seq: int):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max(seq, 512))
    model = LlamaForCausalLM(config).eval()
    names = [f"adapter{i}" for i in range(adapters)]
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, target_modules="all-linear"),
                                     adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, peft.LoraConfig(r=8, target_modules="all-linear"))
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_B" in key:
                p.normal_(std=0.02)
    ids = torch.zeros(2, 16, dtype=torch.long)
    gm = peftc.capture(model, (ids,), {"attention_mask": torch.ones_like(ids)})
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        for name in names:  # peft writes each named adapter to its own subfolder
            gm = peftc.load_adapter(gm, Path(folder) / name, adapter=name, verify=False)
    print(f"{adapters} adapters loaded", flush=True)
    return peft_model.eval(), peftc.apply(gm, "multi_lora"), names


def bench(adapters: int, requests: int, seq: int, repeat: int) -> dict:
    peft_model, served, names = _setup(adapters, seq)
    ids = torch.randint(3, 32000, (requests, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    wanted = [names[i % adapters] for i in range(requests)]
    adapter_ids = peftc.adapter_ids(served, wanted)
    groups = {name: [i for i, w in enumerate(wanted) if w == name] for name in names}

    def mixed():
        return served(ids, attention_mask=mask, adapter_ids=adapter_ids).logits

    def loop():
        out = torch.empty(requests, seq, 32000)
        for name, rows in groups.items():
            peft_model.set_adapter(name)
            out[rows] = peft_model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        return out

    def peft_mixed():
        return peft_model(input_ids=ids, attention_mask=mask, adapter_names=wanted).logits

    with torch.no_grad():
        reference = loop()
        for fn in (mixed, peft_mixed):
            error = (fn() - reference).abs().max().item()
            if error > 1e-3:
                raise RuntimeError(f"{fn.__name__} differs from the adapter-by-adapter loop by {error}")
        seconds = compare({"peftc multi_lora": mixed, "adapter-by-adapter loop (peft)": loop,
                           "peft adapter_names=": peft_mixed}, repeat=repeat, warmup=1)
    return {"adapters": adapters, "requests": requests, "seq": seq, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, action="append", help="adapter counts (default: 8 and 32)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args, command, _ = begin(parser, argv, "benchmarks/bench_serving.py")
    runs = [bench(n, args.requests, args.seq, args.repeat) for n in args.adapters or (8, 32)]
    rows = []
    for run in runs:
        loop = run["seconds"]["adapter-by-adapter loop (peft)"]
        for method, seconds in run["seconds"].items():
            tokens = run["requests"] * run["seq"] / seconds
            rows.append([run["adapters"], method, f"{seconds * 1e3:.0f} ms", f"{tokens:,.0f}", f"{loop / seconds:.2f}x"])
    print_table(["adapters", "method", f"{args.requests} requests x {args.seq} tokens", "tokens/s",
                 "throughput vs loop"], rows)
    result = {"command": command, "runs": runs}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
