"""What sharing the memory gives across replicas: `triespec serve --replicas 2`, shared
and not shared.

Starts the command twice (a local Ray each time, or a running cluster's with
`-- --ray-address ADDR`; 0.5 CPU per replica by default), the second time with a sync
interval longer than the run, so the replicas never share. Each run asks all 8 questions
on replica A (routed there by the `x-triespec-affinity` header), waits two sync
intervals, then asks on replica B the first 4 again (*repeated*) and the other 4 after
another system prompt (*similar*: a new prompt, perhaps nearly the answer A gave).
Tokens per forward = completion_tokens / usage.forward_steps, summed over the questions.
Prints a table and JSON with the per-question counts and the shared memory's size and
snapshot bytes.

    python scripts/scale_out.py
    python scripts/scale_out.py --port 44515 -- --ray-address 127.0.0.1:6379 --no-adaptive
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai

from triespec.scale import rendezvous

QUESTIONS = [
    "Explain how a steam engine works, step by step.", "List the planets of the solar system with one fact each.",
    "Write a short story about a lighthouse keeper.", "Describe the water cycle for a ten-year-old.",
    "Give five tips for learning a new language.", "Explain what a binary search tree is.",
    "Summarize the causes of the French Revolution.", "How do vaccines train the immune system?",
]
HALF = len(QUESTIONS) // 2  # B asks the first half again (repeated), the second after another system prompt (similar)
SYSTEMS = ("You are a helpful assistant.", "You are a patient teacher who answers clearly.")


def start(command: list[str], url: str, log, attempts: int = 3):
    """The command, up with both replicas; (process, seconds to come up, /health). A
    local Ray that does not come up in Ray's own 30 s (a busy machine) ends the
    command: it is started again, `attempts` times in all."""
    # Ray's workers start elsewhere: this checkout's modules by absolute paths, as the tests do
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p),
           "RAY_USAGE_STATS_ENABLED": "0"}
    for attempt in range(1, attempts + 1):
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while server.poll() is None:
            assert time.monotonic() - t0 < 900, "not up in 900 s"
            try:
                health = httpx.get(f"{url}/health", timeout=30).json()
                if health.get("replicas", {}).get("RUNNING") == 2 and len(health["shared_memory"]["replicas_seen"]) == 2:
                    return server, time.monotonic() - t0, health
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(1)
        print(f"the command exited before it was up (attempt {attempt}); see {log.name}", file=sys.stderr)
    raise AssertionError(f"the command did not come up in {attempts} attempts; see {log.name}")


def run(shared: bool, tokens: int, cpus: float, sync: float, extra: list[str], port: int, log) -> dict:
    url = f"http://127.0.0.1:{port}"
    trie = os.path.join(tempfile.mkdtemp(prefix="scale-out-"), "trie.npz")
    command = [sys.executable, "-m", "triespec.cli", "serve", "--replicas", "2", "--cpus-per-replica", str(cpus),
               "--port", str(port), "--model-name", "m", "--trie", trie,
               "--sync-interval", str(sync if shared else 1e6), *extra]
    server, up, health = start(command, url, log)
    try:
        ids = sorted(health["shared_memory"]["replicas_seen"])
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

        def key_for(replica, prefix):
            return next(f"{prefix}{i}" for i in range(10_000)
                        if min(ids, key=lambda r: rendezvous(f"header:{prefix}{i}", r)) == replica)

        def ask(replica, system, question):
            raw = client.chat.completions.with_raw_response.create(
                model="m", max_tokens=tokens, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                extra_headers={"x-triespec-affinity": key_for(replica, question)})
            assert raw.headers["x-triespec-replica"] == replica, "routed elsewhere"
            usage = raw.parse().usage
            return usage.completion_tokens, usage.forward_steps

        counts = {}  # phase -> [(completion tokens, forward steps)] by question

        def phase(replica, system, questions):
            made = [ask(replica, system, q) for q in questions]
            counts[len(counts)] = made
            return sum(m[0] for m in made) / sum(m[1] for m in made)

        figures = {"cold on A": phase(ids[0], SYSTEMS[0], QUESTIONS)}
        time.sleep(2.5 * sync)
        # disjoint halves, so that what B answers in one phase does not help it in the other
        figures["repeated on B"] = phase(ids[1], SYSTEMS[0], QUESTIONS[:HALF])
        figures["similar on B"] = phase(ids[1], SYSTEMS[1], QUESTIONS[HALF:])
        memory = httpx.get(f"{url}/health", timeout=30).json()["shared_memory"]
        return {"shared": shared, "command": command, "startup_s": round(up, 1), "tokens_per_forward": figures,
                "tokens_and_forwards": list(counts.values()),
                "memory_nodes": memory["nodes"], "snapshot_bytes": memory["snapshot_bytes"]}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cpus-per-replica", type=float, default=0.5)
    parser.add_argument("--sync-interval", type=float, default=1.0)
    parser.add_argument("--port", type=int, help="the app's port (default: a free one; joined to a cluster, the "
                                                  "port its Serve already listens on)")
    parser.add_argument("--log", default="scale_out.log", help="the commands' output")
    parser.add_argument("serve_args", nargs="*", help="more `triespec serve` options, after --, e.g. -- --no-adaptive")
    args = parser.parse_args()
    # one port for both runs: joined to a cluster (-- --ray-address ...), Serve's proxy keeps the first one's
    port = args.port
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    results = []
    with open(args.log, "w") as log:
        for shared in (True, False):
            results.append(run(shared, args.tokens, args.cpus_per_replica, args.sync_interval, args.serve_args, port,
                               log))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print("| tokens per forward | shared memory | not shared |\n|---|---:|---:|")
    for phase in results[0]["tokens_per_forward"]:
        print(f"| {phase} | {results[0]['tokens_per_forward'][phase]:.2f} | "
              f"{results[1]['tokens_per_forward'][phase]:.2f} |")
    print(json.dumps({"machine": machine(), "command": " ".join(results[0]["command"][2:]), "runs": results}, indent=1))


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    return f"{model}, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
