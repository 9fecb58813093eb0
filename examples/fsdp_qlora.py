"""QLoRA across processes with FSDP2: the 4-bit weights sharded, one block gathered at a time (gloo,
CPU).

Every rank captures the same Llama-shaped model, runs `nf4, freeze, lora(...), outline`, and
`peftc.distributed.shard` wraps each outlined block and the root with `fully_shard`. Each rank
trains on its shard of each global batch. The run writes per rank: the trained LoRA weights, the
bytes of NF4 storage the rank holds, and the measured and planned peak of a training step; rank 0
also saves the adapter in peft's format and checks that merging it works.

    torchrun --standalone --nproc_per_node=2 examples/fsdp_qlora.py --out runs
    torchrun --standalone --nproc_per_node=2 examples/fsdp_qlora.py --out runs --bf16
    torchrun --standalone --nproc_per_node=2 examples/fsdp_qlora.py --out runs --compile
    python examples/fsdp_qlora.py --out runs   # one process on the combined batches (the reference)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

import peftc
from peftc._io import atomic_write
from peftc.tools.models import example_ids, tiny_config

PIPELINE = "nf4, freeze, lora(r=4, alpha=8, targets='*.q_proj|*.v_proj')"
GLOBAL_BATCH, SEQ = 4, 16


def build(
    arch: str,
    layers: int,
    hidden: int = 64,
    outline: bool = True,
    dtype: torch.dtype = torch.float32,
    recompute: bool = False,
) -> torch.fx.GraphModule:
    """The rewritten module, identical on every rank (same seeds), captured in `dtype` (the compute
    dtype)."""
    import transformers

    config = tiny_config(arch)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = (
        layers,
        hidden,
        2 * hidden,
    )
    if getattr(config, "layer_types", None):  # Qwen2, Mistral: one attention type per layer
        config.layer_types = config.layer_types[:1] * layers
    torch.manual_seed(0)
    model = getattr(
        transformers,
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
            arch
        ],
    )(config).eval()
    # weights bf16 can hold: the fp32 and bf16 runs quantize the same values
    model.to(torch.bfloat16).to(dtype)
    ids = example_ids(config.vocab_size, batch=2, seq=SEQ)
    torch.manual_seed(0)  # LoRA's A: the same on every rank
    blocks = ", outline(checkpoint=true)" if recompute else ", outline"
    gm = peftc.apply(peftc.capture(model, (ids,)), PIPELINE + (blocks if outline else ""))
    # start from the fp32 run's LoRA weights (random init differs by dtype)
    if dtype != torch.float32:
        peftc.distributed.load_trainable(
            gm, {n: p for n, p in build(arch, layers, hidden).named_parameters() if p.requires_grad}
        )
    return gm


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of this rank's parameters and buffers (local shards under FSDP2)."""
    tensors = [
        t.to_local() if hasattr(t, "to_local") else t
        for t in [*module.parameters(), *module.buffers()]
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_peak(step) -> int:
    """Peak of the bytes allocated during `step()` over those alive before, from the profiler's
    allocator events on the thread that runs the step (gloo's worker threads stage copies of their
    own; NCCL does not)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.events()
    main = Counter(e.thread for e in events).most_common(1)[0][0]
    running = peak = 0
    # allocations are reported by the op that made them (self memory), frees as "[memory]" events,
    # in time order
    mine = (e for e in events if e.self_cpu_memory_usage and e.thread == main)
    for event in sorted(mine, key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--hidden",
        type=int,
        default=64,
        help="hidden size (feed-forward 2x); 4 heads, 2 key/value heads",
    )
    parser.add_argument(
        "--checkpoint", action="store_true", help="recompute each block's activations in backward"
    )
    parser.add_argument(
        "--plan", action="store_true", help="also plan the step with peftc.plan(world_size=...)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--bf16", action="store_true", help="FSDP2 mixed precision: bf16 compute, fp32 gradients"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=["inductor", "aot_eager"],
        help="train through peftc.compile: each sharded block compiled whole (default Inductor)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-rank results")
    args = parser.parse_args(argv)
    from safetensors.torch import save
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.set_num_threads(1)
    gm = build(
        args.arch,
        args.layers,
        args.hidden,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        recompute=args.checkpoint,
    )
    rank, world = 0, 1
    quantized_before = peftc.distributed.storage_bytes(gm)
    planned = None
    if args.plan:
        planned = peftc.plan(
            gm,
            batch=GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", 1)),
            seq=SEQ,
            optimizer="sgd",
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if args.bf16
            else None
        )
        peftc.distributed.shard(gm, mp_policy=policy)
    mode = (
        (f"fsdp{world}" if world > 1 else "single")
        + ("-bf16" if args.bf16 else "")
        + ("-ckpt" if args.checkpoint else "")
        + ("-compiled" if args.compile else "")
    )
    runner = peftc.compile(gm, backend=args.compile) if args.compile else gm
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    shard = GLOBAL_BATCH // world
    peak = resident = 0
    grads: dict[str, torch.Tensor] = {}
    for step in range(args.steps):
        ids = example_ids(gm_vocab(gm), batch=GLOBAL_BATCH, seq=SEQ, seed=100 + step)[
            rank * shard : (rank + 1) * shard
        ]

        def train_step(ids: torch.Tensor = ids, first: bool = step == 0) -> float:
            # mean over equal shards: the gradient average is the global one
            loss = lm_loss(runner(ids).logits, ids)
            optimizer.zero_grad()
            loss.backward()
            if first:  # the first gradients, to compare across precisions
                grads.update(peftc.distributed.gather_trainable(gm, gradients=True))
            optimizer.step()
            return loss.item()

        if step == 1:  # a step after the first, as in training (lazy initialisation done)
            resident = resident_bytes(gm)
            peak = step_peak(train_step)
        else:
            train_step()
    state = peftc.distributed.gather_trainable(gm)
    numbers = {
        "world": world,
        "quantized_bytes_one_process": quantized_before,
        "quantized_bytes_this_rank": peftc.distributed.storage_bytes(gm),
        "resident_bytes": resident,
        "measured_peak": resident + peak,
        "planned_peak": planned.peak if planned else None,
        "compiles": getattr(runner, "compiles", 0),
    }
    atomic_write(
        args.out / f"{mode}.rank{rank}.safetensors",
        save({k: v.float().contiguous() for k, v in state.items()}),
    )
    atomic_write(
        args.out / f"{mode}.rank{rank}.grads.safetensors",
        save({k: v.float().contiguous() for k, v in grads.items()}),
    )
    if rank == 0:
        # the same pipeline, unsharded
        plain = build(args.arch, args.layers, args.hidden, outline=False)
        peftc.distributed.load_trainable(plain, state)
        peftc.save_adapter(plain, args.out / f"{mode}.adapter")
        ids = example_ids(gm_vocab(plain), batch=2, seq=SEQ, seed=7)
        merged = peftc.apply(plain, 'merge(dtype="float32")')
        numbers["merged_vs_adapter_logits"] = (
            (merged(ids).logits - plain(ids).logits).abs().max().item()
        )
    atomic_write(args.out / f"{mode}.rank{rank}.json", json.dumps(numbers, indent=1))
    print(f"[{mode} rank {rank}] {json.dumps(numbers)}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def gm_vocab(gm: torch.fx.GraphModule) -> int:
    return peftc.ir.graph.peftc_meta(gm)["capture"]["config"]["vocab_size"]


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
