"""`peftc serve`'s HTTP server driven by a real HTTP client (http.client): completions per adapter
equal `peftc.generate`'s, concurrent requests over different adapters batch together, bad requests
get 4xx in OpenAI's error shape and the server keeps answering."""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlparse

import pytest
import torch

import peftc
from peftc.tools.serve import CompletionServer

from conftest import captured


@pytest.fixture(scope="module")
def server():
    gm = captured("tiny-llama")
    for name, seed in (("alpha", 1), ("beta", 2)):
        gm = peftc.apply(gm, f"lora(adapter='{name}', r=4, targets='all-linear')")
        with torch.no_grad():
            for key, p in gm.named_parameters():
                if "lora_B" in key and name in key:
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    served = peftc.apply(gm, "multi_lora")
    running = CompletionServer(served, base_name="tiny-llama", port=0, max_wait=0.2).start()
    yield running, served
    running.stop()


def call(url: str, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    where = urlparse(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


def test_completions_per_adapter_batched_together(server):
    running, served = server
    requests = [("alpha", [5, 9, 13, 2]), ("tiny-llama", [3, 4, 5, 6]), ("beta", [5, 9, 13, 2])]
    answers = [None] * len(requests)

    def ask(i, model, prompt):
        answers[i] = call(
            running.url,
            "POST",
            "/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": 5},
        )

    batches = []
    run = running._run
    running._run = lambda batch: (batches.append(len(batch)), run(batch))
    threads = [threading.Thread(target=ask, args=(i, *r)) for i, r in enumerate(requests)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del running._run
    assert batches == [3]  # three adapters, one batch
    names = [None if m == "tiny-llama" else m for m, _ in requests]
    expected = peftc.generate(served, [p for _, p in requests], adapter_ids=names, max_new_tokens=5)
    for (status, body), tokens, (model, _prompt) in zip(answers, expected, requests, strict=True):
        assert status == 200 and body["object"] == "text_completion" and body["model"] == model
        assert (
            body["choices"][0]["token_ids"] == tokens
            and body["choices"][0]["finish_reason"] == "length"
        )
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert answers[0][1]["choices"][0]["token_ids"] != answers[2][1]["choices"][0]["token_ids"]
    status, listing = call(running.url, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in listing["data"]] == ["tiny-llama", "alpha", "beta"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "gamma", "prompt": [1, 2]}, 404, "model_not_found"),
        (
            {"model": "alpha", "prompt": list(range(3, 250)), "max_tokens": 5000},
            400,
            "context_length_exceeded",
        ),
        ({"model": "alpha", "prompt": "text"}, 400, "invalid_prompt"),  # no tokenizer here
        ({"model": "alpha", "prompt": [1, 999999]}, 400, "invalid_prompt"),
        ({"model": "alpha", "prompt": [1], "max_tokens": 0}, 400, "invalid_max_tokens"),
        ({"model": "alpha", "prompt": [1], "logit_bias": {}}, 400, "unsupported_field"),
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_body"),
    ],
)
def test_bad_requests_get_clear_4xx_and_the_server_stays_up(server, body, status, code):
    running, _ = server
    got, payload = call(running.url, "POST", "/v1/completions", body)
    assert got == status and payload["error"]["code"] == code and payload["error"]["message"]
    ok, answer = call(
        running.url,
        "POST",
        "/v1/completions",
        {"model": "alpha", "prompt": [7, 8], "max_tokens": 2},
    )
    assert ok == 200 and len(answer["choices"][0]["token_ids"]) == 2


def test_unknown_route(server):
    running, _ = server
    assert call(running.url, "GET", "/v1/nothing")[0] == 404
