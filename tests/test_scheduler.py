"""The scheduler thread: requests join its batch as they come, fail cleanly, and queue within bounds."""

import threading

import pytest

from conftest import plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine
from triespec.scheduler import QueueFull, Scheduler


class Collector:
    def __init__(self):
        self.tokens, self.finish, self.error = [], None, None
        self.done = threading.Event()

    def __call__(self, new, finish):
        if new is None:
            self.error = finish
            self.done.set()
            return
        self.tokens += new
        if finish is not None:
            self.finish = finish
            self.done.set()


def test_requests_submitted_while_running_get_their_plain_greedy_output():
    model = tiny_model("gemma3")
    engine = Engine(model, adaptive=False, decoding_length=8, branch_length=4)
    prompts = [repetitive_prompt(s, 10 + 7 * s) for s in range(6)]
    scheduler = Scheduler(engine, max_batch=4, max_queue=8)
    scheduler.start()
    try:
        results = []
        for p in prompts:  # arrive one after another, while earlier ones are decoding
            results.append(Collector())
            scheduler.submit(engine.row(p, 25), results[-1])
        for r in results:
            assert r.done.wait(60)
        assert [r.tokens for r in results] == [plain_greedy(model, p, 25) for p in prompts]
        assert all(r.finish == "length" for r in results)
    finally:
        scheduler.stop()
    assert not scheduler.alive()


def test_a_failing_step_fails_its_requests_and_the_scheduler_goes_on(monkeypatch):
    model = tiny_model("llama")
    engine = Engine(model, adaptive=False, decoding_length=8)
    real, calls = engine.forward, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(engine, "forward", flaky)
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        first = Collector()
        scheduler.submit(engine.row([5, 6, 7], 20), first)
        assert first.done.wait(60) and "out of memory" in first.error
        again = Collector()
        scheduler.submit(engine.row([5, 6, 7], 20), again)
        assert again.done.wait(60) and again.error is None
        assert again.tokens == plain_greedy(model, [5, 6, 7], 20)
    finally:
        scheduler.stop()


def test_queue_bound_and_cancel():
    engine = Engine(tiny_model("llama"))
    scheduler = Scheduler(engine, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    first, second = Collector(), Collector()
    t1 = scheduler.submit(engine.row([1, 2], 5), first)  # would join at the next step
    scheduler.submit(engine.row([1, 2], 5), second)  # waits in the queue
    with pytest.raises(QueueFull):
        scheduler.submit(engine.row([1, 2], 5), Collector())
    scheduler.cancel(t1)
    scheduler.start()
    try:
        assert second.done.wait(60) and second.tokens == plain_greedy(engine.model, [1, 2], 5)
        assert not first.done.is_set() and first.tokens == []  # cancelled before it joined
    finally:
        scheduler.stop()
    with pytest.raises(QueueFull, match="shutting down"):
        scheduler.submit(engine.row([1, 2], 5), Collector())
    with pytest.raises(ValueError):
        Scheduler(engine, max_batch=0)
