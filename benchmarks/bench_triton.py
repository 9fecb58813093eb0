"""One QLoRA training step, four ways: eager peftc, peftc lowered to Triton, lowered +
torch.compile, and HF peft over bitsandbytes' Linear4bit (the peer), on the same random-init
Llama-shaped model.

On a CUDA device (the default there): ~1B parameters (hidden 2048, 16 layers, intermediate 5632,
vocab 32000), bfloat16, NF4 base with double quantization, LoRA r=16 on every linear but the head,
batch 4 x 1024, AdamW. Each row: the median step time (forward, cross-entropy, backward, optimizer
step; after warm-up steps), tokens/s, and the peak of `torch.cuda.max_memory_allocated` over the
timed steps. Ratios are against eager peftc and against peft + bitsandbytes, measured in the same
run.

Without a GPU, `--tiny` runs the same code on a 2-layer model on Triton's CPU interpreter: a smoke
check that the script works, not a measurement.

    python benchmarks/bench_triton.py --json $OUT/bench_triton.json   # on a GPU (gpu_check.sh)
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --tiny          # anywhere, ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import peftc

from common import begin, print_table, write_json

SIZES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}
LORA = dict(r=16, alpha=32)


def _model(size: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SIZES[size])
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def _peftc(model, ids, lowering: str):
    gm = peftc.capture(model, (ids[:2],), {"attention_mask": torch.ones_like(ids[:2])})
    pipeline = (
        f"nf4, freeze, lora(r={LORA['r']}, alpha={LORA['alpha']}, targets='all-linear')" + lowering
    )
    gm = peftc.apply(gm, pipeline)
    return gm.train(), lambda: gm(ids, attention_mask=torch.ones_like(ids)).logits


def _peft_bnb(model, ids, dtype):
    import bitsandbytes as bnb
    import peft

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and f"{name}.{child_name}" != "lm_head":
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu(),
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                setattr(module, child_name, quantized.to(ids.device))
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear")
    )
    return (
        wrapped.train(),
        lambda: wrapped(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
    )


def _measure(module, forward, ids, steps: int, warmup: int, device: str) -> dict:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        logits = forward()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        losses.append(step())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    seconds = statistics.median(times)
    return {
        "step_seconds": seconds,
        "tokens_per_second": ids.numel() / seconds,
        "peak_bytes": peak,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="2-layer model, batch 2 x 32 (a smoke run; no GPU needed)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--only", action="append", choices=["eager", "triton", "triton+compile", "peft+bnb"]
    )
    args, command, _ = begin(parser, argv, "benchmarks/bench_triton.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, (batch, seq) = ("tiny", (2, 32)) if args.tiny or device == "cpu" else ("1b", (4, 1024))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids = torch.randint(
        0,
        32000,
        (batch, seq),
        device=device,
        generator=torch.Generator().manual_seed(1) if device == "cpu" else None,
    )
    makers = {
        "eager": lambda m: _peftc(m, ids, ""),
        "triton": lambda m: _peftc(m, ids, ", triton"),
        "triton+compile": lambda m: _peftc(m, ids, ", triton(compile=true)"),
        "peft+bnb": lambda m: _peft_bnb(m, ids, dtype),
    }
    rows = {}
    for name in args.only or makers:
        try:
            rows[name] = _measure(
                *makers[name](_model(size, device, dtype)), ids, args.steps, args.warmup, device
            )
        # a peer that cannot run here (bitsandbytes without its backend) is reported, not fatal
        except Exception as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"{name}: {rows[name]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    eager, peer = rows.get("eager", {}), rows.get("peft+bnb", {})

    def ratio(r: dict, ref: dict, key: str) -> str:
        return f"{r[key] / ref[key]:.2f}" if key in r and ref.get(key) else "-"

    print(f"\nLlama-shaped {size} ({SIZES[size]}), {dtype}, batch {batch} x {seq}, {device}")
    print_table(
        [
            "method",
            "step",
            "tokens/s",
            "peak memory",
            "step vs eager peftc",
            "step vs peft+bnb",
            "peak vs peft+bnb",
        ],
        [
            [
                name,
                f"{r['step_seconds'] * 1e3:.0f} ms",
                f"{r['tokens_per_second']:.0f}",
                f"{r['peak_bytes'] / 2**30:.2f} GiB",
                ratio(r, eager, "step_seconds"),
                ratio(r, peer, "step_seconds"),
                ratio(r, peer, "peak_bytes"),
            ]
            if "error" not in r
            else [name, r["error"], "", "", "", "", ""]
            for name, r in rows.items()
        ],
    )
    result = {
        "command": command,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "size": size,
        "batch": batch,
        "seq": seq,
        "dtype": str(dtype),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
