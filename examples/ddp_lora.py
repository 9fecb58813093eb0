"""Train a LoRA-rewritten model with torch.distributed: DDP or FSDP2 (`fully_shard`), gloo, CPU.

peftc's result is an ordinary nn.Module, so multi-process training is torch.distributed itself.
Every rank captures the same tiny Llama, runs `freeze, lora(...)`, and trains on its shard of each
global batch; the trainable weights are written per rank to compare with one process training on
the combined batches.

    torchrun --standalone --nproc_per_node=2 examples/ddp_lora.py --mode ddp --out runs
    torchrun --standalone --nproc_per_node=2 examples/ddp_lora.py --mode fsdp --out runs
    python examples/ddp_lora.py --mode single --out runs   # one process, the combined batches
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

import peftc
from peftc._io import atomic_write
from peftc.tools.models import example_ids, tiny_model

PIPELINE = "freeze, lora(r=4, alpha=8, targets='*.q_proj|*.v_proj')"
GLOBAL_BATCH, SEQ = 4, 16


def build() -> tuple[torch.nn.Module, int]:
    """The rewritten module (identical on every rank) and its vocabulary size."""
    model = tiny_model("llama", seed=0)
    ids = example_ids(model.config.vocab_size, batch=2, seq=SEQ)
    torch.manual_seed(0)  # LoRA's A: the same on every rank
    return peftc.apply(peftc.capture(model, (ids,)), PIPELINE), model.config.vocab_size


def global_batch(step: int, vocab: int) -> torch.Tensor:
    return example_ids(vocab, batch=GLOBAL_BATCH, seq=SEQ, seed=100 + step)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the trainable weights, names without wrapper prefixes."""
    state = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
            state[name.removeprefix("module.")] = full.detach().clone().contiguous()
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp", "single"], required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for <mode>.rank<r>.safetensors"
    )
    args = parser.parse_args(argv)
    from safetensors.torch import save

    torch.set_num_threads(1)
    gm, vocab = build()
    rank, world = 0, 1
    model: torch.nn.Module = gm
    if args.mode != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(gm)
        else:
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(gm)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    shard = GLOBAL_BATCH // world
    for step in range(args.steps):
        ids = global_batch(step, vocab)[rank * shard : (rank + 1) * shard]
        # mean over equal shards: the gradient average is the global one
        loss = lm_loss(model(ids).logits, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(
            f"[{args.mode} rank {rank}/{world}] step {step + 1} loss {loss.item():.5f}", flush=True
        )
    state = trainable_state(model)
    atomic_write(args.out / f"{args.mode}.rank{rank}.safetensors", save(state))
    if args.mode != "single":
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
