"""Scale-out on Ray Serve (scale.py): the shared memory on its own, then `triespec serve
--replicas 2` as a user starts it (a local Ray of this machine's 2 CPUs, 0.5 CPU per
replica), driven by the official `openai` client on 127.0.0.1, with replicas killed."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest

from triespec import Engine, NoDraft, scale
from triespec.budget import Budget, Calibration, CostModel
from triespec.drafters import TrieDrafter
from triespec.persist import unflatten
from triespec.scale import AFFINITY_CHARS, Forwarded, PrefixAffinityRouter, ScaleConfig, SharedMemory, affinity_key, \
    rendezvous

NAME = "smollm2"
FP = "vocab=49152:sha256=test"


def answers(n, seed=0, length=40):
    rng = np.random.default_rng(seed)
    return [([1, 2], rng.integers(0, 500, length).tolist()) for _ in range(n)]


# --- the shared memory, without Ray ---

def test_shared_memory_merges_stays_bounded_and_snapshots_round_trip():
    memory = SharedMemory(max_nodes=2000, branch_length=8)
    versions = [memory.push("a", FP, answers(1, seed))
                for seed in range(200)]  # 200 x 40 random tokens: far over the budget
    assert len(set(versions)) == 200  # each batch is a new version
    assert 0 < len(memory.drafter.memory) <= 2000
    memory.drafter.memory.check()
    version, arrays, calibration = memory.snapshot()
    assert calibration is None and all(a.dtype == np.int32 for a in arrays)
    assert memory.snapshot(version) is None  # nothing new for a replica that has it
    copy = unflatten(arrays, 2000)
    copy.check()
    assert len(copy) == len(memory.drafter.memory)
    assert copy.find(answers(1, 199)[0][1][:3]) is not None  # a trace of the latest answer
    stats = memory.stats()
    assert stats["nodes"] == len(copy) and stats["answers"] == 200 and stats["snapshot_bytes"] == 12 * len(copy)


def test_many_replicas_pushing_make_one_snapshot_per_rebuild_interval(monkeypatch):
    """Every push is a new version; replicas pulling within rebuild_interval of the last
    snapshot get that one, so busy replicas cannot have the memory flatten its trie once
    per replica per sync interval. The newer answers come at a later pull."""
    clock = [100.0]
    monkeypatch.setattr(scale.time, "monotonic", lambda: clock[0])
    memory = SharedMemory(max_nodes=10_000, rebuild_interval=1.0)
    made = []
    real = scale.flatten
    monkeypatch.setattr(scale, "flatten", lambda trie: made.append(clock[0]) or real(trie))
    first = memory.push("a", FP, answers(1, 0))
    assert memory.snapshot()[0] == first and len(made) == 1
    for replica, seed in (("b", 1), ("c", 2), ("d", 3)):  # three more replicas push, then pull
        memory.push(replica, FP, answers(1, seed))
        assert memory.snapshot()[0] == first  # the snapshot made last
        assert memory.snapshot(first) is None  # a replica that has it gets nothing yet
    assert len(made) == 1
    clock[0] += 1.0
    newest = memory.snapshot(first)
    assert newest[0] == memory.version != first and len(made) == 2  # all four replicas' answers in one
    copy = unflatten(newest[1], 10_000)
    assert all(copy.find(answers(1, seed)[0][1][:3]) is not None for seed in range(4))


def test_shared_memory_checks_tokenizers_averages_calibrations_and_persists(tmp_path):
    path = tmp_path / "trie.npz"
    memory = SharedMemory(str(path), max_nodes=10_000)
    memory.push("a", FP, answers(3), calibration=np.zeros(4))
    memory.push("b", FP, [], calibration=np.ones(4))
    assert memory.calibration().tolist() == [0.5] * 4  # replicas' calibrations, cell by cell
    with pytest.raises(ValueError, match="another tokenizer"):
        memory.push("c", "vocab=1:sha256=other", answers(1))
    assert memory.save() == path.stat().st_size
    restarted = SharedMemory(str(path), max_nodes=10_000)
    restarted.push("a2", FP, [])  # the first replica's tokenizer opens the file
    assert len(restarted.drafter.memory) == len(memory.drafter.memory)
    assert restarted.calibration().tolist() == [0.5] * 4
    assert restarted.snapshot()[0] != memory.snapshot()[0]  # another incarnation, another version
    foreign = SharedMemory(str(path))
    foreign.push("x", "vocab=1:sha256=other", [])  # a file of another tokenizer is set aside
    assert len(foreign.drafter.memory) == 0 and (tmp_path / "trie.npz.rejected").exists() and not path.exists()


def test_affinity_key_and_rendezvous():
    system = {"role": "system", "content": "You answer questions about the attached report. " * 3}
    first = json.dumps({"model": NAME, "messages": [system, {"role": "user", "content": "Who wrote it?"}]}).encode()
    second = json.dumps({"model": NAME, "messages": [system, {"role": "user", "content": "When?"}]}).encode()
    assert affinity_key(first).startswith("system:You answer") and affinity_key(first) != affinity_key(second)
    long = json.dumps({"model": NAME, "prompt": "x" * 2000}).encode()
    assert len(affinity_key(long)) == AFFINITY_CHARS
    assert affinity_key(long) == affinity_key(json.dumps({"model": NAME, "prompt": "x" * 3000}).encode())
    assert affinity_key(b"{not json") == "" and affinity_key(b"[1]") == ""
    # each key has one replica; removing another replica does not move it
    replicas = [f"r{i}" for i in range(4)]
    owner = {k: min(replicas, key=lambda r: rendezvous(k, r)) for k in map(str, range(200))}
    assert len(set(owner.values())) == 4
    for key, r in owner.items():
        if r != "r3":
            assert min(replicas[:3], key=lambda x: rendezvous(key, x)) == r


def replica_shell(max_nodes=10_000):
    """scale.Engine's side of a sync (`_take` before a push, `_install` after a pull) without
    Ray or a model: an engine reduced to an adaptive budget and a trie drafter."""
    shell = object.__new__(scale.Engine)
    shell.engine = types.SimpleNamespace(budget=Budget(CostModel([1, 16], [0.01, 0.02])))
    shell.drafter = TrieDrafter(max_nodes=max_nodes)
    shell.pending = []
    return shell


def test_a_replicas_answers_and_calibration_reach_another_through_the_shared_memory():
    a, b, memory = replica_shell(), replica_shell(), SharedMemory(max_nodes=10_000)
    calibration = a.engine.budget.calibration
    for score in (0.1, 0.1, 0.3, 0.3, 0.5, 0.5):  # replica A learned that its unlikely-looking edges are right
        calibration.observe(score, True)
    answer = list(range(100, 140))
    a.pending.append(([1, 2], answer))
    batch, state = a._take()
    assert a.pending == [] and batch == [([1, 2], answer)]
    memory.push("a", FP, batch, state)
    b.pending.append(([7, 8], [300, 301, 302, 303]))  # B's own answer, finished after its last push
    version, arrays, shared = memory.snapshot()
    b._install(unflatten(arrays, 10_000), shared)
    assert b.engine.budget.calibration.state().tolist() == calibration.state().tolist() != Calibration().state().tolist()
    assert b.drafter.memory.find(answer[:3]) is not None  # A's answer, drafted on B
    assert b.drafter.memory.find([300, 301, 302]) is not None  # and B's unsent one is kept
    # a calibration of another shape (another release's) is left out with a warning, not installed
    b._install(unflatten(arrays, 10_000), np.ones(5))
    assert b.engine.budget.calibration.state().tolist() == calibration.state().tolist()


def fake_router(replicas=3, imbalance=4, patience=2):
    """PrefixAffinityRouter's choice, without Ray: replicas are their ids, queue lengths set by hand."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    deployment = DeploymentID(name="Engine", app_name="test")
    router = PrefixAffinityRouter(deployment, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(imbalance=imbalance, patience=patience)
    return router, [types.SimpleNamespace(replica_id=ReplicaID(f"r{i}", deployment)) for i in range(replicas)]


def test_affinity_router_keeps_a_prefix_on_its_replica_until_its_queue_is_too_long():
    router, candidates = fake_router()
    key = "system:You answer questions about the attached report."
    owner, *others = sorted(candidates, key=lambda r: rendezvous(key, r.replica_id.unique_id))

    def choose(request_id, key=key, queues=(0, 0, 0)):
        for replica, n in zip([owner, *others], queues):  # the owner's queue first
            router.replica_queue_len_cache.update(replica.replica_id, n)
        request = types.SimpleNamespace(args=(Forwarded("POST", "/v1/chat/completions", b"", [], b"{}", key),),
                                        metadata=types.SimpleNamespace(internal_request_id=request_id))
        return asyncio.run(router.choose_replicas(candidates, request))

    assert choose("q1") == [[owner]]  # idle: the prefix's replica alone
    assert choose("q2", queues=(5, 1, 2)) == [[owner]]  # 4 more than the least busy: still its own
    assert choose("q3", queues=(6, 1, 2)) == [[others[0], others[1], owner]]  # 5 more: balanced, least busy first
    assert choose("q4", queues=(6, 2, 1)) == [[others[1], others[0], owner]]
    # a request its replica did not take in `patience` rounds may go elsewhere, its replica still first
    assert choose("q5") == choose("q5") == [[owner]]
    assert choose("q5") == [[owner], others]
    assert choose("q6", key="", queues=(3, 0, 1)) == [[others[0], others[1]], [owner]]  # no key: by load
    router.on_request_routed(types.SimpleNamespace(metadata=types.SimpleNamespace(internal_request_id="q5")),
                             owner.replica_id, None)
    assert "q5" not in router.rounds


def test_scale_config_refuses_bad_values():
    with pytest.raises(ValueError, match="replicas"):
        ScaleConfig(0, {}, {})
    with pytest.raises(ValueError, match="sync_interval"):
        ScaleConfig(2, {}, {}, sync_interval=0)
    with pytest.raises(ValueError, match="cpus_per_replica"):
        ScaleConfig(2, {}, {}, cpus_per_replica=-1)


def test_serve_without_replicas_does_not_import_ray_and_bad_options_are_refused(capsys):
    code = ("import sys; from triespec import cli; p = cli.build_parser().parse_args(['serve']); "
            "assert p.replicas is None; import triespec.server; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert out.stdout.strip() == "False", out.stderr
    from triespec.cli import main

    assert main(["serve", "--replicas", "2", "--warm-from", __file__]) == 2
    assert "triespec warm" in capsys.readouterr().err
    assert main(["serve", "--ray-address", "127.0.0.1:6379"]) == 2
    assert "--ray-address needs --replicas" in capsys.readouterr().err


# --- `triespec serve --replicas 2` ---

QUESTION = [{"role": "user", "content": "Name three primary colors and say why they are called primary."}]


@pytest.fixture(scope="module")
def smol():
    from triespec.loading import default_model_path, load

    return load(default_model_path(), dtype="float32")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The command, up with two replicas; this process connected to its Ray. Ended with
    Ctrl-C (SIGINT) as a user ends it; the last test checks what that saved."""
    import ray

    folder = tmp_path_factory.mktemp("scale")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "triespec.cli", "serve", "--replicas", "2", "--cpus-per-replica", "0.5",
               "--port", str(port), "--model-name", NAME, "--trie", str(folder / "trie.npz"), "--sync-interval", "1",
               "--no-adaptive", "--decoding-length", "16", "--branch-length", "8", "--max-nodes", "20000"]
    log = open(folder / "serve.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for(url, lambda h: h["replicas"].get("RUNNING") == 2 and len(h["shared_memory"]["replicas_seen"])
                          == 2, server, folder / "serve.log", 400)
        for i in range(4):  # the front's router learns of both replicas with its first requests
            httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 1},
                       headers={"x-triespec-affinity": f"warm-up {i}"}, timeout=120).raise_for_status()
        ray.init(address="auto", namespace="triespec", log_to_driver=False)
        yield {"url": url, "server": server, "trie": folder / "trie.npz", "health": health, "log": folder / "serve.log"}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)  # the command's own process group
                server.wait(30)
        log.close()


def wait_for(url, ready, server=None, log=None, timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and server.poll() is not None:
            raise AssertionError(f"the command exited:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{url}/health", timeout=30)
            if r.status_code == 200 and ready(r.json()):
                return r.json()
        except (httpx.TransportError, KeyError, ValueError):
            pass
        assert time.monotonic() < deadline, f"not ready in {timeout} s" + (f":\n{log.read_text()[-3000:]}" if log else "")
        time.sleep(0.5)


def replicas(url) -> list[str]:
    return sorted(httpx.get(f"{url}/health", timeout=30).json()["shared_memory"]["replicas_seen"])


def key_for(replica: str, among: list[str], prefix: str) -> str:
    """An affinity header value that the router gives to `replica`."""
    return next(f"{prefix}{i}" for i in range(10_000)
                if min(among, key=lambda r: rendezvous(f"header:{prefix}{i}", r)) == replica)


def ask(url, key=None, **request):
    """A chat request through the openai client; returns (text, usage, replica)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=request.pop("messages", QUESTION), temperature=request.pop("temperature", 0),
        extra_headers={"x-triespec-affinity": key} if key else None, **request)
    r = raw.parse()
    return r.choices[0].message.content, r.usage, raw.headers["x-triespec-replica"]


@pytest.mark.slow
def test_replicas_answer_as_one_process(cluster, smol):
    url = cluster["url"]
    plain = Engine(*smol, drafter=NoDraft())
    expected = plain.generate(QUESTION, max_new_tokens=40)
    text, usage, _ = ask(url, max_tokens=40)
    assert text == expected.text and usage.completion_tokens == len(expected.token_ids)
    assert usage.forward_steps >= 1  # the extra usage field, as any client reads it

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=40, temperature=0, stream=True) if c.choices)
    assert streamed == expected.text
    r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.choices[0].text == plain.generate("The capital of France is", max_new_tokens=12).text

    ids = replicas(url)
    a, b = key_for(ids[0], ids, "a"), key_for(ids[1], ids, "b")
    # the same key stays on one replica; a seeded sample is the same on either
    seeded = [ask(url, key, max_tokens=12, temperature=0.9, seed=7, messages=[{"role": "user", "content": "Hi!"}])
              for key in (a, a, b)]
    assert [s[2] for s in seeded] == [ids[0], ids[0], ids[1]]
    assert seeded[0][0] == seeded[1][0] == seeded[2][0]

    # errors pass through as the one-process server makes them
    bad = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": 42}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    unknown = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "hi"}, timeout=60)
    assert unknown.status_code == 404 and "gpt-4" in unknown.json()["error"]["message"]
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["replicas"]["RUNNING"] == 2
    assert health["shared_memory"]["nodes"] > 0 and health["shared_memory"]["age_s"] >= 0


@pytest.mark.slow
def test_an_answer_from_replica_a_is_drafted_on_replica_b(cluster):
    url = cluster["url"]
    ids = replicas(url)
    question = [{"role": "user", "content": "List the planets of the solar system in order, with one fact each."}]
    on_a, on_b = key_for(ids[0], ids, "planets-a"), key_for(ids[1], ids, "planets-b")
    before = httpx.get(f"{url}/health", timeout=30).json()["shared_memory"]["version"]
    text_a, usage_a, replica = ask(url, on_a, messages=question, max_tokens=64)
    assert replica == ids[0]
    # one sync interval (1 s) for A to push, one for B to pull
    wait_for(url, lambda h: h["shared_memory"]["version"] != before, timeout=30)
    time.sleep(2.5)
    text_b, usage_b, replica = ask(url, on_b, messages=question, max_tokens=64)
    assert replica == ids[1] and text_b == text_a
    per_forward = (usage_a.completion_tokens / usage_a.forward_steps, usage_b.completion_tokens / usage_b.forward_steps)
    print(f"\ntokens per forward: replica A (cold) {per_forward[0]:.2f}, replica B (shared memory) {per_forward[1]:.2f}")
    assert per_forward[1] > 2 * per_forward[0], per_forward


def serve_actor(replica: str):
    import ray

    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(f"#{replica}"))
    return ray.get_actor(name, namespace="serve")


@pytest.mark.slow
def test_killed_replicas_are_restarted_and_lose_no_request_nor_the_memory(cluster, smol):
    import ray

    url = cluster["url"]
    ids = replicas(url)
    on_a, on_b = key_for(ids[0], ids, "long-a"), key_for(ids[1], ids, "long-b")
    count = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
    expected = Engine(*smol, drafter=NoDraft()).generate(count, max_new_tokens=120).text
    # 1. a non-streamed request whose replica dies midway is answered in full by the other
    learned = httpx.get(f"{url}/health", timeout=30).json()["shared_memory"]["answers"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(zip(("text", "usage", "replica"), ask(
        url, on_a, messages=count, max_tokens=120))))
    thread.start()
    time.sleep(2.0)  # it is generating on A
    ray.kill(serve_actor(ids[0]), no_restart=True)
    thread.join(180)
    assert not thread.is_alive() and result["text"] == expected and result["replica"] != ids[0]
    wait_for(url, lambda h: h["shared_memory"]["answers"] > learned, timeout=30)  # B pushed it
    # A's replacement is up: the key of the stream below must be B's among the replicas now
    health = wait_for(url, lambda h: h["replicas"].get("RUNNING") == 2
                      and len(set(h["shared_memory"]["replicas_seen"]) - set(ids)) == 1, timeout=300)
    [first] = set(health["shared_memory"]["replicas_seen"]) - set(ids)
    on_b = key_for(ids[1], sorted([ids[1], first]), "long-b")
    # 2. a stream whose replica dies ends with an error event, not silently
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    steam = [{"role": "user", "content": "Explain how a steam engine works, step by step."}]
    stream = client.chat.completions.create(model=NAME, messages=steam, max_tokens=200, temperature=0, stream=True,
                                            extra_headers={"x-triespec-affinity": on_b})
    pieces = []
    with pytest.raises(openai.APIError, match="replica"):
        for chunk in stream:
            pieces += [c.delta.content or "" for c in chunk.choices]
            if len(pieces) == 3:
                killed = stream.response.headers["x-triespec-replica"]
                ray.kill(serve_actor(killed), no_restart=True)
    assert len(pieces) >= 3 and killed == ids[1]  # both first replicas are gone now
    # 3. Serve restarts both; they start from the shared memory: the answers above, drafted at once
    health = wait_for(url, lambda h: h["replicas"].get("RUNNING") == 2
                      and len(set(h["shared_memory"]["replicas_seen"]) - set(ids)) == 2, timeout=300)
    fresh = sorted(set(health["shared_memory"]["replicas_seen"]) - set(ids))
    text, usage, replica = ask(url, key_for(fresh[0], fresh, "again"), messages=count, max_tokens=120)
    # either restarted replica will do (right after a restart the router may not know both yet:
    # affinity is best effort); each started from the shared memory
    assert replica in fresh and text == expected
    assert usage.completion_tokens / usage.forward_steps > 3, usage


@pytest.mark.slow
def test_ctrl_c_saves_the_shared_memory_and_stops_ray(cluster):
    import ray

    nodes = httpx.get(f"{cluster['url']}/health", timeout=30).json()["shared_memory"]["nodes"]
    ray.shutdown()
    server = cluster["server"]
    server.send_signal(signal.SIGINT)
    assert server.wait(120) == 0, cluster["log"].read_text()[-3000:]
    with np.load(cluster["trie"]) as saved:
        assert len(saved["token"]) == nodes > 100

    def left() -> list[str]:
        return [line for line in subprocess.run(["ps", "-eo", "pgid=,stat=,cmd="], capture_output=True,
                                                text=True).stdout.splitlines()
                if line.split()[0] == str(server.pid) and not line.split()[1].startswith("Z")]

    deadline = time.monotonic() + 30  # a worker of Ray's may still be on its way out when the command exits
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), left()  # Ray's processes, started by the command, ended with it (zombies are ended, unreaped)
