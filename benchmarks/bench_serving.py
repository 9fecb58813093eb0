"""Serving requests spread over many LoRA adapters of one base, three ways, in one run:

1. peftc `multi_lora`: the whole mixed batch at once (each row picks its adapter by id);
2. the adapter-by-adapter loop: peft's `set_adapter(name)`, then that adapter's requests as one
   batch;
3. peft's mixed batch: `adapter_names=` (peft loops over the adapters inside each layer).

Two workloads: generation (`peftc.generate` against peft's `generate`: 16 greedy tokens after a
16-token prompt, the serving case) and one forward over 128-token requests (prefill). A random-init
Llama-shaped model (hidden 512, 4 layers, vocab 32000) with N rank-8 LoRA adapters on every linear;
32 requests, round-robin over the adapters; float32, no gradients. The methods' outputs are checked
against each other before timing.

    python benchmarks/bench_serving.py               # 8 and 32 adapters, ~15 min on 2 cores
    python benchmarks/bench_serving.py --adapters 4 --requests 8 --seq 32
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import peftc

from common import begin, compare, print_table, write_json


def _setup(adapters: int, seq: int):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max(seq, 512),
    )
    model = LlamaForCausalLM(config).eval()
    names = [f"adapter{i}" for i in range(adapters)]
    peft_model = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=8, target_modules="all-linear"),
        adapter_name=names[0],
    )
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


def bench(adapters: int, requests: int, seq: int, repeat: int, new_tokens: int = 16) -> dict:
    peft_model, served, names = _setup(adapters, seq)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (requests, seq), generator=generator)
    prompts = torch.randint(3, 32000, (requests, 16), generator=generator)
    mask = torch.ones_like(ids)
    wanted = [names[i % adapters] for i in range(requests)]
    adapter_ids = peftc.adapter_ids(served, wanted)
    groups = {name: [i for i, w in enumerate(wanted) if w == name] for name in names}

    def generate_mixed():
        return torch.tensor(
            peftc.generate(served, prompts, adapter_ids=wanted, max_new_tokens=new_tokens)
        )

    def peft_generate(rows, **extra):
        out = peft_model.generate(
            input_ids=prompts[rows],
            attention_mask=torch.ones_like(prompts[rows]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )
        return out[:, prompts.shape[1] :]

    def generate_loop():
        out = torch.empty(requests, new_tokens, dtype=torch.long)
        for name, rows in groups.items():
            peft_model.set_adapter(name)
            out[rows] = peft_generate(rows)
        return out

    def generate_peft_mixed():
        return peft_generate(list(range(requests)), adapter_names=wanted)

    def forward_mixed():
        return served(ids, attention_mask=mask, adapter_ids=adapter_ids).logits

    def forward_loop():
        out = torch.empty(requests, seq, 32000)
        for name, rows in groups.items():
            peft_model.set_adapter(name)
            out[rows] = peft_model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        return out

    def forward_peft_mixed():
        return peft_model(input_ids=ids, attention_mask=mask, adapter_names=wanted).logits

    with torch.no_grad():
        reference = forward_loop()
        for fn in (forward_mixed, forward_peft_mixed):
            error = (fn() - reference).abs().max().item()
            if error > 1e-3:
                raise RuntimeError(
                    f"{fn.__name__} differs from the adapter-by-adapter loop by {error}"
                )
        tokens = generate_loop()
        agree = {
            fn.__name__: (fn() == tokens).float().mean().item()
            for fn in (generate_mixed, generate_peft_mixed)
        }
        seconds = {
            "generate": compare(
                {
                    "peftc multi_lora": generate_mixed,
                    "adapter-by-adapter loop (peft)": generate_loop,
                    "peft adapter_names=": generate_peft_mixed,
                },
                repeat=repeat,
                warmup=1,
            ),
            "forward": compare(
                {
                    "peftc multi_lora": forward_mixed,
                    "adapter-by-adapter loop (peft)": forward_loop,
                    "peft adapter_names=": forward_peft_mixed,
                },
                repeat=repeat,
                warmup=1,
            ),
        }
    print(f"{adapters} adapters: generated tokens equal to the loop's: {agree}", flush=True)
    return {
        "adapters": adapters,
        "requests": requests,
        "seq": seq,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_equal_to_loop": agree,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapters", type=int, action="append", help="adapter counts (default: 8 and 32)"
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args, command, _ = begin(parser, argv, "benchmarks/bench_serving.py")
    runs = [bench(n, args.requests, args.seq, args.repeat) for n in args.adapters or (8, 32)]
    rows = []
    for run in runs:
        for workload, timed in run["seconds"].items():
            loop = timed["adapter-by-adapter loop (peft)"]
            tokens = run["requests"] * (run["new_tokens"] if workload == "generate" else run["seq"])
            for method, seconds in timed.items():
                rows.append(
                    [
                        run["adapters"],
                        workload,
                        method,
                        f"{seconds * 1e3:.0f} ms",
                        f"{tokens / seconds:,.0f}",
                        f"{loop / seconds:.2f}x",
                    ]
                )
    print_table(
        [
            "adapters",
            "workload",
            "method",
            f"{args.requests} requests",
            "tokens/s (new or prefilled)",
            "throughput vs loop",
        ],
        rows,
    )
    result = {"command": command, "runs": runs}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
