"""An OpenAI-compatible HTTP server: one engine, one batch, one persistent trie.

Every request becomes a row of the scheduler's batch, so concurrent requests share
forward passes and the drafter's memory trie: each answer teaches the trie, and the
trie is saved to disk (periodically and at shutdown) and loaded at start, so what was
learned survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .engine import BatchRow, Engine, TextStream
from .persist import fingerprint, flatten, load_calibration, load_trie, warm, write_arrays
from .scheduler import QueueFull, Scheduler

log = logging.getLogger("triespec.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# --- requests (strict: a string is not a number, as in OpenAI's API) ---

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    # accepted by OpenAI's API but not by this server: refused, rather than silently ignored
    logprobs: bool | int | None = None
    echo: bool = False
    tools: list | None = None

    def unsupported(self) -> str | None:
        return next((name for name, value in (("logprobs", self.logprobs), ("echo", self.echo), ("tools", self.tools))
                     if value), None)


class CompletionRequest(_Request):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# --- metrics ---

class Metrics:
    def __init__(self, scheduler: Scheduler, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.tokens = Counter("triespec_generated_tokens", "Tokens generated", registry=r)
        self.steps = Counter("triespec_steps", "Batched forward passes", registry=r)
        self.requests = Counter("triespec_requests", "Requests answered, by status", ["status"], registry=r)
        self.per_step = Histogram("triespec_tokens_per_step", "Tokens one row gained from one forward (accepted + 1)",
                                  buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.rows = Histogram("triespec_step_batch_size", "Rows in each batched forward pass",
                              buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64), registry=r)
        self.rate = Gauge("triespec_tokens_per_second", "Generated tokens per second over the last 10 s", registry=r)
        Gauge("triespec_queue_depth", "Requests waiting to join the batch", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("triespec_batch_size", "Rows in the running batch", registry=r).set_function(
            lambda: scheduler.batch_size)
        Gauge("triespec_trie_nodes", "Nodes in the shared memory trie", registry=r).set_function(
            lambda: 0 if engine.drafter.memory is None else len(engine.drafter.memory))
        self.trie_bytes = Gauge("triespec_trie_bytes", "Size of the memory trie as last saved", registry=r)
        self._recent: list[tuple[float, int]] = []

    def step(self, step, seconds: float) -> None:
        now, made = time.monotonic(), sum(len(new) for _, new in step)
        self.steps.inc()
        self.rows.observe(len(step))
        self.tokens.inc(made)
        for _, new in step:
            self.per_step.observe(len(new))
        self._recent = [(t, n) for t, n in self._recent if now - t < 10] + [(now, made)]
        span = max(now - self._recent[0][0] + seconds, 1e-6)
        self.rate.set(sum(n for _, n in self._recent) / span)


# --- the app ---

def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_batch: int = 32,
               max_queue: int = 64, trie_path: str | os.PathLike | None = None, save_interval: float = 300.0,
               warm_from: str | os.PathLike | None = None,
               on_step: Callable[[list[tuple[BatchRow, list[int]]], float], None] | None = None) -> FastAPI:
    """The server's app; run it with uvicorn. The trie at `trie_path` is loaded now (a
    corrupt or foreign one is set aside as `<name>.rejected`, and the trie starts
    empty), saved every `save_interval` seconds and at shutdown. `on_step(step, seconds)`
    sees every step after the metrics, on the scheduler thread (scale.py shares the
    answers with other replicas through it)."""
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer")
    fp = fingerprint(engine.tokenizer, engine.vocab_size)
    if trie_path is not None or warm_from is not None:
        if engine.drafter.memory is None:
            raise ValueError(f"{type(engine.drafter).__name__} keeps no trie to load, save or warm")
    if trie_path is not None and Path(trie_path).exists():
        _load(engine, Path(trie_path), fp)
    if warm_from is not None:
        log.info("warmed the trie with %d answers from %s", warm(engine, warm_from), warm_from)

    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
    metrics = Metrics(scheduler, engine)
    scheduler.on_step = metrics.step if on_step is None else _both(metrics.step, on_step)

    saver = _Saver(engine, trie_path, fp, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        every = asyncio.create_task(saver.every(save_interval, scheduler)) if trie_path else None
        try:
            yield
        finally:
            if every is not None:
                every.cancel()
            await asyncio.to_thread(scheduler.stop)
            if trie_path is not None:  # the scheduler thread is gone: nobody else touches the trie
                try:
                    await asyncio.to_thread(saver.write, 1 << 62, saver.take())
                except Exception:
                    log.exception("could not save the trie to %s at shutdown", trie_path)

    app = FastAPI(title="triespec", lifespan=lifespan)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        metrics.requests.labels(str(e.status)).inc()
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg')}"
        param = where[0] if where else None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        metrics.requests.labels("400").inc()
        return _error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return _error(e.status_code, str(e.detail), type="invalid_request_error")

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        log.exception("unexpected error")
        return _error(500, f"internal error: {type(e).__name__}", type="server_error")

    @app.get("/health")
    async def health():
        if not scheduler.alive():
            return _error(503, "the scheduler is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "triespec"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(request, body, body.prompt, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, request: Request):
        # "developer" is OpenAI's newer name for "system", which chat templates know
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        limit = body.max_completion_tokens or body.max_tokens
        return await _serve(request, body, messages, limit, chat=True)

    async def _serve(request: Request, body: _Request, prompt, max_tokens: int | None, chat: bool):
        if body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server has '{model_name}'",
                           param="model", code="model_not_found")
        if name := body.unsupported():
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
        row = _make_row(engine, prompt, max_tokens, body)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(new, finish):  # on the scheduler thread
            loop.call_soon_threadsafe(events.put_nowait, (new, finish))

        try:
            ticket = scheduler.submit(row, deliver)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}", type="rate_limit_error", code="rate_limit_exceeded")
        reply = _Reply(engine, row, model_name, chat)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(reply, events, ticket, scheduler, metrics, usage),
                                     media_type="text/event-stream")
        try:
            while True:
                try:
                    new, finish = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        scheduler.cancel(ticket)
                        return Response(status_code=499)
                    continue
                if new is None:
                    raise APIError(500, finish, type="server_error")
                if finish is not None:
                    break
        except asyncio.CancelledError:
            scheduler.cancel(ticket)
            raise
        metrics.requests.labels("200").inc()
        return reply.whole()

    return app


def _both(first: Callable, then: Callable) -> Callable:
    def step(step, seconds: float) -> None:
        first(step, seconds)
        then(step, seconds)
    return step


async def _stream(reply: _Reply, events: asyncio.Queue, ticket, scheduler: Scheduler, metrics: Metrics,
                  usage: bool):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
    try:
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        while True:
            new, finish = await events.get()
            if new is None:
                yield _sse({"error": {"message": finish, "type": "server_error", "param": None, "code": None}})
                break
            if piece := reply.text.push(new):
                yield _sse(reply.chunk(piece))
            if finish is not None:
                if piece := reply.text.finish(reply.row.result().text):
                    yield _sse(reply.chunk(piece))
                yield _sse(reply.chunk(None, finish))
                if usage:
                    yield _sse({**reply.head("chunk"), "choices": [], "usage": reply.usage()})
                metrics.requests.labels("200").inc()
                break
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the response task is cancelled)
        if reply.row.finish is None:
            scheduler.cancel(ticket)


class _Reply:
    """OpenAI's response objects for one row."""

    def __init__(self, engine: Engine, row: BatchRow, model_name: str, chat: bool):
        self.row, self.model_name, self.chat = row, model_name, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text = TextStream(engine.tokenizer, row.stops.stop)

    def head(self, kind: str) -> dict:
        obj = "text_completion"
        if self.chat:
            obj = "chat.completion.chunk" if kind == "chunk" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def usage(self) -> dict:
        prompt, completion = len(self.row.ids), len(self.row.out)
        # forward_steps (not in OpenAI's API; clients read it as an extra field): the forward
        # passes the answer took, so completion_tokens / forward_steps is its tokens per forward
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "forward_steps": self.row.stats.steps}

    def chunk(self, piece, finish: str | None = None) -> dict:
        if self.chat:
            delta = piece if isinstance(piece, dict) else ({} if piece is None else {"content": piece})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return {**self.head("chunk"), "choices": [choice]}

    def whole(self) -> dict:
        result = self.row.result()
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return {**self.head("whole"), "choices": [choice], "usage": self.usage()}


def _make_row(engine: Engine, prompt, max_tokens: int | None, body: _Request) -> BatchRow:
    """The request as an engine row; context and settings checked (APIError 400)."""
    try:
        ids = engine.encode(prompt)
    except (ValueError, TemplateError) as e:  # TemplateError: the chat template refused the messages
        code = "context_length_exceeded" if "context" in str(e) else None
        raise APIError(400, str(e), param="messages" if isinstance(prompt, list) and prompt
                       and isinstance(prompt[0], dict) else "prompt", code=code) from e
    room = engine.context_length - len(ids)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {engine.context_length} tokens; the request "
                       f"asks for {len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    sampling = {"do_sample": body.temperature > 0}
    if body.temperature > 0:
        sampling.update(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    try:
        return engine.row(ids, max_tokens, body.stop, **sampling)
    except ValueError as e:
        raise APIError(400, str(e), param="stop" if "stop" in str(e) else None) from e


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _load(engine: Engine, path: Path, fp: str) -> None:
    try:
        engine.drafter.memory = load_trie(path, fp, engine.drafter.memory.max_nodes)
        log.info("loaded the trie from %s: %d nodes", path, len(engine.drafter.memory))
        state = load_calibration(path)
        if state is not None and engine.budget is not None:
            try:
                engine.budget.calibration.restore(state)
            except ValueError as e:
                log.warning("%s: its budget calibration was not used (%s)", path, e)
    except ValueError as e:
        aside = path.with_name(path.name + ".rejected")
        os.replace(path, aside)
        log.error("%s; it was moved to %s and the trie starts empty", e, aside)


class _Saver:
    """Saves the trie and the budget's calibration: taken on the scheduler thread between
    two steps (only it touches them), written on another thread while decoding goes on. A write never
    replaces a newer snapshot (the one at shutdown is the newest)."""

    def __init__(self, engine: Engine, path, fp: str, metrics: Metrics):
        self.engine, self.path, self.fp, self.metrics = engine, path, fp, metrics
        self.lock, self.written = threading.Lock(), -1

    def take(self):
        """The trie's arrays and the budget's calibration, as they are now (scheduler thread only)."""
        budget = self.engine.budget
        return flatten(self.engine.drafter.memory), None if budget is None else budget.calibration.state()

    def write(self, snapshot: int, taken) -> None:
        with self.lock:
            if snapshot > self.written:
                self.metrics.trie_bytes.set(write_arrays(taken[0], self.path, self.fp, calibration=taken[1]))
                self.written = snapshot

    async def every(self, seconds: float, scheduler: Scheduler) -> None:
        for snapshot in itertools.count():
            await asyncio.sleep(seconds)
            try:
                taken = await asyncio.wrap_future(scheduler.call(self.take))
                await asyncio.to_thread(self.write, snapshot, taken)
            except Exception:
                log.exception("saving the trie failed; the server goes on")


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Run the app with uvicorn on a background thread; yields its base URL
    (port 0: any free port). Shuts it down (saving the trie) on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="triespec-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
