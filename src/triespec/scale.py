"""The server scaled out on Ray Serve: many engine replicas, one shared memory of answers.

`triespec serve --replicas N` runs three kinds of Ray processes:

- `Engine` replicas (a Serve deployment): each runs server.py's app, unchanged, over its
  own engine, scheduler and local trie, so drafting never waits on the network. What a
  replica generates is kept in a batch, pushed to the shared memory every
  `sync_interval` seconds, and the merged memory's latest snapshot comes back.
- the shared memory (`SharedMemory`, a named Ray actor): one trie that learns every
  replica's answers as the local ones do, bounded by the same node budget (frequency
  decay), whose snapshots are persist.py's arrays; it keeps the budget's calibration
  (the mean of the replicas'), loads `--trie FILE` at start and saves to it.
- `Front` (the Serve ingress): reads each HTTP request, sends it to an Engine replica
  chosen by `PrefixAffinityRouter` (requests that start alike, or that carry the same
  `x-triespec-affinity` header, go to one replica while its queue allows), and streams
  the reply back, naming the replica in `x-triespec-replica`. A request whose replica dies before a
  byte of the reply went out is sent again to another replica (greedy and seeded
  sampling answer the same); a stream cut off midway ends with an error event.
  `/health` adds the replicas and the shared memory's size and age.

Terms: an *answer* is one finished row's generated token ids with the `match_length`
prompt tokens just before them (what a session teaches the memory trie); a *snapshot*
is (version, flatten's arrays as int32, calibration).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .drafters import TrieDrafter
from .persist import flatten, load_calibration, load_trie, unflatten, write_arrays

log = logging.getLogger("triespec.scale")

MEMORY_NAME, NAMESPACE = "triespec-memory", "triespec"
AFFINITY_CHARS = 512  # the request text that decides its replica: a system prompt, a document's start
AFFINITY_HEADER = b"x-triespec-affinity"  # a client's own key (a session id), in place of the prompt's start
REPLICA_HEADER = b"x-triespec-replica"  # on every reply: the replica that answered


@dataclasses.dataclass
class ScaleConfig:
    """What `triespec serve --replicas N` starts. `engine`: the keyword arguments of
    `build_engine`; `server`: those of server.create_app (model_name, api_key, ...)."""
    replicas: int
    engine: dict
    server: dict
    cpus_per_replica: float = 1.0
    trie: str | None = None  # the shared memory's file
    save_interval: float = 300.0
    sync_interval: float = 2.0  # seconds between a replica's pushes and pulls
    max_nodes: int = 500_000  # the shared memory's node budget (the replicas' own too)
    retry_for: float = 120.0  # seconds a request whose replica died is tried again
    imbalance: int = 4  # requests more than the least busy replica before affinity gives way
    app_name: str = "triespec"

    def __post_init__(self):
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        for name in ("cpus_per_replica", "save_interval", "sync_interval", "retry_for"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_nodes < 1 or self.imbalance < 0:
            raise ValueError(f"max_nodes must be >= 1 and imbalance >= 0, got {self.max_nodes}, {self.imbalance}")


def build_engine(model: str, dtype: str = "float32", no_draft: bool = False, **settings):
    """The engine a replica serves with: `triespec serve`'s options (decoding_length,
    branch_length, adaptive, budget_cache, max_nodes) as keyword arguments."""
    from .drafters import NoDraft
    from .engine import Engine
    from .loading import load

    if no_draft:
        loaded, tokenizer = load(model, dtype=dtype)
        return Engine(loaded, tokenizer, drafter=NoDraft(), adaptive=False)
    return Engine.from_pretrained(model, dtype=dtype, **settings)


# --- the shared memory ---

class SharedMemory:
    """One trie learning every replica's answers (a plain class; `start` makes it a Ray
    actor). Its settings must be the replicas' drafter's, so that an n-gram means the same."""

    def __init__(self, path: str | None = None, max_nodes: int = 500_000, match_length: int = 2,
                 branch_length: int = 12, save_interval: float = 300.0, forget_after: float = 120.0,
                 rebuild_interval: float = 0.0):
        self.drafter = TrieDrafter(match_length=match_length, branch_length=branch_length, max_nodes=max_nodes)
        self.path, self.save_interval, self.forget_after = path, save_interval, forget_after
        self.fingerprint: str | None = None
        # versions: this incarnation's epoch (a restarted actor starts another) and a count
        self.epoch, self.count = uuid.uuid4().hex[:8], 0
        self.updated, self.saved = time.time(), time.monotonic()
        self.calibrations: dict[str, tuple[float, np.ndarray]] = {}  # replica -> (when, its latest calibration)
        self.seen: dict[str, float] = {}  # replica -> when it last synced
        self.answers = 0
        self._snapshot: tuple | None = None  # the latest one made, for every replica
        # a snapshot is made at most once per rebuild_interval: every push makes a new
        # version, and without it N busy replicas would have it make N per sync interval
        self.rebuild_interval, self._built = rebuild_interval, -float("inf")

    @property
    def version(self) -> str:
        return f"{self.epoch}:{self.count}"

    def push(self, replica: str, fingerprint: str, answers: list[tuple[list[int], list[int]]],
             calibration: np.ndarray | None = None) -> str:
        """Learn a replica's batch of answers, each (prompt tail, generated ids), and keep
        its calibration; returns the memory's version. The first replica's tokenizer
        (`fingerprint`) fixes what the token ids mean, and the file is loaded then; a
        replica with another tokenizer is refused (ValueError)."""
        if self.fingerprint is None:
            self.fingerprint = fingerprint
            self._load()
        elif fingerprint != self.fingerprint:
            raise ValueError(f"replica {replica} has another tokenizer ({fingerprint}) than the shared memory's "
                             f"({self.fingerprint})")
        for lead, ids in answers:
            self.drafter.learn_text(ids, lead)
        now = time.time()
        if calibration is not None:
            self.calibrations[replica] = (now, np.asarray(calibration, dtype=np.float64))
            self.calibrations.pop("file", None)  # the replicas started from it, and carry it on
        if answers:
            self.count, self.updated, self.answers = self.count + 1, now, self.answers + len(answers)
        self.seen[replica] = now
        if self.path is not None and time.monotonic() - self.saved > self.save_interval:
            self.save()
        return self.version

    def snapshot(self, since: str = ""):
        """(version, (parent, token, count) as int32, calibration or None), or None when
        the replica has the newest snapshot made (`since`: its version). A newer version
        gets its snapshot once `rebuild_interval` seconds have passed since the last one
        was made; until then replicas get the last one, and the newer answers at a later
        pull."""
        if since == self.version:
            return None
        if self._snapshot is None or (self._snapshot[0] != self.version
                                      and time.monotonic() - self._built >= self.rebuild_interval):
            arrays = tuple(a.astype(np.int32) for a in flatten(self.drafter.memory))
            self._snapshot, self._built = (self.version, arrays, self.calibration()), time.monotonic()
        return None if self._snapshot[0] == since else self._snapshot

    def calibration(self) -> np.ndarray | None:
        """The calibrations of the replicas heard from lately, averaged cell by cell."""
        now = time.time()
        states = [state for when, state in self.calibrations.values() if now - when < self.forget_after]
        states = [state for state in states if state.shape == states[0].shape]
        return np.mean(states, axis=0) if states else None

    def stats(self) -> dict:
        snap = self._snapshot
        return {"nodes": len(self.drafter.memory), "max_nodes": self.drafter.memory.max_nodes,
                "version": self.version, "answers": self.answers, "age_s": round(time.time() - self.updated, 3),
                "snapshot_bytes": None if snap is None else int(sum(a.nbytes for a in snap[1])),
                "replicas_seen": {r: round(time.time() - t, 3) for r, t in self.seen.items()}}

    def save(self) -> int | None:
        """Write the memory and calibration to its file (atomically); returns its size."""
        self.saved = time.monotonic()
        if self.path is None or self.fingerprint is None:
            return None
        return write_arrays(flatten(self.drafter.memory), self.path, self.fingerprint, self.calibration())

    def _load(self) -> None:
        path = None if self.path is None else Path(self.path)
        if path is None or not path.exists():
            return
        try:
            self.drafter.memory = load_trie(path, self.fingerprint, self.drafter.memory.max_nodes)
        except ValueError as e:
            aside = path.with_name(path.name + ".rejected")
            os.replace(path, aside)
            log.error("%s; it was moved to %s and the shared memory starts empty", e, aside)
            return
        calibration = load_calibration(path)
        if calibration is not None:
            self.calibrations["file"] = (float("inf"), calibration)
        self.count += 1
        log.info("the shared memory loaded %s: %d nodes", path, len(self.drafter.memory))


# --- routing ---

@dataclasses.dataclass
class Forwarded:
    """An HTTP request as the front hands it to an Engine replica."""
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    affinity: str = ""  # what the router keeps together (affinity_key)


def affinity_key(body: bytes) -> str:
    """The start of a request's prompt (chat: its messages' roles and text, in order), up
    to AFFINITY_CHARS: requests sharing a system prompt, a document or a conversation's
    first turns share it. "" for a body that is not a prompt."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(request, dict):
        return ""
    parts = []
    for message in request.get("messages") or []:
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role')}:{content if isinstance(content, str) else ''}\n")
    prompt = request.get("prompt")
    parts.append(prompt if isinstance(prompt, str) else json.dumps(prompt) if prompt else "")
    return "".join(parts)[:AFFINITY_CHARS]


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: each affinity key has its replica (rendezvous hashing:
    a replica that leaves moves only its own keys), while that replica has at most
    `imbalance` more requests than the least busy one; beyond that, or without a key,
    the least busy replicas come first. Serve probes the replicas of the first rank and
    falls to the next rank when none answers in time or has room; a replica busy
    decoding can miss the probe's deadline (0.1 s, then doubling), so the key's replica
    is offered alone for the first `patience` rounds. (Not FIFO: a replica found for a
    request goes to that request, not to the oldest one waiting, whose key may be another's.)"""

    def initialize_state(self, imbalance: int = 4, patience: int = 4):
        self.imbalance, self.patience = imbalance, patience
        self.rounds: dict[str, int] = {}  # request -> rounds it has been offered its replica alone

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []

        def queue(replica):
            return self.replica_queue_len_cache.get(replica.replica_id) or 0

        # by attribute: the router class reaches the front cloudpickled, and its `Forwarded` need not be
        # the class the arguments were unpickled as
        key = next((a.affinity for a in (pending_request.args if pending_request else ()) if hasattr(a, "affinity")),
                   "")
        by_load = sorted(candidate_replicas, key=lambda r: (queue(r), random.random()))
        if not key:
            return [by_load[:2], by_load[2:]] if len(by_load) > 2 else [by_load]
        ranked = sorted(candidate_replicas, key=lambda r: rendezvous(key, r.replica_id.unique_id))
        if queue(ranked[0]) - queue(by_load[0]) > self.imbalance:
            return [by_load]
        request = pending_request.metadata.internal_request_id
        if len(self.rounds) > 10_000:  # requests cancelled while being routed
            self.rounds.clear()
        self.rounds[request] = self.rounds.get(request, 0) + 1
        if self.rounds[request] <= self.patience or len(ranked) == 1:
            return [ranked[:1]]
        return [ranked[:1], ranked[1:]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        self.rounds.pop(pending_request.metadata.internal_request_id, None)


def rendezvous(key: str, replica: str) -> bytes:
    """The order in which replicas claim `key` (stable across processes, unlike hash())."""
    return hashlib.blake2b(f"{replica}\0{key}".encode(), digest_size=8).digest()


# --- the deployments ---

class Engine:
    """One engine replica: server.py's app over its own engine, its scheduler started,
    its memory trie pulled from and pushed to the shared memory."""

    async def __init__(self, config: ScaleConfig):
        from .persist import fingerprint
        from .server import create_app

        self.config, self.memory = config, ray.get_actor(MEMORY_NAME, namespace=NAMESPACE)
        self.id = serve.get_replica_context().replica_id.unique_id
        engine = await asyncio.to_thread(build_engine, **config.engine)
        self.engine, self.drafter = engine, engine.drafter
        self.pending: list[tuple[list[int], list[int]]] = []  # answers not yet pushed (scheduler thread)
        self.version = ""  # of the shared memory's snapshot installed last
        self.sharing = getattr(self.drafter, "memory", None) is not None
        self.fingerprint = fingerprint(engine.tokenizer, engine.vocab_size)
        if self.sharing:  # before the first request: start from what every replica learned
            await asyncio.wait_for(self.memory.push.remote(self.id, self.fingerprint, []), 60)
            fetched = await self._fetch()
            if fetched is not None:
                self.version = fetched[0]
                self._install(*fetched[1:])
        self.app = create_app(engine, on_step=self._learned if self.sharing else None, **config.server)
        self.scheduler = self.app.state.scheduler
        self.scheduler.start()
        self._sync = asyncio.get_running_loop().create_task(self._sync_loop()) if self.sharing else None
        log.info("replica %s ready", self.id)

    def _learned(self, step, seconds: float) -> None:
        """on_step, scheduler thread: keep every finished row's answer for the next push."""
        match = self.drafter.match_length
        for row, _ in step:
            if row.finish is not None and row.out:
                self.pending.append((row.ids[-match:], list(row.out)))

    def _take(self):
        """Scheduler thread: the batch to push, and the calibration."""
        batch, self.pending = self.pending, []
        budget = self.engine.budget
        return batch, None if budget is None else budget.calibration.state()

    def _install(self, trie, calibration) -> None:
        """Scheduler thread (or before it starts): the merged memory replaces the local
        one; answers finished since the last push are learned again (they go out next)."""
        self.drafter.memory = trie
        for lead, ids in self.pending:
            self.drafter.learn_text(ids, lead)
        if calibration is not None and self.engine.budget is not None:
            try:
                self.engine.budget.calibration.restore(calibration)
            except ValueError as e:
                log.warning("the shared calibration was not used: %s", e)

    async def _fetch(self):
        """The shared memory's newest snapshot as (version, trie, calibration), or None if
        this replica has it already. The trie is built here, off the scheduler thread."""
        timeout = max(30.0, 5 * self.config.sync_interval)
        snapshot = await asyncio.wait_for(self.memory.snapshot.remote(self.version), timeout)
        if snapshot is None:
            return None
        version, arrays, calibration = snapshot
        return version, await asyncio.to_thread(unflatten, arrays, self.config.max_nodes), calibration

    async def sync(self) -> None:
        """Push what this replica generated since the last push, then pull the merged memory."""
        timeout = max(30.0, 5 * self.config.sync_interval)
        batch, calibration = await asyncio.wrap_future(self.scheduler.call(self._take))
        try:
            await asyncio.wait_for(self.memory.push.remote(self.id, self.fingerprint, batch, calibration), timeout)
        except BaseException:  # kept for the next push
            await asyncio.wrap_future(self.scheduler.call(lambda: self._requeue(batch)))
            raise
        fetched = await self._fetch()
        if fetched is not None:
            version, trie, calibration = fetched
            await asyncio.wrap_future(self.scheduler.call(lambda: self._install(trie, calibration)))
            self.version = version

    def _requeue(self, batch) -> None:
        self.pending[:0] = batch

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync_interval)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the shared memory away or restarting: keep serving, try again
                log.warning("replica %s could not sync with the shared memory: %r", self.id, e)

    async def handle(self, request: Forwarded) -> AsyncIterator[tuple]:
        """Run one HTTP request through the app; yields ("start", status, headers), then
        ("body", bytes) pieces. Cancelled when the front's client goes away."""
        sent, gone = asyncio.Queue(), asyncio.Event()
        received = False

        async def receive():
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await sent.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
                 "query_string": request.query, "headers": request.headers, "client": None,
                 "server": ("127.0.0.1", 0)}
        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                sent.put_nowait(None)  # the app returned (or failed): nothing more comes

        task = asyncio.get_running_loop().create_task(run())
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    yield ("start", message["status"], [*message.get("headers", []), (REPLICA_HEADER, self.id.encode())])
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield ("body", bytes(message["body"]))
                    if not message.get("more_body"):
                        return
            task.result()  # the app failed: its error goes to the front
        finally:
            gone.set()
            if not task.done():
                task.cancel()

    def check_health(self) -> None:
        """Serve's health check: a replica whose scheduler died is replaced."""
        if not self.scheduler.alive():
            raise RuntimeError("the scheduler is not running")

    def __del__(self):
        """Serve's graceful shutdown: stop decoding, push the last batch."""
        scheduler = getattr(self, "scheduler", None)
        if scheduler is None:
            return
        if self._sync is not None:
            self._sync.cancel()
        scheduler.stop()
        if self.sharing and self.pending:  # the scheduler thread is gone: nobody else touches them
            try:
                ray.get(self.memory.push.remote(self.id, self.fingerprint, self.pending), timeout=10)
            except Exception as e:
                log.warning("replica %s could not push its last answers: %r", self.id, e)


class Front:
    """The Serve ingress: a raw ASGI app that hands each request to an Engine replica."""

    def __init__(self, engines, config: ScaleConfig):
        self.engines, self.config = engines, config
        self.memory = ray.get_actor(MEMORY_NAME, namespace=NAMESPACE)

    def __serve_build_asgi_app__(self):
        return _ASGI(self.asgi)

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body, more = body + message.get("body", b""), message.get("more_body", False)
        headers = list(scope["headers"])
        given = next((v.decode("latin-1") for k, v in headers if k.lower() == AFFINITY_HEADER), None)
        request = Forwarded(scope["method"], scope["path"], scope.get("query_string", b""), headers, body,
                            affinity_key(body) if given is None else f"header:{given}")
        if scope["path"] == "/health":
            return await self._health(request, send)
        await self._forward(request, send)

    async def _first(self, request: Forwarded):
        """The reply's start and first body piece, from a replica that lived to send them:
        a replica that dies before is replaced by another (Serve routes around it)."""
        deadline, attempt = time.monotonic() + self.config.retry_for, 0
        while True:
            reply = self.engines.options(stream=True).handle.remote(request)
            head = []
            try:
                async for item in reply:
                    head.append(item)
                    if item[0] == "body":
                        break
                return head, reply
            except _REPLICA_GONE as e:
                attempt += 1
                if time.monotonic() > deadline:
                    raise
                log.warning("a replica failed before answering (%r); trying again (%d)", e, attempt)
                await asyncio.sleep(min(0.1 * 2 ** attempt, 2.0))

    async def _forward(self, request: Forwarded, send) -> None:
        try:
            head, reply = await self._first(request)
        except _REPLICA_GONE as e:
            return await _json(send, 503, {"error": {"message": f"no replica could answer: {e}", "type": "server_error",
                                                     "param": None, "code": None}})
        start = next((item for item in head if item[0] == "start"), None)
        if start is None:
            return await _json(send, 502, {"error": {"message": "the replica sent no response", "type": "server_error",
                                                     "param": None, "code": None}})
        await send({"type": "http.response.start", "status": start[1], "headers": start[2]})
        for item in head:
            if item[0] == "body":
                await send({"type": "http.response.body", "body": item[1], "more_body": True})
        event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start[2])
        try:
            async for item in reply:
                await send({"type": "http.response.body", "body": item[1], "more_body": True})
        except _REPLICA_GONE as e:  # the stream started: it cannot be replayed elsewhere, so it says so
            log.warning("a replica died mid-stream: %r", e)
            if event_stream:
                error = {"error": {"message": "the replica serving this stream failed; the answer is incomplete",
                                   "type": "server_error", "param": None, "code": "replica_failed"}}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(),
                            "more_body": True})
        except asyncio.CancelledError:
            reply.cancel()
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _health(self, request: Forwarded, send) -> None:
        """A replica's own health, plus how many replicas run and the shared memory's state."""
        try:
            head, reply = await asyncio.wait_for(self._first(request), 30)
            async for item in reply:  # to its end: an unfinished reply counts as a request in the replica's queue
                head.append(item)
            status = next(item[1] for item in head if item[0] == "start")
            body = json.loads(b"".join(item[1] for item in head if item[0] == "body") or b"{}")
        except Exception as e:
            status, body = 503, {"error": {"message": f"no replica answers: {e!r}", "type": "server_error",
                                           "param": None, "code": None}}
        try:
            body["shared_memory"] = await asyncio.wait_for(self.memory.stats.remote(), 10)
        except Exception as e:
            status, body["shared_memory"] = 503, {"error": repr(e)}
        body["replicas"] = await asyncio.to_thread(_replica_states, self.config.app_name)
        await _json(send, status, body)


class _ASGI:
    """An ASGI 3 app of a coroutine function (uvicorn takes a bound method for ASGI 2)."""

    def __init__(self, handler):
        self.handler = handler

    async def __call__(self, scope, receive, send) -> None:
        await self.handler(scope, receive, send)


async def _json(send, status: int, body: dict) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode(), "more_body": False})


def _replica_states(app_name: str) -> dict:
    """The Engine deployment's replicas by state, as Serve's controller reports them."""
    try:
        deployment = serve.status().applications[app_name].deployments["Engine"]
        return {"target": deployment.target_num_replicas if hasattr(deployment, "target_num_replicas") else None,
                **{str(state): n for state, n in deployment.replica_states.items()}}
    except Exception as e:  # the controller is busy or away: health still answers
        return {"error": repr(e)}


_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


# --- starting it ---

def start(config: ScaleConfig, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None):
    """Start (or join, `ray_address`) Ray, the shared memory and the application; returns
    the shared memory's actor handle. `stop` ends them."""
    if not ray.is_initialized():
        ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False)
    drafter = config.engine
    memory = ray.remote(SharedMemory).options(name=MEMORY_NAME, namespace=NAMESPACE, num_cpus=0,
                                              max_restarts=-1).remote(
        config.trie, config.max_nodes, 2, drafter.get("branch_length", 12), config.save_interval,
        rebuild_interval=config.sync_interval / 2)
    ray.get(memory.stats.remote(), timeout=60)
    serve.start(http_options={"host": host, "port": port})
    extra = config.server.get("max_batch", 32) + config.server.get("max_queue", 64)
    engines = serve.deployment(Engine, name="Engine", num_replicas=config.replicas,
                               ray_actor_options={"num_cpus": config.cpus_per_replica},
                               max_ongoing_requests=extra + 4, health_check_period_s=5,
                               graceful_shutdown_timeout_s=20,
                               request_router_config=RequestRouterConfig(
                                   request_router_class=PrefixAffinityRouter,
                                   request_router_kwargs={"imbalance": config.imbalance}))
    front = serve.deployment(serve.ingress()(Front), name="Front", num_replicas=1,
                             ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    serve.run(front.bind(engines.bind(config), config), name=config.app_name, route_prefix="/",
              blocking=False)
    return memory


def stop(memory, app_name: str = "triespec") -> None:
    """Delete the application (replicas push their last batches), save the shared memory."""
    try:
        serve.delete(app_name)
    finally:
        try:
            ray.get(memory.save.remote(), timeout=120)
        finally:
            ray.kill(memory)
