"""What sharing the memory gives across replicas: `triespec serve --replicas 2`, shared
and not shared.

Starts the command twice on this machine (a local Ray; 0.5 CPU per replica by default),
the second time with a sync interval longer than the run, so the replicas never share.
Each run asks every question on replica A (routed there by the `x-triespec-affinity`
header), waits two sync intervals, then asks on replica B the same questions
(*repeated*) and the same questions after another system prompt (*similar*: a new
prompt, the answer A gave nearly). Tokens per forward = completion_tokens /
usage.forward_steps, summed over the questions. Prints a table and JSON with the shared
memory's size and snapshot bytes.

    python scripts/scale_out.py --tokens 64
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
]
SYSTEMS = ("You are a helpful assistant.", "You are a patient teacher who answers clearly.")


def run(shared: bool, tokens: int, cpus: float, sync: float, log) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    trie = os.path.join(tempfile.mkdtemp(prefix="scale-out-"), "trie.npz")
    command = [sys.executable, "-m", "triespec.cli", "serve", "--replicas", "2", "--cpus-per-replica", str(cpus),
               "--port", str(port), "--model-name", "m", "--trie", trie,
               "--sync-interval", str(sync if shared else 1e6)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            assert server.poll() is None, "the command exited; see its log"
            assert time.monotonic() - t0 < 600, "not up in 600 s"
            try:
                health = httpx.get(f"{url}/health", timeout=30).json()
                if health.get("replicas", {}).get("RUNNING") == 2 and len(health["shared_memory"]["replicas_seen"]) == 2:
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(1)
        up = time.monotonic() - t0
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

        def phase(replica, system):
            made = [ask(replica, system, q) for q in QUESTIONS]
            return sum(m[0] for m in made) / sum(m[1] for m in made)

        figures = {"cold on A": phase(ids[0], SYSTEMS[0])}
        time.sleep(2.5 * sync)
        figures["repeated on B"] = phase(ids[1], SYSTEMS[0])
        figures["similar on B"] = phase(ids[1], SYSTEMS[1])
        memory = httpx.get(f"{url}/health", timeout=30).json()["shared_memory"]
        return {"shared": shared, "startup_s": round(up, 1), "tokens_per_forward": figures,
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
    parser.add_argument("--log", default="scale_out.log", help="the commands' output")
    args = parser.parse_args()
    with open(args.log, "w") as log:
        results = [run(shared, args.tokens, args.cpus_per_replica, args.sync_interval, log) for shared in (True, False)]
    print("| tokens per forward | shared memory | not shared |\n|---|---:|---:|")
    for phase in results[0]["tokens_per_forward"]:
        print(f"| {phase} | {results[0]['tokens_per_forward'][phase]:.2f} | "
              f"{results[1]['tokens_per_forward'][phase]:.2f} |")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
