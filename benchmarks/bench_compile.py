"""peftc eager and compiled against peft eager and peft + torch.compile, in one run, interleaved.

    python benchmarks/bench_compile.py                  # Llama 20.8M and MiniLM, ~15 min on 2 cores
    python benchmarks/bench_compile.py --quick          # smaller Llama, fewer repeats
    python benchmarks/bench_compile.py --only lora --only qlora

For each technique, a training step (forward, loss, backward, AdamW) and an inference forward
(eval, no_grad), each timed as the median of interleaved repeats after warm-up:
- peftc eager: the rewritten graph (`peftc.apply`);
- peftc compiled: `peftc.compile(gm)` (Inductor, fullgraph, batch and sequence dynamic);
- peft eager: `peft.get_peft_model` on a copy of the same model;
- peft compiled: `torch.compile(peft_model)` (default mode), as peft's docs show.
Compile time (the first call, warm-up included) is reported apart, and the peak memory of one
training step above the weights (PyTorch profiler's memory timeline) beside each time. LoRA and
DoRA copy peft's initial adapter into peftc and check the first loss agrees; IA3 and prefix use
each side's own initialisation (same shapes and trainable counts). QLoRA (NF4 base) compares
peftc compiled with peftc eager: peft's peer would be bitsandbytes' CPU 4-bit layers.
This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_lora import LLAMA_20M, batch, llama, pair, size
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

import peftc

from common import begin, compare, print_table, write_json

TECHNIQUES = {
    # name: (peftc pipeline, peft's config: its kind)
    "lora": ("freeze, lora(r=8, alpha=16, targets='*.q_proj|*.v_proj')", "lora"),
    "dora": ("freeze, lora(r=8, alpha=16, dora=true, targets='*.q_proj|*.v_proj')", "dora"),
    "qlora": ("nf4, freeze, lora(r=8, alpha=16, targets='*.q_proj|*.v_proj')", None),
    "ia3": (
        "freeze, ia3(targets='*.k_proj|*.v_proj|*.down_proj', feedforward_modules=['down_proj'])",
        "ia3",
    ),
    "prefix": ("freeze, prefix(n=16)", "prefix"),
    "minilm": ("freeze, lora(r=8, alpha=16, targets='*.query|*.value')", "minilm"),
}


def peft_config(kind: str):
    import peft

    if kind in ("lora", "dora"):
        return peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=kind == "dora"
        )
    if kind == "minilm":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    if kind == "ia3":
        return peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    return peft.PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")


def loss_of(output, ids):
    if getattr(output, "loss", None) is not None:  # captured with labels: the graph's own loss
        return output.loss
    logits = output["logits"] if isinstance(output, dict) or hasattr(output, "keys") else output
    if logits.dim() == 2:  # a classifier
        return F.cross_entropy(logits, ids[:, 0] % logits.shape[-1])
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_step(module, params, ids, mask, extra) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(module(ids, attention_mask=mask, **extra), ids)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def infer(module, ids, mask, extra) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(ids, attention_mask=mask, **extra)
        if ids.is_cuda:  # time the work, not its launch
            torch.cuda.synchronize()

    return run


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes alive above the start of one call (PyTorch profiler's memory timeline; on
    CUDA, the allocator's peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - start
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def variants(model, ids, mask, name):
    """name -> (module, trainable parameters, extra kwargs) for the four paths."""
    import peft

    pipeline, kind = TECHNIQUES[name]
    model.train()
    if kind in ("lora", "dora", "minilm"):
        gm, pm = pair(model, ids, mask, pipeline, peft_config(kind), fill=True)
    else:
        gm = peftc.apply(peftc.capture(model, (ids,), {"attention_mask": mask}), pipeline)
        pm = peft.get_peft_model(copy.deepcopy(model), peft_config(kind)) if kind else None
    gm.train()
    out = {"peftc eager": (gm, {}), "peftc compiled": (peftc.compile(gm), {})}
    if name != "minilm":
        out[FUSED] = (peftc.compile(fused_twin(model, gm, ids, mask, pipeline)), {"labels": ids})
    if pm is not None:
        pm.train()
        eager = {"use_cache": False} if hasattr(model, "config") else {}
        out["peft eager"] = (pm, eager)
        out["peft compiled"] = (torch.compile(pm), eager)
    return {
        label: (m, [p for p in m.parameters() if p.requires_grad], extra)
        for label, (m, extra) in out.items()
    }


FUSED = "peftc compiled, fused_loss(logits=false)"  # a training step only: it has no logits


def fused_twin(model, gm, ids, mask, pipeline):
    """`gm` captured with labels, its LM head and loss fused, with `gm`'s adapter weights."""
    captured = peftc.capture(model, (ids,), {"attention_mask": mask, "labels": ids})
    twin = peftc.apply(captured, f"{pipeline}, fused_loss(logits=false)")
    twin.load_state_dict(gm.state_dict())
    return twin.train()


def measure(model, ids, mask, name, repeat, warmup):
    paths = variants(model, ids, mask, name)
    results = {}
    for mode in ("train", "infer"):
        fns, compile_s = {}, {}
        for label, (module, params, extra) in paths.items():
            if label == FUSED and mode == "infer":
                continue
            module.train(mode == "train")
            fn = (
                train_step(module, params, ids, mask, extra)
                if mode == "train"
                else infer(module, ids, mask, extra)
            )
            start = time.perf_counter()
            fn()  # compiles the compiled paths
            compile_s[label] = time.perf_counter() - start
            fns[label] = fn
        medians = compare(fns, repeat, warmup)
        peaks = (
            {label: peak_bytes(fn, ids.device) for label, fn in fns.items()}
            if mode == "train"
            else {}
        )
        for label in fns:
            results[(mode, label)] = (medians[label], compile_s[label], peaks.get(label))
    return results


def minilm_classifier():
    from peftc.tools.demo import SentimentModel
    from peftc.tools.models import load_model

    loaded = load_model("minilm")
    torch.manual_seed(0)
    return SentimentModel(loaded.model, loaded.model.config.hidden_size)


def rows_for(label, results, peer="peft eager"):
    rows = []
    for (mode, path), (seconds, compile_s, peak) in results.items():
        base = results.get((mode, peer)) or results[(mode, "peftc eager")]
        compiled_peer = results.get((mode, "peft compiled"))
        rows.append(
            [
                label,
                mode,
                path,
                f"{seconds * 1e3:.1f}",
                f"{seconds / base[0]:.3f}",
                f"{seconds / compiled_peer[0]:.3f}" if compiled_peer else "-",
                f"{compile_s:.1f}" if "compiled" in path else "-",
                f"{peak / 2**20:.1f}" if peak is not None else "-",
            ]
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", choices=list(TECHNIQUES))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args, command, start = begin(parser, argv, "benchmarks/bench_compile.py")
    small = size(256, 688, layers=2, heads=8, vocab=8000, tokens=(4, 64))
    shape = small if args.quick else LLAMA_20M
    repeat, warmup = (3, 1) if args.quick else (7, 2)
    chosen = args.only or list(TECHNIQUES)
    table, data = [], {}
    for name in chosen:
        if name == "minilm":
            model = minilm_classifier().to(args.device)
            ids, mask = batch(model.encoder.config.vocab_size, 8, 128, args.device)
            results = measure(model, ids, mask, name, repeat, warmup)
            label = "MiniLM classifier LoRA (8 x 128)"
        else:
            model = llama(**shape["model"], device=args.device)
            ids, mask = batch(shape["model"]["vocab"], *shape["batch"], device=args.device)
            results = measure(model, ids, mask, name, repeat, warmup)
            label = f"Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M {name}"
        rows = rows_for(label, results)
        table += rows
        data[name] = {f"{m}/{p}": list(v) for (m, p), v in results.items()}
        print_table(HEADER, rows)
        sys.stdout.flush()
    print(f"\n## all ({time.perf_counter() - start:.0f} s)")
    print_table(HEADER, table)
    if args.json:
        write_json(args.json, {"command": command, "results": data})


HEADER = [
    "model",
    "step",
    "path",
    "ms",
    "vs peft eager",
    "vs peft compiled",
    "compile s",
    "peak MiB (train)",
]

if __name__ == "__main__":
    main()
