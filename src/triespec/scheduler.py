"""One thread that owns the engine's batch: requests join and leave between steps.

Every request is a row of one `Batch`, so concurrent requests share each forward pass
and the drafter's memory trie (which only this thread touches). Callers hand in a row
and a `deliver(tokens, finish)` callback, called on this thread after every step that
gave the row tokens (`finish` is None until the last call, then "stop"/"length"), or
`deliver(None, message)` if the row failed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Callable

from .engine import Engine, Batch, BatchRow

log = logging.getLogger("triespec.scheduler")

Deliver = Callable[[list[int] | None, str | None], None]


class QueueFull(Exception):
    pass


class Ticket:
    def __init__(self, row: BatchRow, deliver: Deliver):
        self.row, self.deliver = row, deliver
        self.cancelled = False


class Scheduler:
    """max_batch: most rows per forward; max_queue: most requests waiting to join
    (`submit` raises QueueFull beyond it). `on_step(step, seconds)` sees every step."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 64,
                 on_step: Callable[[list[tuple[BatchRow, list[int]]], float], None] | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.engine, self.max_batch, self.max_queue, self.on_step = engine, max_batch, max_queue, on_step
        self.batch = Batch(engine)
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.tickets: dict[int, Ticket] = {}  # id(row) -> ticket, for the rows in the batch
        self._calls: list[tuple[Callable, concurrent.futures.Future]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="triespec-scheduler", daemon=True)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.batch)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, fail every open request, and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, row: BatchRow, deliver: Deliver) -> Ticket:
        ticket = Ticket(row, deliver)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = max(self.max_batch - len(self.batch), 0)  # these join at the next step
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again later")
            self.waiting.append(ticket)
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request's row leaves at the next step (or never joins)."""
        ticket.cancelled = True
        ticket.row.cancelled = True  # a flag the batch reads between steps
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run `fn()` on the scheduler thread between two steps (e.g. to save the trie)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if not self._thread.is_alive():
                future.set_exception(RuntimeError("the scheduler is not running"))
                return future
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def _loop(self) -> None:
        while True:
            # 1. wait for work; take calls and the requests that fit
            with self._wake:
                while not (self._stopping or self.waiting or len(self.batch) or self._calls):
                    self._wake.wait()
                if self._stopping:
                    break
                calls, self._calls = self._calls, []
                joining = []
                while self.waiting and len(self.batch) + len(joining) < self.max_batch:
                    ticket = self.waiting.popleft()
                    if not ticket.cancelled:
                        joining.append(ticket)
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as e:  # the caller sees it through the future
                    future.set_exception(e)
            for ticket in joining:
                self.batch.add(ticket.row)
                self.tickets[id(ticket.row)] = ticket
            # 2. one step for everyone in the batch
            t0 = time.perf_counter()
            try:
                step = self.batch.step()
            except Exception as e:
                log.exception("a batch step failed; its requests fail, the server goes on")
                self._fail_all(f"generation failed: {e}")
                continue
            # 3. hand each row its tokens
            for row, new in step:
                ticket = self.tickets[id(row)]
                if row.finish is not None:
                    del self.tickets[id(row)]
                if not ticket.cancelled:
                    self._deliver(ticket, new, row.finish)
            for key in [k for k, t in self.tickets.items() if t.row not in self.batch.active]:
                del self.tickets[key]  # cancelled rows that left
            if self.on_step is not None and step:
                try:
                    self.on_step(step, time.perf_counter() - t0)
                except Exception:
                    log.exception("on_step failed")
        self._fail_all("the server is shutting down")
        for fn, future in self._calls:
            future.set_exception(RuntimeError("the scheduler stopped"))

    def _fail_all(self, message: str) -> None:
        with self._wake:
            tickets = list(self.tickets.values()) + list(self.waiting)
            self.waiting.clear()
        self.tickets.clear()
        for row in self.batch.active:
            row.end()
        self.batch = Batch(self.engine)
        for ticket in tickets:
            if not ticket.cancelled:
                self._deliver(ticket, None, message)

    def _deliver(self, ticket: Ticket, new, finish) -> None:
        try:
            ticket.deliver(new, finish)
        except Exception:  # e.g. the caller's event loop is gone: drop the request, keep serving
            log.exception("could not hand a request its tokens; it is cancelled")
            self.cancel(ticket)
