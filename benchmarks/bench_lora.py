"""Benchmark peftc against HF peft, measured in the same run on the same model and config.

What it measures (each row: peftc time, peer time, ratio = peftc / peer; < 1.0 means peftc is
faster):

1. LoRA training step (forward + cross-entropy + backward + AdamW step), unmerged, on a
   ~20M-parameter Llama, r=8 on q_proj,v_proj: peftc vs peft.
2. Inference (eval, torch.no_grad) on the same Llama: peftc merged vs the base model eager
   (no adapters), and peftc merged vs peft merged (`merge_and_unload`). The captured base
   graph without adapters is reported too, to separate graph overhead from merging.
3. Rewrite time on a Llama-7B-shaped model on the `meta` device (no weights allocated):
   peftc `capture(dynamic=False)` + `apply("freeze, lora(r=8, targets='all-linear')")` vs
   `peft.get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))`; capture and
   apply are also reported separately against the same peft time.
4. LoHa and LoKr training steps on layers of width >= 1024, where peft builds the full
   (out x in) update dW every step and peftc does not.

Both sides use the same weights (peft's adapter initialisation is copied into peftc, and the
first loss is checked to agree), the same trainable parameters, targets, batch, train/eval
mode, AdamW settings and `torch.set_num_threads`. Each timing is the median of several
repeats (time.perf_counter) after warm-up; peftc and peft repeats are interleaved so slow
drift of the machine affects both sides alike.

Run:

    python benchmarks/bench_lora.py                 # full run, a few minutes on 2 CPU cores
    python benchmarks/bench_lora.py --quick         # ~30 s smoke run, smaller models
    python benchmarks/bench_lora.py --json out.json # also write the results as JSON

This is a benchmark, not part of the test suite; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from common import begin, write_json

SEED = 0


# --- timing -----------------------------------------------------------------------------------


def timeit(fn: Callable[[], Any], repeat: int, warmup: int) -> list[float]:
    """Run `fn` `warmup` times untimed, then `repeat` times timed; return the timings in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compare(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int) -> dict[str, list[float]]:
    """`timeit` for several functions, warmed up first, then timed in interleaved rounds."""
    for fn in fns.values():
        timeit(fn, 0, warmup)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name] += timeit(fn, 1, 0)
    return samples


@dataclass
class Row:
    measurement: str
    peftc_s: float
    peer_s: float
    peer: str
    peftc_samples: list[float] = field(default_factory=list)
    peer_samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.peftc_s / self.peer_s

    @property
    def round_ratios(self) -> list[float]:
        """peftc / peer within each interleaved round: robust to drift between rounds."""
        return [a / b for a, b in zip(self.peftc_samples, self.peer_samples, strict=True)]

    def spread(self) -> str:
        rr = self.round_ratios
        return (
            f"per-round ratio median {statistics.median(rr):.3f} (min {min(rr):.3f}, max "
            f"{max(rr):.3f}, n={len(rr)})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "round_ratios": self.round_ratios}


def row(
    measurement: str,
    peer: str,
    peftc_samples: list[float],
    peer_samples: list[float],
    note: str = "",
) -> Row:
    return Row(
        measurement,
        statistics.median(peftc_samples),
        statistics.median(peer_samples),
        peer,
        peftc_samples,
        peer_samples,
        note,
    )


# --- models -----------------------------------------------------------------------------------


def llama(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab: int,
    *,
    device: str | None = None,
):
    """A random-init LlamaForCausalLM (sdpa attention, untied head), built on `device` if given."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(SEED)
    with torch.device(device) if device else contextlib.nullcontext():
        return transformers.LlamaForCausalLM(config)


def batch(
    vocab: int, b: int, s: int, device: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, vocab, (b, s), generator=generator)
    if device:
        ids = ids.to(device)
    return ids, torch.ones_like(ids)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: torch.nn.Module, ids: torch.Tensor) -> str:
    c = model.config
    return (
        f"llama {n_params(model) / 1e6:.1f}M: {c.num_hidden_layers}L h{c.hidden_size} "
        f"i{c.intermediate_size} {c.num_attention_heads}H v{c.vocab_size}, batch "
        f"{ids.shape[0]}x{ids.shape[1]}"
    )


def peft_name(name: str) -> str:
    """peft's parameter name -> peftc's (`base_model.model.` prefix gone)."""
    return name.removeprefix("base_model.model.")


def trainable(
    module: torch.nn.Module, strip: Callable[[str], str] = lambda n: n
) -> dict[str, torch.nn.Parameter]:
    return {strip(n): p for n, p in module.named_parameters() if p.requires_grad}


def pair(model, ids, mask, pipeline: str, peft_config, *, fill: bool = False):
    """(peftc module, peft model) over identical weights: peftc captures `model`, peft wraps a copy.

    peft's adapter initialisation is copied into peftc's parameters (`fill=True` first gives
    every adapter parameter random non-zero values, so merging is not a no-op)."""
    import peft

    import peftc

    peer_base = copy.deepcopy(model)
    gm = peftc.apply(peftc.capture(model, args=(ids,), kwargs={"attention_mask": mask}), pipeline)
    pm = peft.get_peft_model(peer_base, peft_config)
    ours, theirs = trainable(gm), trainable(pm, peft_name)
    if set(ours) != set(theirs):
        raise RuntimeError(
            f"trainable parameters differ: peftc-only {sorted(set(ours) - set(theirs))[:4]}, "
            f"peft-only {sorted(set(theirs) - set(ours))[:4]}"
        )
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in theirs.items():
            if fill:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            ours[name].copy_(p)
    gm.train(model.training)
    pm.train(model.training)
    return gm, pm


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_step(module, ids, mask, eager: bool) -> Callable[[], float]:
    """A closure doing one step: forward, cross entropy on shifted ids, backward, AdamW."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    extra = {"use_cache": False} if eager else {}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(module(ids, attention_mask=mask, **extra).logits, ids)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def check_same_loss(gm, pm, ids, mask) -> float:
    with torch.no_grad():
        a = lm_loss(gm(ids, attention_mask=mask).logits, ids).item()
        b = lm_loss(pm(ids, attention_mask=mask, use_cache=False).logits, ids).item()
    if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4):
        raise RuntimeError(f"peftc and peft disagree before timing: loss {a} vs {b}")
    return a


def training_rows(
    label: str, model, ids, mask, pipeline: str, peft_config, repeat: int, warmup: int
) -> Row:
    model.train()
    gm, pm = pair(model, ids, mask, pipeline, peft_config, fill=True)
    check_same_loss(gm, pm, ids, mask)
    count = sum(p.numel() for p in trainable(gm).values())
    samples = compare(
        {
            "peftc": train_step(gm, ids, mask, eager=False),
            "peft": train_step(pm, ids, mask, eager=True),
        },
        repeat,
        warmup,
    )
    return row(
        label,
        "peft",
        samples["peftc"],
        samples["peft"],
        note=f"{describe(model, ids)}; {count / 1e3:.0f}K trainable",
    )


# --- measurements -----------------------------------------------------------------------------


def bench_lora_train(sizes: dict, repeat: int, warmup: int) -> list[Row]:
    import peft

    model = llama(**sizes["model"])
    ids, mask = batch(sizes["model"]["vocab"], *sizes["batch"])
    return [
        training_rows(
            "1. LoRA train step r=8 q,v",
            model,
            ids,
            mask,
            'freeze, lora(r=8, alpha=16, targets="*.q_proj|*.v_proj")',
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            repeat,
            warmup,
        )
    ]


def bench_inference(sizes: dict, repeat: int, warmup: int) -> list[Row]:
    import peft

    import peftc

    model = llama(**sizes["model"]).eval()
    ids, mask = batch(sizes["model"]["vocab"], *sizes["batch"])
    base = copy.deepcopy(model)  # the same weights, no adapters, eager
    base_gm = peftc.apply(
        peftc.capture(base, args=(ids,), kwargs={"attention_mask": mask}), "freeze"
    )
    gm, pm = pair(
        model,
        ids,
        mask,
        'freeze, lora(r=8, alpha=16, targets="*.q_proj|*.v_proj")',
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        fill=True,
    )
    merged = peftc.apply(gm, "merge").eval()
    peer_merged = pm.merge_and_unload().eval()
    for m in (base, base_gm, gm, pm):
        m.eval()
    with torch.no_grad():
        ours, theirs = (
            merged(ids, attention_mask=mask).logits,
            peer_merged(ids, attention_mask=mask, use_cache=False).logits,
        )
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        if torch.equal(ours, base(ids, attention_mask=mask, use_cache=False).logits):
            raise RuntimeError("merged model computes the base model: the adapter was a no-op")

    def run(module, eager: bool) -> Callable[[], Any]:
        extra = {"use_cache": False} if eager else {}

        def forward():
            with torch.no_grad():
                return module(ids, attention_mask=mask, **extra).logits

        return forward

    samples = compare(
        {
            "peftc merged": run(merged, False),
            "base eager": run(base, True),
            "peft merged": run(peer_merged, True),
            "peftc base": run(base_gm, False),
        },
        repeat,
        warmup,
    )
    note = describe(model, ids)
    return [
        row(
            "2. inference merged vs base eager",
            "base eager",
            samples["peftc merged"],
            samples["base eager"],
            note,
        ),
        row(
            "2. inference merged vs peft merged",
            "peft merged",
            samples["peftc merged"],
            samples["peft merged"],
            note,
        ),
        row(
            "2. inference captured base vs base eager",
            "base eager",
            samples["peftc base"],
            samples["base eager"],
            "peftc graph without adapters: graph overhead alone",
        ),
    ]


def bench_rewrite(sizes: dict, repeat: int, warmup: int) -> list[Row]:
    """peftc capture+apply vs peft get_peft_model on a meta-device Llama-7B shape."""
    import peft

    import peftc

    model = llama(**sizes["model"], device="meta")
    ids, _ = batch(sizes["model"]["vocab"], *sizes["batch"], device="meta")
    pipeline = "freeze, lora(r=8, targets='all-linear')"
    captured: list[Any] = []

    def capture():
        captured[:] = [peftc.capture(model, (ids,), dynamic=False)]

    def apply():
        return peftc.apply(captured[0], pipeline)

    fresh: list[Any] = []

    # get_peft_model mutates its model: give each run a fresh meta model (untimed)
    def get_peft_model():
        return peft.get_peft_model(fresh.pop(), peft.LoraConfig(r=8, target_modules="all-linear"))

    capture_s, apply_s, peer_s = [], [], []
    for i in range(warmup + repeat):
        fresh.append(llama(**sizes["model"], device="meta"))
        c, a, p = timeit(capture, 1, 0)[0], timeit(apply, 1, 0)[0], timeit(get_peft_model, 1, 0)[0]
        if i >= warmup:
            capture_s.append(c)
            apply_s.append(a)
            peer_s.append(p)
    gm = apply()
    pm = peft.get_peft_model(
        llama(**sizes["model"], device="meta"), peft.LoraConfig(r=8, target_modules="all-linear")
    )
    ours, theirs = trainable(gm), trainable(pm, peft_name)
    if set(ours) != set(theirs):
        raise RuntimeError("peftc and peft adapt different sites on the meta model")
    total = [c + a for c, a in zip(capture_s, apply_s, strict=True)]
    note = f"{describe(model, ids)} on meta; {len(ours) // 2} LoRA sites"
    return [
        row("3. rewrite meta: capture+apply", "peft get_peft_model", total, peer_s, note),
        row("3. rewrite meta: capture (torch.export)", "peft get_peft_model", capture_s, peer_s),
        row("3. rewrite meta: apply freeze,lora", "peft get_peft_model", apply_s, peer_s),
    ]


def bench_loha_lokr(sizes: dict, repeat: int, warmup: int) -> list[Row]:
    import peft

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    pattern = "|".join(f"*.{t}" for t in targets)
    ids, mask = batch(sizes["model"]["vocab"], *sizes["batch"])
    cases = [
        (
            "4. LoHa train step r=8 q,v,up,down",
            f'freeze, loha(r=8, alpha=8, targets="{pattern}")',
            peft.LoHaConfig(r=8, alpha=8, target_modules=targets),
        ),
        (
            "4. LoKr train step r=8 q,v,up,down",
            f'freeze, lokr(r=8, alpha=8, targets="{pattern}")',
            peft.LoKrConfig(r=8, alpha=8, target_modules=targets),
        ),
    ]
    return [
        training_rows(label, llama(**sizes["model"]), ids, mask, pipeline, config, repeat, warmup)
        for label, pipeline, config in cases
    ]


def size(
    hidden: int, intermediate: int, layers: int, heads: int, vocab: int, tokens: tuple[int, int]
) -> dict:
    """A Llama shape (`model`: keyword arguments of `llama`) and an input shape (`batch`: batch,
    sequence)."""
    model = {
        "hidden": hidden,
        "intermediate": intermediate,
        "layers": layers,
        "heads": heads,
        "vocab": vocab,
    }
    return {"model": model, "batch": tokens}


LLAMA_20M = size(512, 1376, layers=4, heads=8, vocab=8000, tokens=(8, 128))  # 20.8M parameters
FULL = {
    "lora_train": LLAMA_20M,
    "inference": LLAMA_20M,
    # Llama-7B shape, on meta
    "rewrite": size(4096, 11008, layers=32, heads=32, vocab=32000, tokens=(2, 16)),
    "loha_lokr": size(1024, 2816, layers=2, heads=8, vocab=2000, tokens=(4, 64)),
}
QUICK = {
    "lora_train": size(256, 688, layers=2, heads=8, vocab=8000, tokens=(4, 64)),
    "inference": size(256, 688, layers=2, heads=8, vocab=8000, tokens=(4, 64)),
    "rewrite": size(4096, 11008, layers=4, heads=32, vocab=32000, tokens=(2, 16)),
    "loha_lokr": size(1024, 2816, layers=1, heads=8, vocab=2000, tokens=(2, 64)),
}
BENCHES = {
    "lora_train": bench_lora_train,
    "inference": bench_inference,
    "rewrite": bench_rewrite,
    "loha_lokr": bench_loha_lokr,
}
# (repeat, warmup) per measurement
FULL_REPEATS = {"lora_train": (7, 2), "inference": (7, 2), "rewrite": (3, 0), "loha_lokr": (7, 2)}
QUICK_REPEATS = {"lora_train": (3, 1), "inference": (3, 1), "rewrite": (1, 0), "loha_lokr": (3, 1)}


# --- output -----------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(rows: list[Row]) -> str:
    head = ("measurement", "peftc", "peer", "ratio (peftc/peer)")
    body = [
        (r.measurement, fmt_time(r.peftc_s), f"{fmt_time(r.peer_s)} ({r.peer})", f"{r.ratio:.3f}")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(4)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller models, fewer repeats (~30 s smoke run)"
    )
    parser.add_argument(
        "--only", choices=list(BENCHES), action="append", help="run only these measurements"
    )
    args, command, started = begin(parser, argv, __file__)
    import peft
    import transformers

    import peftc

    sizes, repeats = (QUICK, QUICK_REPEATS) if args.quick else (FULL, FULL_REPEATS)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
        f"{peft.__version__}, peftc {peftc.__version__}; {torch.get_num_threads()} threads; "
        f"{'quick' if args.quick else 'full'} run",
        flush=True,
    )
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for name in args.only or BENCHES:
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        rows += BENCHES[name](sizes[name], *repeats[name])
        seconds[name] = time.perf_counter() - t0
        print(f"  {name}: done in {seconds[name]:.1f} s", flush=True)
    wall = time.perf_counter() - started

    print()
    print(table(rows))
    print()
    for r in rows:
        print(f"{r.measurement}: {r.spread()}" + (f"; {r.note}" if r.note else ""))
    print(
        "times are medians of interleaved repeats; (repeat, warmup): "
        + ", ".join(f"{k} {repeats[k]}" for k in seconds)
        + f"; wall time {wall:.1f} s"
    )
    if args.json:
        write_json(
            args.json,
            {
                "command": command,
                "quick": args.quick,
                "threads": torch.get_num_threads(),
                "seed": SEED,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                    "peftc": peftc.__version__,
                    "python": platform.python_version(),
                },
                "sizes": {k: sizes[k] for k in seconds},
                "repeats": {k: repeats[k] for k in seconds},
                "rows": [r.as_dict() for r in rows],
                "bench_seconds": seconds,
                "wall_seconds": wall,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
