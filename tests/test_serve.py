"""`peftc serve`'s server (FastAPI on uvicorn, continuously batched) driven over real sockets: the
official `openai` client for completions, chat and streaming; every answer equal to
`peftc.generate` of the same request alone (itself checked against transformers' and peft's
`generate` in test_generation.py); requests with different limits in one batch; hostile HTTP
answered 4xx; adapters loaded and unloaded while serving."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import torch

import peftc
from peftc.tools.models import load_model, save_tiny_chat_model
from peftc.tools.server import BackgroundServer, ServerSettings, create_app

openai = pytest.importorskip("openai")
KEY = "test-key"
ADAPTERS = ("alpha", "beta", "gamma")


def adapted(gm, name: str, seed: int):
    gm = peftc.apply(gm, f"lora(adapter='{name}', r=4, targets='all-linear')")
    with torch.no_grad():
        for key, p in gm.named_parameters():
            if "lora_B" in key and name in key:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return gm


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A GPT-2 with 128 positions, a byte-level tokenizer and a chat template, three adapters."""
    torch.manual_seed(0)  # the adapters' A matrices
    folder = save_tiny_chat_model(tmp_path_factory.mktemp("model") / "tiny-chat")
    loaded = load_model(str(folder))
    gm = peftc.capture(loaded.model, loaded.args, loaded.kwargs)
    for seed, name in enumerate(ADAPTERS, start=1):
        gm = adapted(gm, name, seed)
    return peftc.apply(gm, "multi_lora"), loaded.tokenizer, gm


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    gm, tokenizer, _ = served
    settings = ServerSettings(
        base_name="tiny-chat", api_key=KEY, header_timeout=1.0, allow_adapter_loading=True
    )
    app = create_app(gm, tokenizer=tokenizer, settings=settings)
    with BackgroundServer(app) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def alone(gm, prompt: list[int], model: str, n: int) -> list[int]:
    adapter = None if model == "tiny-chat" else model
    return peftc.generate(gm, [prompt], adapter_ids=[adapter], max_new_tokens=n)[0]


def test_openai_client_completions_chat_and_streaming(served, server):
    gm, tokenizer, _ = served
    url, client = server
    assert [m.id for m in client.models.list()] == ["tiny-chat", *ADAPTERS]
    prompt = tokenizer("To be, or not", add_special_tokens=False)["input_ids"]
    for model in ("tiny-chat", *ADAPTERS):
        answer = client.completions.create(
            model=model, prompt="To be, or not", max_tokens=6, temperature=0
        )
        expected = alone(gm, prompt, model, 6)
        assert answer.choices[0].token_ids == expected and answer.choices[0].finish_reason in (
            "length",
            "stop",
        )
        assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.usage.prompt_tokens == len(prompt)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_prompt = tokenizer(chat_ids, add_special_tokens=False)["input_ids"]
    chat = client.chat.completions.create(
        model="beta", messages=messages, max_tokens=8, temperature=0
    )
    expected = tokenizer.decode(alone(gm, chat_prompt, "beta", 8), skip_special_tokens=True)
    assert (
        chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"
    )
    stream = client.chat.completions.create(
        model="beta",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason
    streamed = client.completions.create(
        model="alpha", prompt=prompt, max_tokens=6, temperature=0, stream=True
    )
    assert sum((c.choices[0].token_ids for c in streamed), []) == alone(gm, prompt, "alpha", 6)


def test_the_api_key_is_checked_as_openai_clients_send_it(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    status, body = call(url, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(url, "GET", "/health", headers={"Authorization": ""})[0] == 200


def test_requests_with_different_limits_share_a_batch(served, server):
    """The issue's case (both used to fail with 500): a 2-token prompt asking 100 tokens and a
    100-token prompt asking 2, sent together; and seeded sampling in a crowd draws what it draws
    alone. The short request finishes while the long one still runs."""
    gm, _, _ = served
    _, client = server
    short_prompt, long_prompt = [5, 6], list(range(10, 110))
    finished = {}

    def ask(name, prompt, n):
        answer = client.completions.create(
            model="alpha", prompt=prompt, max_tokens=n, temperature=0
        )
        finished[name] = (time.monotonic(), answer.choices[0].token_ids)

    threads = [
        threading.Thread(target=ask, args=a)
        for a in (("long", short_prompt, 100), ("short", long_prompt, 2))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert finished["long"][1] == alone(gm, short_prompt, "alpha", 100)
    assert finished["short"][1] == alone(gm, long_prompt, "alpha", 2)
    assert finished["short"][0] < finished["long"][0]

    def sampled(seed, model="gamma"):
        return (
            client.completions.create(
                model=model, prompt=[7, 8, 9], max_tokens=12, temperature=0.9, top_p=0.95, seed=seed
            )
            .choices[0]
            .text
        )

    by_itself = sampled(42)
    crowd = {}
    threads = [
        threading.Thread(
            target=lambda i=i: crowd.__setitem__(i, sampled(40 + i % 4, ADAPTERS[i % 3]))
        )
        for i in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert crowd[2] == by_itself and sampled(42) == by_itself


def test_a_crowd_of_mixed_requests_gets_what_each_gets_alone(served, server):
    """60 requests from 20 clients over three adapters and the base, prompts of 2-40 tokens,
    greedy and seeded: every answer equals its request served alone; nothing fails."""
    import random

    gm, tokenizer, _ = served
    url, _ = server
    rng = random.Random(0)
    bodies = []
    for i in range(60):
        body = {
            "model": rng.choice(("tiny-chat", *ADAPTERS)),
            "prompt": [rng.randrange(1, 300) for _ in range(rng.randint(2, 40))],
            "max_tokens": rng.randint(1, 16),
            "temperature": 0,
        }
        if i % 2:
            body.update(temperature=0.8, top_k=50, seed=i)
        bodies.append(body)
    answers = [None] * len(bodies)
    pending = iter(range(len(bodies)))
    lock = threading.Lock()

    def client():
        while (i := next_of(pending, lock)) is not None:
            answers[i] = call(url, "POST", "/v1/completions", bodies[i])

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        adapter = None if body["model"] == "tiny-chat" else body["model"]
        sampled = body["temperature"] > 0
        expected = peftc.generate(
            gm,
            [body["prompt"]],
            adapter_ids=[adapter],
            max_new_tokens=body["max_tokens"],
            do_sample=sampled,
            temperature=body["temperature"] or 1.0,
            top_k=body.get("top_k"),
            seed=body.get("seed"),
            eos_token_id=tokenizer.eos_token_id,
        )[0]
        assert answer["choices"][0]["token_ids"] == expected, body


def next_of(pending, lock):
    with lock:
        return next(pending, None)


def call(url, method, path, body=None, headers=None, raw_headers=None):
    where = urlparse(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    sent = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    sent.setdefault("Host", where.netloc)
    for name, value in {**sent, **(raw_headers or {})}.items():
        if value:
            connection.putheader(name, value)
    if data is not None and "Content-Length" not in (raw_headers or {}):
        connection.putheader("Content-Length", str(len(data)))
    connection.endheaders(data)
    response = connection.getresponse()
    payload = json.loads(response.read() or b"null")
    connection.close()
    return response.status, payload


GOOD = {"model": "alpha", "prompt": [7, 8], "max_tokens": 2}


@pytest.mark.parametrize(
    "body, headers, status, code",
    [
        (GOOD, {"Host": "evil.example.com"}, 400, "invalid_host"),
        (GOOD, {"Origin": "http://evil.example.com"}, 403, "cors"),
        (GOOD, {"Content-Type": "text/plain"}, 415, "invalid_content_type"),
        (b"x" * 10, {"Content-Length": str(10**12)}, 413, "body_too_large"),
        ({"model": "delta", "prompt": [1, 2]}, {}, 404, "model_not_found"),
        ({**GOOD, "max_tokens": 5000}, {}, 400, "context_length_exceeded"),
        ({**GOOD, "prompt": [1, 999999]}, {}, 400, "invalid_prompt"),
        ({**GOOD, "max_tokens": 0}, {}, 400, "greater_than_equal"),
        ({**GOOD, "seed": "42"}, {}, 400, "int_type"),
        ({**GOOD, "logit_bias": {"5": 1.0}}, {}, 400, "too_long"),
        ({**GOOD, "best": 2}, {}, 400, "extra_forbidden"),
        ({**GOOD, "n": 2}, {}, 400, "literal_error"),
        ({**GOOD, "prompt": []}, {}, 400, "invalid_prompt"),
        (b"{not json", {}, 400, "json_invalid"),
        (b"[" * 100_000 + b"]" * 100_000, {}, 400, "json_invalid"),
        (b"[1, 2]", {}, 400, "model_type"),
    ],
)
def test_bad_requests_get_clear_4xx_and_the_server_stays_up(server, body, headers, status, code):
    url, _ = server
    sizes = {"Content-Length": headers.pop("Content-Length")} if "Content-Length" in headers else {}
    got, payload = call(url, "POST", "/v1/completions", body, headers, raw_headers=sizes)
    assert (got, payload["error"]["code"]) == (status, code) and payload["error"]["message"]
    ok, answer = call(url, "POST", "/v1/completions", GOOD)
    assert ok == 200 and 1 <= len(answer["choices"][0]["token_ids"]) <= 2  # eos may stop it


@pytest.mark.parametrize("length", [b"abc", b"-1"])
def test_malformed_content_length_is_refused_by_the_http_layer(server, length):
    url, _ = server
    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: "
            + length
            + b"\r\nContent-Type: application/json\r\n\r\n{}"
        )
        assert s.recv(200).startswith(b"HTTP/1.1 400")


def test_a_slow_client_is_cut_off_and_unknown_routes_are_404(server):
    url, _ = server
    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localho")  # and nothing more
        started = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 5
    assert call(url, "GET", "/v1/nothing")[0] == 404
    assert call(url, "GET", "/v1/completions")[0] == 405


def test_adapters_load_and_unload_while_serving(served, server, tmp_path):
    gm, _, unserved = served
    url, client = server
    folder, with_delta = tmp_path / "delta", adapted(unserved, "delta", 9)
    peftc.save_adapter(with_delta, folder, adapter="delta")
    status, body = call(
        url, "POST", "/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": str(folder)}
    )
    assert status == 200, body
    assert [m.id for m in client.models.list()][-1] == "delta"
    answer = client.completions.create(model="delta", prompt=[7, 8, 9], max_tokens=5, temperature=0)
    reference = peftc.apply(with_delta, "multi_lora")
    assert answer.choices[0].token_ids == alone(reference, [7, 8, 9], "delta", 5)
    assert (
        call(
            url, "POST", "/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": str(folder)}
        )[0]
        == 400
    )
    assert call(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "delta"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="delta", prompt=[7, 8, 9], max_tokens=2)
    status, body = call(
        url,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "x", "lora_path": str(tmp_path / "none")},
    )
    assert status == 400 and body["error"]["param"] == "lora_path"


def test_adapter_loading_is_off_unless_asked(served):
    gm, tokenizer, _ = served
    app = create_app(gm, tokenizer=tokenizer, settings=ServerSettings(base_name="tiny-chat"))
    with BackgroundServer(app) as url:
        status, body = call(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"})
        assert status == 403 and "--allow-adapter-loading" in body["error"]["message"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="alpha", prompt=[1, 2], max_tokens=1).choices


def test_a_model_that_cannot_generate_is_refused_by_name(tmp_path, capsys):
    """A BERT classifier folder: `peftc serve` stops before serving, naming the model."""
    from transformers import BertConfig, BertForSequenceClassification

    from peftc.tools.cli import main

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "bert"), "--adapters", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "BertForSequenceClassification is no causal language model" in error
    assert len(error) < 400
