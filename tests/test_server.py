"""A real uvicorn server on 127.0.0.1, driven by the official `openai` client and raw HTTP."""

import asyncio
import re
import time

import httpx
import numpy as np
import openai
import pytest

from triespec import Engine, NoDraft
from triespec.server import create_app, serving

pytestmark = pytest.mark.slow
NAME = "smollm2"

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give one tip for learning to code.",
    "What do bees make?",
    "Why is the sky blue? Answer briefly.",
    "Say hello in Spanish.",
]


@pytest.fixture(scope="module")
def smol():
    from triespec.loading import default_model_path, load

    return load(default_model_path(), dtype="float32")


def engine_of(smol, **config):
    model, tokenizer = smol
    return Engine(model, tokenizer, **{"decoding_length": 16, "branch_length": 8, **config})


def chat(question):
    return [{"role": "user", "content": question}]


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_openai_client_plain_and_streamed(smol):
    ref = engine_of(smol)
    expected_chat = ref.generate(chat(QUESTIONS[0]), max_new_tokens=24)
    expected_text = ref.generate("The capital of France is", max_new_tokens=12)
    with serving(create_app(engine_of(smol), NAME)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == [NAME]
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}

        pieces, usage, finish = [], None, None
        for chunk in client.chat.completions.create(model=NAME, messages=chat(QUESTIONS[0]), max_tokens=24,
                                                   temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == expected_chat.text and finish == expected_chat.finish_reason
        assert usage.completion_tokens == len(expected_chat.token_ids)
        assert len([p for p in pieces if p]) > 1  # really streamed (cold: the trie has not seen this answer yet)

        r = client.chat.completions.create(model=NAME, messages=chat(QUESTIONS[0]), max_tokens=24, temperature=0)
        assert r.choices[0].message.content == expected_chat.text
        assert r.choices[0].finish_reason == expected_chat.finish_reason
        assert r.usage.completion_tokens == len(expected_chat.token_ids)
        assert r.usage.prompt_tokens == expected_chat.stats.prompt_tokens

        r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=12, temperature=0)
        assert r.choices[0].text == expected_text.text and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 12
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=NAME, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True) if c.choices)
        assert streamed == expected_text.text

        # a stop string cuts the text before it, streamed or not
        stop = expected_text.text.split()[1]
        cut = expected_text.text[: expected_text.text.index(stop)]
        r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=12, temperature=0,
                                      stop=[stop])
        assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=NAME, prompt="The capital of France is", max_tokens=12, temperature=0, stop=[stop], stream=True)
            if c.choices)
        assert streamed == cut

        # sampling with a seed is reproducible
        a, b = (client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0.9,
                                          top_p=0.9, seed=5).choices[0].text for _ in range(2))
        assert a == b
        assert metric(url, "triespec_generated_tokens_total") > 60


def test_32_concurrent_streaming_clients(smol):
    """Every response complete and identical to its single-request greedy output."""
    tokens = 16
    ref = Engine(*smol, drafter=NoDraft())  # plain greedy decoding, one request at a time
    expected = {q: ref.generate(chat(q), max_new_tokens=tokens).text for q in QUESTIONS}
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(32)]

    async def one(client, question):
        text = []
        stream = await client.chat.completions.create(model=NAME, messages=chat(question), max_tokens=tokens,
                                                      temperature=0, stream=True)
        async for chunk in stream:
            text += [c.delta.content or "" for c in chunk.choices]
        return "".join(text)

    async def load(url):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, q) for q in jobs))

    with serving(create_app(engine_of(smol, decoding_length=4, branch_length=4), NAME, max_batch=32)) as url:
        t0 = time.perf_counter()
        answers = asyncio.run(load(url))
        seconds = time.perf_counter() - t0
        assert answers == [expected[q] for q in jobs]
        steps = metric(url, "triespec_step_batch_size_count")
        rows = metric(url, "triespec_step_batch_size_sum")
        assert rows / steps > 8  # the requests shared forward passes
        assert metric(url, 'triespec_requests_total{status="200"}') == 32
    print(f"\n32 streaming clients x {tokens} tokens: {seconds:.1f} s, {rows / steps:.1f} rows per forward")


def test_trie_survives_a_restart(smol, tmp_path):
    path = tmp_path / "trie.npz"

    def ask_all(url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        texts = [client.chat.completions.create(model=NAME, messages=chat(q), max_tokens=24, temperature=0)
                 .choices[0].message.content for q in QUESTIONS[:3]]
        return texts, metric(url, "triespec_tokens_per_step_sum") / metric(url, "triespec_tokens_per_step_count")

    with serving(create_app(engine_of(smol), NAME, trie_path=path)) as url:
        cold_texts, cold = ask_all(url)
    assert path.exists()
    engine = engine_of(smol)
    with serving(create_app(engine, NAME, trie_path=path)) as url:
        assert metric(url, "triespec_trie_nodes") > 100  # loaded before the first request
        warm_texts, warm = ask_all(url)
    assert warm_texts == cold_texts
    assert warm > 1.5 * cold, (cold, warm)


def test_corrupt_trie_file_is_set_aside_and_replaced(smol, tmp_path, caplog):
    path = tmp_path / "trie.npz"
    path.write_bytes(b"\x00garbage")
    corpus = tmp_path / "past.jsonl"
    corpus.write_text('{"prompt": "Hi", "completion": " Hello! How can I help you today?"}\n')
    app = create_app(engine_of(smol), NAME, trie_path=path, warm_from=corpus)
    assert "not a readable triespec trie" in caplog.text
    assert (tmp_path / "trie.npz.rejected").read_bytes() == b"\x00garbage"
    with serving(app) as url:
        assert metric(url, "triespec_trie_nodes") > 10  # empty, then warmed from the corpus
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200
    with np.load(path) as saved:  # a fresh, valid trie was saved at shutdown
        assert len(saved["token"]) > 0


def test_periodic_save(smol, tmp_path):
    path = tmp_path / "trie.npz"
    with serving(create_app(engine_of(smol), NAME, trie_path=path, save_interval=0.2)) as url:
        httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 4}, timeout=60)
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.exists()  # before shutdown
        assert metric(url, "triespec_trie_bytes") == path.stat().st_size


def test_bad_requests_get_openai_errors_and_the_server_goes_on(smol):
    engine = engine_of(smol)
    long_prompt = " ".join(["word"] * (engine.context_length + 10))
    with serving(create_app(engine, NAME, api_key="sesame")) as url:
        key = {"Authorization": "Bearer sesame"}

        def post(body, path="/v1/completions", headers=key, **kw):
            if body is not None:
                kw["json"] = body
            return httpx.post(f"{url}{path}", headers=headers, timeout=60, **kw)

        ok = {"model": NAME, "prompt": "Hello", "max_tokens": 3}
        cases = [
            (post(None, content=b"{not json", headers={**key, "content-type": "application/json"}), 400,
             "not valid JSON"),
            (post({**ok, "max_tokens": "three"}), 400, "max_tokens"),
            (post({**ok, "prompt": 42}), 400, "prompt"),
            (post({**ok, "temperature": "hot"}), 400, "temperature"),
            (post({**ok, "max_tokens": -1}), 400, "max_tokens"),
            (post({**ok, "n": 2}), 400, "n"),
            (post({"model": NAME}), 400, "prompt"),
            (post({**ok, "prompt": long_prompt}), 400, "context"),
            (post({**ok, "max_tokens": engine.context_length}), 400, "maximum context length"),
            (post({**ok, "prompt": [engine.vocab_size + 5]}), 400, "outside the vocabulary"),
            (post({**ok, "stop": [""]}), 400, "stop"),
            (post({**ok, "model": "gpt-4"}), 404, "gpt-4"),
            (post({**ok, "logprobs": 3}), 400, "not supported"),
            (post({"model": NAME, "messages": []}, path="/v1/chat/completions"), 400, "messages"),
            (post({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, path="/v1/chat/completions"),
             400, "role"),
            (post(ok, headers={}), 401, "API key"),
            (post(ok, headers={"Authorization": "Bearer wrong"}), 401, "API key"),
            (httpx.get(f"{url}/v1/models"), 401, "API key"),
            (httpx.get(f"{url}/v1/nothing", headers=key), 404, "Not Found"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, (words, response.text)
            error = response.json()["error"]
            assert words in error["message"] + str(error["param"]), (words, error)
            assert set(error) == {"message", "type", "param", "code"}
        assert cases[8][0].json()["error"]["code"] == "context_length_exceeded"

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame")
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="hi")
        # and the server keeps serving
        r = client.completions.create(model=NAME, prompt="Hello", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        assert httpx.get(f"{url}/health").status_code == 200


def test_full_queue_answers_429_and_a_gone_client_frees_its_row(smol):
    app = create_app(engine_of(smol), NAME, max_batch=1, max_queue=0)
    scheduler = app.state.scheduler
    with serving(app) as url:
        body = {"model": NAME, "prompt": "Count from one to one hundred:", "max_tokens": 400, "temperature": 0,
                "stream": True}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{url}/v1/completions", json=body) as first:
                lines = first.iter_lines()
                assert next(lines).startswith("data: ")  # it is generating
                assert scheduler.batch_size == 1
                busy = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=60)
                assert busy.status_code == 429
                assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            # the first client hung up mid-answer: its row leaves within a step or two
            deadline = time.monotonic() + 10
            while scheduler.batch_size and time.monotonic() < deadline:
                time.sleep(0.02)
            assert scheduler.batch_size == 0
            assert metric(url, "triespec_generated_tokens_total") < 400
        r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_warm_and_serve_commands(tmp_path, capsys):
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    corpus, trie = tmp_path / "corpus.jsonl", tmp_path / "trie.npz"
    corpus.write_text(json.dumps({"prompt": "Hello", "completion": " there, how are you today?"}) + "\n")
    from triespec.cli import main

    assert main(["warm", str(corpus), "--trie", str(trie)]) == 0
    assert "learned 1 answers" in capsys.readouterr().err and trie.exists()
    assert main(["warm", str(tmp_path / "missing.jsonl"), "--trie", str(trie)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    before = trie.stat().st_mtime_ns

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "triespec.cli", "serve", "--port", str(port), "--trie", str(trie),
                               "--api-key", "k", "--model-name", NAME], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # a start on a loaded 2-core machine took 123 s
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert metric(url, "triespec_trie_nodes") > 10  # the warmed trie was loaded
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k")
        assert client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0).usage.total_tokens
    finally:
        server.send_signal(signal.SIGINT)
        err = server.communicate(timeout=60)[1]
    assert server.returncode == 0, err
    assert trie.stat().st_mtime_ns > before  # saved at shutdown


def test_serve_options_build_the_engine_they_say():
    from triespec.cli import _serving_engine, build_parser
    from triespec.loading import default_model_path

    path = default_model_path()
    plain = _serving_engine(build_parser().parse_args(["serve", "--no-draft"]), path)
    assert isinstance(plain.drafter, NoDraft) and plain.budget is None
    fixed = _serving_engine(build_parser().parse_args(["serve", "--no-adaptive", "--decoding-length", "8"]), path)
    assert fixed.budget is None and fixed.drafter.decoding_length == 8
    adaptive = _serving_engine(build_parser().parse_args(["serve"]), path)
    assert adaptive.budget is not None and adaptive.drafter.decoding_length == 32
