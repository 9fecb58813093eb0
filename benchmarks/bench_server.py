"""`peftc serve` under load: N concurrent HTTP clients, mixed adapters and lengths, against the loop
that serves one request at a time, in one run.

The server (FastAPI on uvicorn, continuous batching) serves a random-init GPT-2-shaped model with a
byte-level tokenizer, three LoRA adapters and the base. Each request streams (server-sent events):
a random adapter or the base, a prompt of 2-60 tokens, `max_tokens` 1-32, greedy or sampled with a
seed (temperature 0.8, top-k 50). Every answer is checked against the same request served alone
(`peftc.generate` of that one request: greedy, or the same seed); every connection error is counted.
Reported: requests per second and generated tokens per second, p50/p99 latency and time to the first
token, the server process's resident memory after each round, and the same requests through the
one-at-a-time loop (`peftc.generate` per request, no HTTP).

    python benchmarks/bench_server.py             # 1000 requests, 100 clients, 2 rounds
    python benchmarks/bench_server.py --requests 200 --clients 20 --rounds 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

import peftc
from peftc.tools.models import load_model, save_tiny_chat_model
from peftc.tools.server import BackgroundServer, ServerSettings, create_app

from common import begin, print_table, write_json

ADAPTERS = ("alpha", "beta", "gamma")
BASE = "tiny-chat"


def served_graph(folder: Path):
    save_tiny_chat_model(folder)
    loaded = load_model(str(folder))
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    for seed, name in enumerate(ADAPTERS, start=1):
        gm = peftc.apply(gm, f"lora(adapter='{name}', r=8, targets='all-linear')")
        with torch.no_grad():
            for key, p in gm.named_parameters():
                if "lora_B" in key and name in key:
                    p.normal_(std=0.3, generator=torch.Generator().manual_seed(seed))
    return peftc.apply(gm, "multi_lora"), loaded.tokenizer


def workload(n: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        body = {
            "model": rng.choice((BASE, *ADAPTERS)),
            "prompt": [rng.randrange(1, vocab) for _ in range(rng.randint(2, 60))],
            "max_tokens": rng.randint(1, 32),
            "temperature": 0,
            "stream": True,
        }
        if i % 2:
            body.update(temperature=0.8, top_k=50, seed=rng.randrange(2**31))
        requests.append(body)
    return requests


def alone(gm, body: dict, eos: int) -> list[int]:
    """The request served by itself: `peftc.generate` of its one prompt."""
    sampled = body["temperature"] > 0
    return peftc.generate(
        gm,
        [body["prompt"]],
        adapter_ids=[None if body["model"] == BASE else body["model"]],
        max_new_tokens=body["max_tokens"],
        do_sample=sampled,
        temperature=body["temperature"] if sampled else 1.0,
        top_k=body.get("top_k"),
        seed=body.get("seed"),
        eos_token_id=eos,
    )[0]


def ask(url: str, body: dict) -> dict:
    """One streamed request: its tokens, latency and time to the first token (or its error)."""
    where = urlparse(url)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=300)
    try:
        connection.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {response.read()[:200]!r}"}
        tokens, first = [], None
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            first = first or time.perf_counter()
            tokens += chunk["choices"][0]["token_ids"]
        done = time.perf_counter()
        return {"tokens": tokens, "latency": done - started, "ttft": (first or done) - started}
    except OSError as e:  # a reset, a refused connection
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        connection.close()


def load(url: str, requests: list[dict], clients: int) -> tuple[list[dict], float]:
    """`requests` sent by `clients` threads, each sending its next request when the last is
    answered: the answers in request order, and the seconds it all took."""
    answers: list[dict] = [{} for _ in requests]
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            answers[i] = ask(url, requests[i])

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - started


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summary(label: str, answers: list[dict], seconds: float, expected: list[list[int]]) -> list:
    good = [a for a in answers if "tokens" in a]
    wrong = sum(a["tokens"] != e for a, e in zip(answers, expected, strict=True) if "tokens" in a)
    latency = sorted(a["latency"] for a in good) or [float("nan")]
    ttft = sorted(a["ttft"] for a in good) or [float("nan")]
    tokens = sum(len(a["tokens"]) for a in good)

    def pct(values: list[float], q: float) -> str:
        return f"{values[min(len(values) - 1, int(q * len(values)))] * 1e3:.0f}"

    return [
        label,
        len(answers),
        len(answers) - len(good),
        wrong,
        f"{len(good) / seconds:.1f}",
        f"{tokens / seconds:.0f}",
        pct(latency, 0.5),
        pct(latency, 0.99),
        pct(ttft, 0.5),
        pct(ttft, 0.99),
        f"{resident_mib():.0f}",
    ]


def one_at_a_time(gm, requests: list[dict], eos: int) -> tuple[list, float, list[float]]:
    started, latencies, out = time.perf_counter(), [], []
    for body in requests:
        out.append(alone(gm, body, eos))
        latencies.append(time.perf_counter() - started)  # a queue: each waits for all before
    return out, time.perf_counter() - started, latencies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="load rounds (memory after each)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args, command, start = begin(parser, argv, "benchmarks/bench_server.py")
    with tempfile.TemporaryDirectory() as tmp:
        gm, tokenizer = served_graph(Path(tmp) / BASE)
    requests = workload(args.requests, len(tokenizer), args.seed)
    expected, loop_seconds, loop_latency = one_at_a_time(gm, requests, tokenizer.eos_token_id)
    rows = []
    app = create_app(
        gm, tokenizer=tokenizer, settings=ServerSettings(base_name=BASE), max_batch=args.max_batch
    )
    with BackgroundServer(app) as url:
        for round_ in range(args.rounds):
            answers, seconds = load(url, requests, args.clients)
            rows.append(summary(f"server, round {round_ + 1}", answers, seconds, expected))
            print_table(HEADER, rows[-1:])
            errors = [a["error"] for a in answers if "error" in a]
            if errors:
                print("errors:", errors[:5])
        health = json.loads(ask_health(url))
    loop = [
        {"tokens": e, "latency": t, "ttft": t} for e, t in zip(expected, loop_latency, strict=True)
    ]
    rows.append(summary("one request at a time (peftc.generate)", loop, loop_seconds, expected))
    print(f"\n## all ({time.perf_counter() - start:.0f} s); server health after: {health}")
    print_table(HEADER, rows)
    if args.json:
        write_json(args.json, {"command": command, "header": HEADER, "rows": rows})


def ask_health(url: str) -> bytes:
    where = urlparse(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    connection.request("GET", "/health")
    return connection.getresponse().read()


HEADER = [
    "path",
    "requests",
    "failed",
    "differ from alone",
    "requests/s",
    "tokens/s",
    "p50 ms",
    "p99 ms",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "RSS MiB",
]

if __name__ == "__main__":
    main()
