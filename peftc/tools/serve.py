"""A small HTTP server for many adapters over one base: OpenAI-style `/v1/completions`, batched
across adapters.

    POST /v1/completions  {"model": "<adapter>", "prompt": "text" or [token ids], "max_tokens": 16,
                           "temperature": 0.0, "top_k": null, "seed": null}
    GET  /v1/models       the adapters (and the base) served

`model` names an adapter of the `multi_lora` graph, or the base model's name for no adapter.
Requests that arrive together (up to `max_batch`, waiting at most `max_wait` seconds for company)
and share their sampling settings run as one `peftc.generate` batch, each row with its own adapter.
Bad requests get a 4xx answer in OpenAI's error shape (`{"error": {"message", "type", "code"}}`); an
error while generating answers 500 for that batch; the server keeps serving either way.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from torch import fx

from peftc.errors import PassError
from peftc.ir.graph import peftc_meta
from peftc.tools.generation import generate

__all__ = ["CompletionServer", "RequestError"]


class RequestError(Exception):
    """A request the server refuses: an HTTP status, OpenAI's error type and code, and a message."""

    def __init__(
        self, status: HTTPStatus, message: str, code: str, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.code, self.kind = status, code, kind


@dataclass
class _Request:
    model: str
    prompt: list[int]
    max_tokens: int
    sampling: tuple  # (temperature, top_k, seed): requests batch together only when equal
    future: Future = field(default_factory=Future)


class CompletionServer:
    """Serve `gm` (a causal LM graph after `multi_lora`) on `host:port`; `start()` returns once it
    listens."""

    def __init__(
        self,
        gm: fx.GraphModule,
        *,
        base_name: str = "base",
        tokenizer: Any = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch: int = 32,
        max_wait: float = 0.01,
        max_length: int | None = None,
        eos_token_id: int | None = None,
    ):
        if "multi_lora" not in peftc_meta(gm):
            raise PassError("serve: the graph serves no stacked adapters; apply 'multi_lora' first")
        self.gm, self.base_name, self.tokenizer = gm, base_name, tokenizer
        self.adapters = list(peftc_meta(gm)["multi_lora"]["adapters"])
        config = peftc_meta(gm).get("capture", {}).get("config", {})
        self.max_length = max_length or config.get("max_position_embeddings") or 2048
        self.vocab = config.get("vocab_size")
        self.eos_token_id = eos_token_id
        self.max_batch, self.max_wait = max_batch, max_wait
        self.pending: queue.Queue[_Request] = queue.Queue()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> CompletionServer:
        for target in (self.httpd.serve_forever, self._batches):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.pending.put(None)

    def serve_forever(self) -> None:
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            self.stop()

    # --- requests ------------------------------------------------------------------------------

    def complete(self, body: Any) -> dict:
        request = self._parse(body)
        self.pending.put(request)
        tokens, reason = request.future.result()
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "token_ids": tokens,
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
            "usage": {
                "prompt_tokens": len(request.prompt),
                "completion_tokens": len(tokens),
                "total_tokens": len(request.prompt) + len(tokens),
            },
        }

    def models(self) -> dict:
        names = [self.base_name, *self.adapters]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "peftc"} for n in names],
        }

    def _parse(self, body: Any) -> _Request:
        _check_fields(body)
        model = body.get("model")
        if model != self.base_name and model not in self.adapters:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"no model {model!r}; served: {', '.join([self.base_name, *self.adapters])}",
                "model_not_found",
            )
        prompt = self._tokens(body.get("prompt"))
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "max_tokens must be a positive integer",
                "invalid_max_tokens",
            )
        if len(prompt) + max_tokens > self.max_length:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"model's {self.max_length} positions",
                "context_length_exceeded",
            )
        return _Request(model, prompt, max_tokens, _sampling(body))

    def _tokens(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST,
                    "this server has no tokenizer: send the prompt as a list of token ids",
                    "invalid_prompt",
                )
            prompt = self.tokenizer(prompt)["input_ids"]
        if (
            not isinstance(prompt, list)
            or not prompt
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        ):
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                "prompt must be a non-empty string or list of token ids",
                "invalid_prompt",
            )
        if self.vocab is not None and max(prompt) >= self.vocab:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"token id {max(prompt)} is outside the vocabulary ({self.vocab})",
                "invalid_prompt",
            )
        return prompt

    # --- batching ------------------------------------------------------------------------------

    def _batches(self) -> None:
        waiting: list[_Request] = []
        while True:
            if not waiting:
                first = self.pending.get()
                if first is None:
                    return
                waiting.append(first)
            deadline = time.monotonic() + self.max_wait
            while len(waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self.pending.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    return
                waiting.append(item)
            batch = [r for r in waiting if r.sampling == waiting[0].sampling][: self.max_batch]
            waiting = [r for r in waiting if r not in batch]
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        temperature, top_k, seed = batch[0].sampling
        try:
            out = generate(
                self.gm,
                [r.prompt for r in batch],
                adapter_ids=[None if r.model == self.base_name else r.model for r in batch],
                max_new_tokens=max(r.max_tokens for r in batch),
                do_sample=temperature > 0,
                temperature=temperature or 1.0,
                top_k=top_k,
                seed=seed,
                eos_token_id=self.eos_token_id,
            )
        # answered as a 500 for this batch; the server goes on
        except Exception as e:
            for r in batch:
                r.future.set_exception(
                    RequestError(
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                        f"generation failed: {e}",
                        "generation_failed",
                        "server_error",
                    )
                )
            return
        for r, tokens in zip(batch, out, strict=True):
            tokens = tokens[: r.max_tokens]
            stopped = self.eos_token_id is not None and tokens and tokens[-1] == self.eos_token_id
            r.future.set_result((tokens, "stop" if stopped else "length"))


def _check_fields(body: Any) -> None:
    """Refuse a body that is not an object, or asks for what this server does not do."""
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object", "invalid_body")
    unknown = sorted(
        set(body) - {"model", "prompt", "max_tokens", "temperature", "top_k", "seed", "stream", "n"}
    )
    if unknown:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"unsupported field(s) {', '.join(unknown)}; this server takes model, prompt, "
            "max_tokens, temperature, top_k, seed",
            "unsupported_field",
        )
    if body.get("stream") or body.get("n", 1) != 1:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "stream=true and n > 1 are not supported",
            "unsupported_field",
        )


def _sampling(body: dict) -> tuple:
    """The request's (temperature, top_k, seed), checked."""
    temperature, top_k, seed = body.get("temperature", 0.0), body.get("top_k"), body.get("seed")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, "temperature must be a number >= 0", "invalid_temperature"
        )
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise RequestError(
            HTTPStatus.BAD_REQUEST, "top_k must be a positive integer", "invalid_top_k"
        )
    return (float(temperature), top_k, seed)


def _handler(server: CompletionServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `server` (the HTTP server makes one per request)."""

    class Handler(_Handler):
        completions = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    """Routes the two endpoints to `completions`, and answers every error in OpenAI's shape."""

    protocol_version = "HTTP/1.1"
    completions: CompletionServer

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(HTTPStatus.OK, self.completions.models())
        else:
            self._error(
                RequestError(HTTPStatus.NOT_FOUND, f"no route GET {self.path}", "not_found")
            )

    def do_POST(self) -> None:
        try:
            if self.path.rstrip("/") != "/v1/completions":
                raise RequestError(
                    HTTPStatus.NOT_FOUND,
                    f"no route POST {self.path}; use /v1/completions",
                    "not_found",
                )
            self._send(HTTPStatus.OK, self.completions.complete(self._json()))
        except RequestError as e:
            self._error(e)
        except Exception as e:
            self._error(
                RequestError(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    f"{type(e).__name__}: {e}",
                    "internal_error",
                    "server_error",
                )
            )

    def _json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"malformed JSON: {e}", "invalid_json"
            ) from None

    def _error(self, e: RequestError) -> None:
        self._send(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.code}})

    def _send(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # quiet: errors go to the client
    def log_message(self, format: str, *args: Any) -> None:
        pass
