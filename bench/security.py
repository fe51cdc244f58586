"""Security: what CurveZMQ costs a query, against plaintext, in the same run (issue 15).

One labmesh DeviceServer process listens on two endpoints of one socket: CurveZMQ (keys made
for this run) and its plaintext listener (role operator, so both paths do the same work). One
client process, with a labmesh client on each endpoint, runs blocks of back-to-back queries,
alternating the endpoints, and reports the p50/p99 of each and the CURVE/plaintext ratio. The
same is done for the floor: a raw pyzmq ROUTER echo with a CurveZMQ endpoint and a plaintext
one, so the part of the cost that is libzmq's own is visible. Subscriptions over CURVE are
measured by bench.subscriptions (the `labmesh over CurveZMQ` row). Everything listens on
127.0.0.1 and ends by itself.

    python -m bench.security [--queries 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, stop_child

#: The target of issue 15: a CURVE query p50 at most this many times the plaintext one.
TARGET_CURVE_VS_PLAINTEXT = 1.3
KEYS_ENV = "LABMESH_BENCH_KEYS"
SERVER, CLIENT = "bench-server", "bench-client"


def make_keys(directory: Path) -> None:
    """The run's key pairs (server and client), as `labmesh keys new` makes them."""
    from labmesh.keys import new_key_pair

    for name in (SERVER, CLIENT):
        new_key_pair(directory, name)


def _keys() -> tuple[Any, Any, Path]:
    from labmesh.security import load_key_pair

    directory = Path(os.environ[KEYS_ENV])
    return load_key_pair(SERVER, directory), load_key_pair(CLIENT, directory), directory


# ---- servers (each its own process; they print their endpoints, serve until stdin closes) ----
def serve_labmesh() -> None:
    from labmesh import Device, Parameter, build_server
    from labmesh.security import Keyring, ServerSecurity

    class Bench(Device):
        kind = "bench"
        X = Parameter(float)

        def _query_(self, name: str) -> float:
            return 1.5

    server_pair, _client, directory = _keys()
    security = ServerSecurity(
        server_pair,
        Keyring(directories=[directory]),
        {CLIENT: "operator"},
        "operator",
        "tcp://127.0.0.1:0",
    )
    server = build_server(Bench("bench"), address="tcp://127.0.0.1:0", security=security).start()
    print(f"ENDPOINTS {server.address} {server.plaintext_address}", flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop()


def serve_floor() -> None:
    import zmq
    from zmq.auth.thread import ThreadAuthenticator

    from labmesh.security import server_curve, server_plaintext

    server_pair, _client, directory = _keys()
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="floor", location=str(directory))
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    server_curve(sock, server_pair, "floor")
    sock.bind("tcp://127.0.0.1:0")
    curve = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    server_plaintext(sock)
    sock.bind("tcp://127.0.0.1:0")
    plain = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    print(f"ENDPOINTS {curve} {plain}", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    stdin = sys.stdin.fileno()
    poller.register(stdin, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if stdin in events:
            break
        frames = sock.recv_multipart()
        request = json.loads(frames[-1])
        reply = {"status": "ok", "result": 1.5, "id": request.get("id")}
        sock.send_multipart([*frames[:-1], json.dumps(reply).encode()])
    auth.stop()
    sock.close()
    ctx.term()


# ---- the client (its own process): alternating blocks, latencies per endpoint ---------------
def measure_client(kind: str, curve: str, plain: str, queries: int, rounds: int) -> None:
    import zmq

    server_pair, client_pair, _ = _keys()
    if kind == "labmesh":
        from labmesh import build_client

        clients = {
            "curve": build_client(curve, key=client_pair, server_key=server_pair.public),
            "plaintext": build_client(plain),
        }
        calls = {name: (lambda c=c: c.query("X")) for name, c in clients.items()}
    else:
        from labmesh.security import client_curve

        ctx = zmq.Context()
        socks = {}
        for name, address in (("curve", curve), ("plaintext", plain)):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if name == "curve":
                client_curve(sock, client_pair, server_pair.public)
            sock.connect(address)
            socks[name] = sock

        def echo(sock: zmq.Socket, counter: list[int]) -> float:
            counter[0] += 1
            sock.send(json.dumps({"type": "query", "param": "X", "id": counter[0]}).encode())
            reply = json.loads(sock.recv())
            assert reply["id"] == counter[0]
            return reply["result"]

        calls = {name: (lambda s=s, n=[0]: echo(s, n)) for name, s in socks.items()}
    samples: dict[str, list[int]] = {"curve": [], "plaintext": []}
    for call in calls.values():  # warm up both: connections, handshakes, caches
        for _ in range(max(20, queries // 10)):
            assert call() == 1.5
    block = max(50, queries // 10)
    for _ in range(rounds):
        for start in range(0, queries, block):
            for name in ("plaintext", "curve") if start // block % 2 else ("curve", "plaintext"):
                call = calls[name]
                for _ in range(min(block, queries - start)):
                    t0 = time.perf_counter_ns()
                    call()
                    samples[name].append(time.perf_counter_ns() - t0)
    summary = {}
    for name, values in samples.items():
        values.sort()
        summary[name] = {
            "p50_us": statistics.median(values) / 1000,
            "p99_us": values[int(len(values) * 0.99) - 1] / 1000,
            "n": len(values),
        }
    print(json.dumps(summary), flush=True)


# ---- the scenario -------------------------------------------------------------------------------
def _one(kind: str, env: dict[str, str], queries: int, rounds: int) -> dict[str, Any]:
    module = [sys.executable, "-m", "bench.security"]
    server = subprocess.Popen(
        [*module, f"serve-{kind}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        line = server.stdout.readline().split()
        if not line or line[0] != "ENDPOINTS":
            raise RuntimeError(f"{kind} server did not start")
        client = subprocess.run(
            [*module, f"client-{kind}", line[1], line[2], str(queries), str(rounds)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=300,
        )
        if client.returncode != 0:
            raise RuntimeError(client.stderr.strip().splitlines()[-1:])
        return json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        stop_child(server)


def run(env: dict[str, str], queries: int = 3000, rounds: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="labmesh-bench-keys-") as keys:
        make_keys(Path(keys))
        env = {**env, KEYS_ENV: keys}
        results = {}
        for kind in ("floor", "labmesh"):
            print(f"security: {kind} CURVE vs plaintext ...", file=sys.stderr, flush=True)
            try:
                results[kind] = _one(kind, env, queries, rounds)
            except Exception as exc:  # reported, not fatal
                results[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"queries": queries, "rounds": rounds, "systems": results}


def _ratio(result: dict[str, Any]) -> float | None:
    if "error" in result:
        return None
    return result["curve"]["p50_us"] / result["plaintext"]["p50_us"]


def report(run: dict[str, Any]) -> str:
    lines = [
        f"security: query round trip over CurveZMQ vs plaintext, same server process, "
        f"{run['queries']} back-to-back queries per endpoint x {run['rounds']} rounds, "
        "alternating blocks:",
        "",
        "| system | plaintext p50 us | CURVE p50 us | CURVE/plaintext | plaintext p99 "
        "| CURVE p99 |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in (("floor", "floor: raw pyzmq ROUTER echo"), ("labmesh", "labmesh query")):
        r = run["systems"].get(kind, {"error": "not run"})
        if "error" in r:
            lines.append(f"| {label} | error: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {label} | {r['plaintext']['p50_us']:.0f} | {r['curve']['p50_us']:.0f} | "
            f"{_ratio(r):.2f}x | {r['plaintext']['p99_us']:.0f} | {r['curve']['p99_us']:.0f} |"
        )
    lines += ["", f"Target: labmesh CURVE p50 <= {TARGET_CURVE_VS_PLAINTEXT}x its plaintext p50."]
    return "\n".join(lines)


def security_targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    ratio = _ratio(run["systems"].get("labmesh", {"error": ""}))
    if ratio is None:
        return []
    return [
        {
            "server": "labmesh over CurveZMQ",
            "measured_by": "query p50, CURVE vs plaintext endpoint of one server",
            "target": f"<= {TARGET_CURVE_VS_PLAINTEXT}x plaintext",
            "measured": f"{ratio:.2f}x",
            "met": ratio <= TARGET_CURVE_VS_PLAINTEXT,
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.role == "serve-labmesh":
        serve_labmesh()
    elif args.role == "serve-floor":
        serve_floor()
    elif args.role in ("client-labmesh", "client-floor"):
        curve, plain, queries, rounds = args.rest
        measure_client(args.role.split("-")[1], curve, plain, int(queries), int(rounds))
    else:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO)])}
        print(report(run(env, args.queries, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
