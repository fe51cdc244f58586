"""A/B of the device server's CPU per request: two labmesh source trees, alternating runs.

    git worktree add /tmp/before <commit>
    .venv/bin/python scripts/server_cpu_ab.py /tmp/before/services services --pairs 4

Each run serves a MemoryMeter (tests/support.py) with `DeviceServer(fixed_threading=True)` on
127.0.0.1 in a fresh process, drives it with 2 load-generator processes (raw DEALERs holding a
session, 4 queries in flight each, 60,000 queries in all) and prints the server process's CPU
time per query (getrusage: its Python work plus libzmq's I/O thread) and the rate. The two trees
take turns, so slow drifts of a shared machine fall on both. Every process it starts ends by
itself; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
QUERIES = 60_000
GENERATOR = r"""
import json, sys, zmq
address, n = sys.argv[1], int(sys.argv[2])
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.RCVTIMEO, 10000)
sock.connect(address)
sock.send(json.dumps({"type": "connect", "lease": 30, "id": 0}).encode())
token = json.loads(sock.recv())["result"]["session"]
bodies = [json.dumps({"type": "query", "param": "POWER", "timeout": 5.0, "id": i,
                      "session": token}).encode() for i in range(n)]
in_flight = sent = got = 0
while got < n:
    while in_flight < 4 and sent < n:
        sock.send(bodies[sent]); sent += 1; in_flight += 1
    sock.recv(); got += 1; in_flight -= 1
"""
SERVER = r"""
import resource, subprocess, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from labmesh.server import DeviceServer
from support import MemoryMeter
n, generator = int(sys.argv[3]), sys.argv[4]
server = DeviceServer(MemoryMeter(), fixed_threading=True, address="tcp://127.0.0.1:0").start()
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
c0, t0 = cpu(), time.perf_counter()
gens = [subprocess.Popen([sys.executable, "-c", generator, server.address, str(n // 2)])
        for _ in range(2)]
for gen in gens:
    gen.wait(120)
c1, t1 = cpu(), time.perf_counter()
server.stop()
print(f"{(c1 - c0) / n * 1e6:.2f} {n / (t1 - t0):.0f}")
"""


def run(tree: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", SERVER, tree, str(TESTS), str(QUERIES), GENERATOR],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="source folder holding the first labmesh package")
    parser.add_argument("after", help="source folder holding the second labmesh package")
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {args.before: [], args.after: []}
    for i in range(args.pairs):
        for tree in (args.before, args.after) if i % 2 == 0 else (args.after, args.before):
            results[tree].append(run(tree))
            print(f"pair {i + 1}: {tree}: {results[tree][-1][0]:.1f} us/query", flush=True)
    for tree, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        rate = statistics.median(r[1] for r in rows)
        print(f"{tree}: median {cpu:.1f} us CPU per query, {rate:.0f} queries/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
