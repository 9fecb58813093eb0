"""OpenAI-compatible serving of many adapters over one base (FastAPI on uvicorn), continuously
batched.

    peftc serve MODEL_FOLDER --adapters sql=adapters/sql chat=adapters/chat [--api-key KEY]

    POST /v1/completions, /v1/chat/completions   stream=true answers server-sent events
    GET  /v1/models, /health
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   (vLLM's names; --allow-adapter-loading)

`model` names an adapter, or the base model for none. Requests run on `peftc.tools.engine.Engine`:
they join and leave the running batch at token boundaries, each with its own adapter, limits and
seeded generator. Every request body is read with a size cap and a deadline and validated by the
pydantic schemas below; every refusal is a 4xx in OpenAI's error shape (`{"error": {"message",
"type", "param", "code"}}`). The server answers only Host headers on its allow-list (localhost by
default, against DNS rebinding), refuses cross-origin browser requests and non-JSON posts (against
CSRF), and with an API key (`--api-key` or `PEFTC_API_KEY`) checks `Authorization: Bearer` as
OpenAI's clients send it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import fx

from peftc.errors import OptionError, PeftcError
from peftc.tools.engine import Engine, Event, Sampling
from peftc.tools.generation import ContextLengthError, limits

__all__ = ["ServerSettings", "create_app", "serve", "BackgroundServer", "ApiError"]


@dataclass
class ServerSettings:
    """What the server answers and to whom."""

    base_name: str = "base"
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")
    max_body_bytes: int = 1 << 20
    body_timeout: float = 10.0  # seconds to send the body
    header_timeout: float = 10.0  # seconds to send the request line and headers
    allow_adapter_loading: bool = False
    chat_template: str | None = None  # overrides the tokenizer's


class ApiError(Exception):
    """A refusal: HTTP status, OpenAI's error type and code, the message, the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.kind, self.param = status, code, kind, param

    def response(self) -> JSONResponse:
        body = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# --- request schemas (unknown fields refused; JSON types strict: "42" is not a seed) -----------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampled(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    # OpenAI's options this server does not implement: accepted only at their neutral value
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[None, False] = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0)


class CompletionRequest(_Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    echo: Literal[False] = False
    best_of: Literal[1] = 1
    suffix: None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapter(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(_Strict):
    lora_name: str = Field(min_length=1)


# --- the application -----------------------------------------------------------------------------


class _Service:
    """The state behind the routes: the engine, the tokenizer, the settings."""

    def __init__(self, engine: Engine, tokenizer: Any, settings: ServerSettings):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.vocab, self.positions = limits(engine.gm)
        self.retiring: set[str] = set()
        self.adapter_lock = asyncio.Lock()

    def models(self) -> list[str]:
        return [self.settings.base_name, *self.engine.adapters]

    def check_loading(self) -> None:
        if not self.settings.allow_adapter_loading:
            raise ApiError(
                403,
                "loading adapters at run time is off; start the server with "
                "--allow-adapter-loading",
                "adapter_loading_disabled",
            )

    def adapter(self, model: str) -> str | None:
        if model == self.settings.base_name:
            return None
        if model not in self.engine.adapters or model in self.retiring:
            raise ApiError(
                404,
                f"no model {model!r}; served: {', '.join(self.models())}",
                "model_not_found",
                param="model",
            )
        return model

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(
                400,
                "this model has no tokenizer: send the prompt as token ids, or start the server "
                "with --tokenizer FOLDER",
                "invalid_prompt",
                param="prompt",
            )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) or [
            self.tokenizer.bos_token_id or 0
        ]

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def sampling(self, body: _Sampled, max_tokens: int) -> Sampling:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if stop and self.tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer", "invalid_stop", param="stop")
        try:
            return Sampling(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=body.seed,
                stop=stop,
                stop_token_ids=tuple(body.stop_token_ids or ()),
            )
        except OptionError as e:
            raise ApiError(400, str(e), "invalid_sampling") from None

    def submit(self, prompt: list[int], sampling: Sampling, adapter: str | None, on_event):
        try:
            return self.engine.submit(prompt, sampling, adapter, on_event)
        except ContextLengthError as e:
            raise ApiError(400, str(e), "context_length_exceeded", param="prompt") from None
        except OptionError as e:
            raise ApiError(400, str(e), "invalid_prompt", param="prompt") from None

    async def events(
        self, prompt: list[int], sampling: Sampling, adapter: str | None
    ) -> AsyncIterator[Event]:
        """The engine's events for one request, as they come; cancels it if the reader leaves."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request = self.submit(
            prompt, sampling, adapter, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e)
        )
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancel()

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(
                400,
                "chat needs a tokenizer with a chat template; start the server with --tokenizer",
                "no_tokenizer",
            )
        template = self.settings.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ApiError(
                400,
                "the tokenizer has no chat template; start the server with --chat-template FILE "
                "or use /v1/completions",
                "no_chat_template",
            )
        messages = [
            {
                "role": m.role,
                "content": m.content
                if isinstance(m.content, str)
                else "".join(p.text for p in m.content),
            }
            for m in body.messages
        ]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return self.encode(text)


def create_app(
    gm: fx.GraphModule,
    *,
    tokenizer: Any = None,
    settings: ServerSettings | None = None,
    max_batch: int = 32,
    eos_token_id: int | None = None,
) -> FastAPI:
    """The ASGI application serving `gm` (a causal LM after `multi_lora`); its engine starts and
    stops with the application (`app.state.service.engine`)."""
    settings = settings or ServerSettings()
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    engine = Engine(gm, tokenizer=tokenizer, max_batch=max_batch, eos_token_id=eos_token_id)
    service = _Service(engine, tokenizer, settings)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="peftc", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.middleware("http")(_guard(settings))
    _routes(app, service)
    _errors(app)
    return app


def _guard(settings: ServerSettings):
    """Host allow-list, no cross-origin browsers, JSON posts only, the API key."""
    hosts = {h.lower() for h in settings.allowed_hosts}

    async def guard(request: Request, call_next):
        host = request.headers.get("host", "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if "*" not in hosts and name not in hosts:
            return ApiError(
                400,
                f"Host {host!r} is not served; allowed: {', '.join(sorted(hosts))} (--allow-host)",
                "invalid_host",
            ).response()
        origin = request.headers.get("origin")
        if origin is not None and origin.split("//", 1)[-1].lower() != host:
            return ApiError(403, f"cross-origin requests ({origin}) are refused", "cors").response()
        if request.url.path == "/health":
            return await call_next(request)
        if settings.api_key is not None and not _key_matches(request, settings.api_key):
            return ApiError(
                401,
                "Incorrect API key provided: send Authorization: Bearer <key>",
                "invalid_api_key",
            ).response()
        if request.method == "POST" and not request.headers.get("content-type", "").startswith(
            "application/json"
        ):
            return ApiError(
                415, "send the body as Content-Type: application/json", "invalid_content_type"
            ).response()
        return await call_next(request)

    return guard


def _key_matches(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _body(request: Request, settings: ServerSettings, schema: type[BaseModel]) -> Any:
    """The request body read within the size cap and the deadline, validated by `schema`."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
        raise ApiError(
            413, f"the body must be at most {settings.max_body_bytes} bytes", "body_too_large"
        )
    try:
        reading = _read(request, settings.max_body_bytes)
        data = await asyncio.wait_for(reading, settings.body_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, "the body was not sent in time", "timeout") from None
    try:
        return schema.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(
            400,
            f"{where + ': ' if where else ''}{first['msg']}",
            first["type"],
            param=where or None,
        ) from None


async def _read(request: Request, cap: int) -> bytes:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > cap:
            raise ApiError(413, f"the body must be at most {cap} bytes", "body_too_large")
    return bytes(data)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def refused(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(404)
    async def no_route(request: Request, e: Exception):
        return ApiError(
            404, f"no route {request.method} {request.url.path}", "not_found"
        ).response()

    @app.exception_handler(405)
    async def wrong_method(request: Request, e: Exception):
        return ApiError(
            405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        ).response()

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return ApiError(
            500, f"{type(e).__name__}: {e}", "internal_error", "server_error"
        ).response()


def _routes(app: FastAPI, service: _Service) -> None:
    settings = service.settings

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(service.engine.running)}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "peftc"}
            for name in service.models()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, settings, CompletionRequest)
        adapter = service.adapter(body.model)
        prompt = _completion_prompt(service, body.prompt)
        sampling = service.sampling(body, body.max_tokens)
        return await _answer(service, body, adapter, prompt, sampling, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request, settings, ChatRequest)
        adapter = service.adapter(body.model)
        prompt = service.chat_prompt(body)
        room = (service.positions or len(prompt) + 256) - len(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
        sampling = service.sampling(body, max_tokens)
        return await _answer(service, body, adapter, prompt, sampling, chat=True)

    _adapter_routes(app, service)


def _completion_prompt(service: _Service, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(
                400, "send one prompt per request (n = 1)", "invalid_prompt", param="prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return service.encode(prompt)
    if not prompt:
        raise ApiError(400, "the prompt is empty", "invalid_prompt", param="prompt")
    return prompt


async def _answer(service, body, adapter, prompt, sampling, *, chat: bool):
    reply = _Reply(service, body.model, prompt, sampling.stop, chat)
    events = service.events(prompt, sampling, adapter)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        first = await anext(events)  # refusals before the stream starts answer 4xx
        return StreamingResponse(reply.stream(first, events, usage), media_type="text/event-stream")
    tokens, reason = [], None
    async for event in events:
        if event.error is not None:
            raise ApiError(
                500, f"generation failed: {event.error}", "generation_failed", "server_error"
            )
        tokens += event.tokens
        reason = event.finish_reason
    return reply.whole(tokens, reason)


class _Reply:
    """OpenAI's response shapes for one request: whole, or as server-sent chunks."""

    def __init__(
        self, service: _Service, model: str, prompt: list[int], stops: tuple[str, ...], chat: bool
    ):
        self.service, self.model, self.prompt, self.chat = service, model, prompt, chat
        self.stops = stops
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def text(self, tokens: list[int], final: bool) -> str:
        """The text of `tokens` up to the first stop string; while streaming (not `final`),
        without what could still become a stop string or a character not yet complete."""
        text = self.service.decode(tokens)
        found = [text.find(s) for s in self.stops if s in text]
        if found:
            return text[: min(found)]
        if not final:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")  # a character whose bytes have not all come
        return text

    def usage(self, generated: int) -> dict:
        n = len(self.prompt)
        return {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}

    def whole(self, tokens: list[int], reason: str | None) -> dict:
        text = self.text(tokens, final=True)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, token_ids=tokens)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(len(tokens)),
        }

    def chunk(self, delta: str, reason: str | None, tokens: list[int]) -> str:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": delta}
        else:
            choice.update(text=delta, token_ids=tokens)
        return self._event([choice])

    def _event(self, choices: list, usage: dict | None = None) -> str:
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    async def stream(self, first: Event, events: AsyncIterator[Event], usage: bool):
        tokens: list[int] = []
        sent, unsent = "", 0  # text sent so far; tokens not in a chunk yet
        event: Event | None = first
        while event is not None:
            if event.error is not None:
                error = {"message": f"generation failed: {event.error}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            tokens += event.tokens
            unsent += len(event.tokens)
            final = event.finish_reason is not None
            text = self.text(tokens, final)
            if text[len(sent) :] or final:
                new_tokens = tokens[len(tokens) - unsent :]
                yield self.chunk(text[len(sent) :], event.finish_reason, new_tokens)
                sent, unsent = text, 0
            event = await anext(events, None)
        if usage:
            yield self._event([], self.usage(len(tokens)))
        yield "data: [DONE]\n\n"


def _adapter_routes(app: FastAPI, service: _Service) -> None:
    from peftc.ir.pipeline import apply
    from peftc.technique.checkpoint import load_adapter

    engine = service.engine
    allowed = service.check_loading

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        allowed()
        body = await _body(request, service.settings, LoadAdapter)
        async with service.adapter_lock:
            if body.lora_name in service.models():
                raise ApiError(400, f"{body.lora_name!r} is served already", "adapter_exists")
            try:
                loaded = await asyncio.to_thread(
                    lambda: apply(
                        load_adapter(engine.gm, body.lora_path, adapter=body.lora_name),
                        "multi_lora",
                    )
                )
            except (PeftcError, OSError) as e:
                raise ApiError(400, str(e), "invalid_adapter", param="lora_path") from None
            await asyncio.wrap_future(engine.call(lambda: engine.swap(loaded)))
        return {"status": "ok", "loaded": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        allowed()
        body = await _body(request, service.settings, UnloadAdapter)
        name = body.lora_name
        async with service.adapter_lock:
            service.adapter(name)  # 404 if not served
            service.retiring.add(name)  # new requests for it are refused from now on
            try:
                while await asyncio.wrap_future(engine.call(lambda: engine.in_use(name))):
                    await asyncio.sleep(0.02)
                left = await asyncio.to_thread(
                    lambda: apply(engine.gm, f"delete_adapter(name='{name}'), multi_lora")
                )
                await asyncio.wrap_future(engine.call(lambda: engine.swap(left)))
            finally:
                service.retiring.discard(name)
        return {"status": "ok", "unloaded": name}


def serve(
    gm: fx.GraphModule,
    *,
    tokenizer: Any = None,
    settings: ServerSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
) -> None:
    """Run the server until interrupted (uvicorn, with the header deadline of `settings`)."""
    settings = settings or ServerSettings()
    app = create_app(gm, tokenizer=tokenizer, settings=settings, max_batch=max_batch)
    _server(app, host, port, settings.header_timeout).run()


def _server(app: FastAPI, host: str, port: int, header_timeout: float):
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, http=_protocol(header_timeout), log_level="warning"
    )
    return uvicorn.Server(config)


class BackgroundServer:
    """The application on uvicorn in a thread, for tests, benchmarks and notebooks:

    with BackgroundServer(app) as url:   # http://127.0.0.1:<a free port>
        ..."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        header_timeout = app.state.service.settings.header_timeout
        self.server = _server(app, host, port, header_timeout)
        self.thread = threading.Thread(target=self.server.run, name="peftc-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PeftcError("the server did not start; see its log above")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _protocol(header_timeout: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request line and headers are not
    all in within `header_timeout` seconds (a slow client otherwise holds it open forever)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(header_timeout, self._headers_late, self.conn.their_state)

        def _headers_late(self, _: Any) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol
