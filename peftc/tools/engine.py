"""Continuous batching over a `multi_lora` graph: requests join and leave at token boundaries.

    engine = Engine(served, tokenizer=tok).start()  # a thread runs the steps
    request = engine.submit([5, 9, 13], Sampling(max_tokens=16), adapter="sql")
    request.result()                                 # or on_event=... for each new token

At every token boundary the engine runs the control calls waiting for one (adapters loaded or
unloaded), admits waiting requests up to `max_batch` in flight, runs their prompts (grouped by
length), then one decode step for every request in flight together: the caches, of any lengths, are
left-padded to the longest and `generation.ragged_step_graph` masks each row's padding and numbers
its positions from its own length, so each row computes what it computes alone (up to the summation
order a batch's size picks in the matmuls, ~1e-6 of a float32 logit). Where a graph cannot take
ragged rows (a float attention mask), rows of equal lengths step together instead. A request leaves
at its own limit (`max_tokens`, a stop token or stop string, a cancel) and its slot goes to the
next: no request waits for a neighbour to finish, and none of its limits depend on one. Each
request samples from its own generator (seeded by its `seed`), so it draws what it draws alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from peftc.errors import OptionError, PassError
from peftc.ir.graph import peftc_meta
from peftc.tools.generation import (
    check_prompts,
    decode_graphs,
    empty_caches,
    forward_step,
    ragged_step_graph,
)

__all__ = ["Engine", "Sampling", "Request", "Event", "check_generates"]


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen and when it stops. `temperature` 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (needs the engine's tokenizer)
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise OptionError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise OptionError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise OptionError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OptionError(f"top_p must be in (0, 1], got {self.top_p}")


class Event(NamedTuple):
    """What one step added to a request: its new tokens, and why it finished (None: not yet)."""

    tokens: list[int]
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    """A request in the engine: its prompt, adapter (None: the base), sampling and progress."""

    prompt: list[int]
    sampling: Sampling
    adapter: str | None = None
    on_event: Callable[[Event], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _caches: list[Tensor] | None = None
    _generator: torch.Generator | None = None
    _cancelled: bool = False

    def cancel(self) -> None:
        """Leave the batch at the next token boundary (a client that went away)."""
        self._cancelled = True

    def result(self, timeout: float | None = None) -> list[int]:
        """The generated tokens once finished; raises what made generation fail."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the request did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.tokens

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Engine:
    """Serve `gm` (a causal LM graph after `multi_lora`) with continuous batching; see the module
    docstring. `tokenizer` (optional) decodes text for stop strings."""

    def __init__(
        self,
        gm: fx.GraphModule,
        *,
        tokenizer: Any = None,
        max_batch: int = 32,
        eos_token_id: int | None = None,
    ):
        self.gm, self.tokenizer = _served(gm), tokenizer
        self.max_batch, self.eos_token_id = max_batch, eos_token_id
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.controls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.running: list[Request] = []
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def adapters(self) -> list[str]:
        return list(peftc_meta(self.gm)["multi_lora"]["adapters"])

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="peftc-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        adapter: str | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue a request; it joins the batch at the next token boundary. Bad input raises
        `OptionError` here, before anything is queued."""
        if adapter is not None and adapter not in self.adapters:
            raise OptionError(
                f"no adapter {adapter!r} is served; served: {', '.join(self.adapters) or 'none'}"
            )
        if sampling.stop and self.tokenizer is None:
            raise OptionError("stop strings need a tokenizer; give stop_token_ids instead")
        (prompt,) = check_prompts(self.gm, [prompt], sampling.max_tokens)
        request = Request(prompt, sampling, adapter, on_event)
        seed = sampling.seed if sampling.seed is not None else int(torch.seed() % 2**63)
        request._generator = torch.Generator(device=self._device()).manual_seed(seed)
        self.waiting.put(request)
        self._wake.set()
        return request

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` in the engine's thread at the next token boundary (no step is running then);
        the future holds its result."""
        future: Future = Future()
        self.controls.put((fn, future))
        self._wake.set()
        return future

    def swap(self, gm: fx.GraphModule) -> None:
        """Serve `gm` from now on (call it through `call`): requests in flight go on, each row's
        adapter found by name in the new graph."""
        self.gm = _served(gm)

    def in_use(self, adapter: str) -> bool:
        """Whether a request waiting or in flight uses `adapter` (call it through `call`)."""
        return any(r.adapter == adapter for r in self.running) or any(
            r.adapter == adapter for r in list(self.waiting.queue)
        )

    # --- the loop, in the engine's thread -------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            if not self.running and self.waiting.empty() and self.controls.empty():
                self._wake.wait()
                self._wake.clear()
                continue
            self._run_controls()
            admitted = self._admit()
            try:
                self._step(admitted)
            except Exception as e:  # the requests in this step fail; the engine goes on
                for request in [*admitted, *self.running]:
                    self._finish(request, "error", e)
            self.running = [r for r in self.running if not r.done]

    def _run_controls(self) -> None:
        while not self.controls.empty():
            fn, future = self.controls.get()
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

    def _admit(self) -> list[Request]:
        admitted = []
        while len(self.running) + len(admitted) < self.max_batch and not self.waiting.empty():
            request = self.waiting.get()
            if request._cancelled:
                self._finish(request, "cancelled")
            elif request.adapter is not None and request.adapter not in self.adapters:
                self._finish(request, "error", OptionError(f"adapter {request.adapter!r} unloaded"))
            else:
                admitted.append(request)
        return admitted

    def _step(self, admitted: list[Request]) -> None:
        prefill, step = decode_graphs(self.gm)
        for request in self.running:
            if request._cancelled:
                self._finish(request, "cancelled")
        decoding = [r for r in self.running if not r.done]
        for group in _by_length(admitted, lambda r: len(r.prompt)):
            tokens = torch.tensor([r.prompt for r in group], device=self._device())
            self._forward(prefill, group, tokens, empty_caches(prefill, len(group), tokens))
        self.running += admitted
        ragged = self._ragged()
        groups = [decoding] if ragged else _by_length(decoding, lambda r: r._caches[0].shape[2])
        for group in filter(None, groups):
            tokens = torch.tensor([[r.tokens[-1]] for r in group], device=self._device())
            if ragged is not None:
                self._forward(ragged, group, tokens, *_left_padded(group))
            else:
                caches = [torch.cat(c) for c in zip(*(r._caches for r in group), strict=True)]
                self._forward(step, group, tokens, caches)

    def _ragged(self) -> fx.GraphModule | None:
        """One step graph for rows of any lengths, where the graph allows it (else None: rows
        of equal lengths step together)."""
        try:
            return ragged_step_graph(self.gm)
        except PassError:
            return None

    def _forward(
        self,
        graph: fx.GraphModule,
        group: list[Request],
        tokens: Tensor,
        caches: list[Tensor],
        ragged: dict | None = None,
    ) -> None:
        from peftc.passes.multi_lora import adapter_ids

        inputs = {"adapter_ids": adapter_ids(self.gm, [r.adapter for r in group]), **(ragged or {})}
        with torch.no_grad():
            logits, caches = forward_step(graph, tokens, caches, inputs)
        for row, request in enumerate(group):
            # a row's own columns: the padding in front dropped
            start = caches[0].shape[2] - request._caches[0].shape[2] - 1 if ragged else 0
            request._caches = [c[row : row + 1, :, start:] for c in caches]
            self._emit(request, _choose(logits[row], request.sampling, request._generator))

    def _emit(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        sampling = request.sampling
        reason = None
        if token == self.eos_token_id or token in sampling.stop_token_ids:
            reason = "stop"
        elif sampling.stop and self._stop_string(request):
            reason = "stop"
        elif len(request.tokens) >= sampling.max_tokens:
            reason = "length"
        if reason is None:
            _notify(request, Event([token]))
        else:
            self._finish(request, reason, last=[token])

    def _stop_string(self, request: Request) -> bool:
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        return any(stop in text for stop in request.sampling.stop)

    def _finish(
        self,
        request: Request,
        reason: str,
        error: BaseException | None = None,
        last: list[int] | None = None,
    ) -> None:
        if request.done:
            return
        request.finish_reason, request.error, request._caches = reason, error, None
        request._done.set()
        _notify(request, Event(last or [], reason, error))

    def _device(self) -> torch.device:
        return next((t.device for t in self.gm.buffers()), torch.device("cpu"))


def check_generates(gm: fx.GraphModule) -> None:
    """Refuse, by name, a graph captured from a transformers model that cannot generate text (a
    classifier, an encoder, an encoder-decoder)."""
    capture = peftc_meta(gm).get("capture", {})
    if capture.get("causal_lm") is False:
        raise PassError(
            f"serving generates text, and {capture.get('class', 'this model')} is no causal "
            "language model (it cannot generate); serve a ...ForCausalLM model, or run this one "
            "as a graph or an ONNX export"
        )


def _served(gm: fx.GraphModule) -> fx.GraphModule:
    check_generates(gm)
    if "multi_lora" not in peftc_meta(gm):
        raise PassError("serving needs a graph with stacked adapters; apply 'multi_lora' first")
    return gm


def _notify(request: Request, event: Event) -> None:
    if request.on_event is not None:
        try:
            request.on_event(event)
        except Exception:  # a listener that went away must not stop the batch
            request.cancel()


def _left_padded(group: list[Request]) -> tuple[list[Tensor], dict]:
    """The rows' caches left-padded to the longest, and the ragged step's extra inputs."""
    lengths = [r._caches[0].shape[2] for r in group]
    longest = max(lengths)
    caches = [
        torch.cat([F.pad(c, (0, 0, longest - n, 0)) for c, n in zip(layer, lengths, strict=True)])
        for layer in zip(*(r._caches for r in group), strict=True)
    ]
    counts = torch.tensor(lengths, device=caches[0].device)
    mask = torch.arange(longest, device=counts.device)[None] >= (longest - counts)[:, None]
    return caches, {"past_mask": mask, "past_lengths": counts}


def _by_length(requests: list[Request], length: Callable[[Request], int]) -> list[list[Request]]:
    groups: dict[int, list[Request]] = {}
    for request in requests:
        groups.setdefault(length(request), []).append(request)
    return list(groups.values())


def _choose(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token of one row: argmax, or a draw from its own generator."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))
