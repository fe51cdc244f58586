"""Round-trip latency and throughput of labmesh against a raw pyzmq floor and PLESTY's server.

    .venv/bin/python scripts/bench.py                  # real numbers (about 6 minutes)
    .venv/bin/python scripts/bench.py --quick          # smoke run for tests and CI (seconds)
    .venv/bin/python scripts/bench.py --json out.json  # also write every figure as JSON
    .venv/bin/python scripts/bench.py --profile-dir prof/  # py-spy each server (see --help)

What is measured, the same way for every server:
- floor: a raw pyzmq ROUTER that echoes each message (scripts/bench_peers.py echo), driven by a
  raw DEALER that sends a JSON body shaped and sized like labmesh's query (type, param,
  timeout, id, session) and decodes the reply and checks its id, as any real client must;
- labmesh: DeviceServer with an in-memory device (fixed_threading True and False), driven by
  `build_client(...).query("X")`;
- PLESTY: plesty_lib's own server with the same in-memory device, run by the interop
  virtualenv's Python (`.cache/interop-venv`, built by scripts/interop_env.py), driven by
  labmesh's client (wire compatible). Skipped, saying so, when that virtualenv is missing.

Two throughput tables:
- client library: 1, 4 and 16 client processes each running the full client above. Each such
  client spends about 100 us CPU per call, so on a small machine the 16 clients, not the
  server, are the limit (the floor itself then reaches only about 3x PLESTY).
- server capacity: 16 lightweight load generators (the same worker processes), each a raw
  DEALER that connects like labmesh's client (keeping the session the server grants; a made-up
  one of the same size for the floor), then sends pre-encoded native queries, exactly the
  bytes labmesh's client sends for `query("X")` (prefix + counter + suffix), keeping up to 4
  in flight (`--capacity-windows`). A reply counts only if it checks out by bytes search:
  labmesh: status ok and the id of a request in flight; floor: the id (its echo has no
  status); PLESTY: status ok only, as it echoes no id. PLESTY answers each request in its own
  task, so pipelining works with it (every reply ok, none lost); its replies might come back
  in another order, which cannot matter as every request is the same query. So all servers
  use the same window; `--capacity-windows 1,4` adds a window-1 table for comparison. Fixed
  request count per generator and a hard time limit (a run cut short says "capped"). The table
  also gives the server's and the generators' CPU per request and how many cores the server
  kept busy, which tell whether the server or the generators were the limit.

Discovery (skipped with --no-discovery): `labmesh discovery`, the real command, in its own process
(127.0.0.1, no beacon):
- lookup round trip: one client process making sequential `lookup` requests for one name among
  1,000 registered records, both with the floor's bare DEALER and with labmesh's
  `Resolver.lookup`, as a ratio to the floor's query round trip of the same run (target: the
  Resolver's p50 <= 2x);
- registry capacity: 5,000 device records kept alive at 1 Hz (TTL 3 s: the registrar
  heartbeats every TTL/3) by 4 load-generator processes, each simulated server with its own
  connection: 5,000 single-device servers sending one heartbeat request each, and 500
  `labmesh serve` hosts of 10 devices sending one batched heartbeat each (as the registrar
  does). Over a fixed 20 s window: heartbeats/s achieved, the discovery process's CPU from
  /proc (target: < 50% of one core) and whether any registration expired (none may).
  `--quick`: 500 records, 5 s.

LAPLACE-LHC (skipped with --no-laplace): GET round trip against the real laplace-server
ServerLHC (interop virtualenv) in the same run: the ServerLHC, labmesh's LaplaceServer serving the
same data, a simulated MotorStage behind a LaplaceAdapter and a floor (a bare pyzmq REP socket
with a fixed reply), each in its own process, timed by one REQ client sending the LAPLACE
master's bytes: back to back (servers interleaved), then sparse, polling every server every
300 ms on average as the master does (targets: LaplaceServer p50 <= ServerLHC's p50; sparse GET
p99 < 1 ms). `--quick`: 300 GETs, 10 polls; default 5,000 GETs, 300 polls (90 s).

Every server runs alone in its own process; every client runs in its own process (a pool of
worker processes started once and reused, so the layout is identical for every server). A
latency run is one client making sequential calls; a throughput run is 1, 4 or 16 clients
each making a fixed number of calls, started together once all are connected and warmed up;
throughput = all calls / (last end - first start), for a capacity run too. Warm-up calls are
never timed. Server and client CPU time per request come from /proc and
`time.process_time`. Each figure is the median of several rounds, the servers taking turns in
a rotating order; servers and clients import a copy of labmesh taken at the start. Everything
listens on 127.0.0.1, every wait is bounded, and every process this script starts is ended by
its PID. Exit status 1 means a server could not be measured; missed targets are reported, not
failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import json
import math
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "bench_peers.py"
DEFAULT_INTEROP_PYTHON = REPO / ".cache" / "interop-venv" / "bin" / "python"
PARAM = "X"
EXPECTED_VALUE = 1.5
CONCURRENCY = (1, 4, 16)

#: Targets printed next to the results (see the README's performance section).
TARGET_P50_VS_FLOOR = 1.5
TARGET_TPUT16_VS_FLOOR = 0.5
TARGET_TPUT16_VS_PLESTY = 4.0


@dataclass(frozen=True)
class Counts:
    """How many calls each run makes, and how long any one run may take."""

    latency_calls: int
    latency_warmup: int
    calls_per_client: dict[int, int]
    throughput_warmup: int
    run_limit_s: float
    rounds: int
    capacity_requests: int  # per load generator
    capacity_warmup: int
    capacity_limit_s: float


DEFAULT_COUNTS = Counts(
    latency_calls=3000,
    latency_warmup=300,
    calls_per_client={1: 4000, 4: 1000, 16: 250},
    throughput_warmup=50,
    run_limit_s=30.0,
    rounds=3,
    capacity_requests=1500,
    capacity_warmup=50,
    capacity_limit_s=8.0,
)
QUICK_COUNTS = Counts(
    latency_calls=200,
    latency_warmup=20,
    calls_per_client={1: 200, 4: 50, 16: 15},
    throughput_warmup=5,
    run_limit_s=10.0,
    rounds=1,
    capacity_requests=100,
    capacity_warmup=5,
    capacity_limit_s=3.0,
)


@dataclass(frozen=True)
class ServerSpec:
    """One server to measure: how to start it and how to drive it."""

    key: str
    label: str
    argv: list[str]
    client: str  # "raw" (DEALER with a JSON body) or "labmesh" (build_client().query)
    cwd: str | None = None
    #: How a load generator (server capacity run) checks a reply: "id" (the reply carries the
    #: request's id: the floor's echo), "id+ok" (the id and status ok: labmesh) or "ok" (status
    #: ok only: PLESTY echoes no ids).
    load_check: str = "id+ok"
    #: The session a load generator puts in its queries: "connect" (whatever the server's
    #: connect reply grants, as labmesh's client does: labmesh gives one, PLESTY none) or
    #: "random" (a made-up token of the same size, for the echo floor).
    load_session: str = "connect"


# ---- the client worker (runs in its own process) ---------------------------------------------
class _RawClient:
    """A bare DEALER sending a labmesh-sized query body: the least any client must do."""

    def __init__(self, address: str, timeout_ms: int) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, f"client-{secrets.token_hex(16)}".encode())
        self._sock.connect(address)
        self._timeout_ms = timeout_ms
        self._prefix = secrets.token_hex(3)
        self._session = secrets.token_urlsafe(16)
        self._counter = 0

    def query(self) -> None:
        self._counter += 1
        rid = f"{self._prefix}:{self._counter}"
        body = {"type": "query", "param": PARAM, "timeout": None, "id": rid,
                "session": self._session}
        self._sock.send(json.dumps(body, separators=(",", ":")).encode())
        if not self._sock.poll(self._timeout_ms):
            raise TimeoutError(f"no echo within {self._timeout_ms} ms")
        if json.loads(self._sock.recv())["id"] != rid:
            raise RuntimeError("echo carried another request's id")

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class _LabmeshClient:
    """labmesh's DeviceClient asking the in-memory device for its parameter."""

    def __init__(self, address: str, timeout_ms: int) -> None:
        from labmesh import build_client

        self._client = build_client(address, timeout=timeout_ms)

    def query(self) -> None:
        value = self._client.query(PARAM)
        if value != EXPECTED_VALUE:
            raise RuntimeError(f"query {PARAM} returned {value!r}, expected {EXPECTED_VALUE}")

    def close(self) -> None:
        self._client.close()


#: What a load generator's reply must start with to count as "status ok": labmesh writes JSON
#: without spaces, PLESTY with json.dumps' default separators; both put "status" first.
_OK_PREFIXES = (b'{"status":"ok"', b'{"status": "ok"')
_ID_KEY = b'"id":"'


class _LoadGenerator:
    """A raw DEALER keeping up to `window` pre-encoded native queries in flight.

    The least work per request a client can do: the body is a fixed prefix + a counter + a
    fixed suffix (the bytes labmesh's client sends for `query("X")`, session included when the
    server grants one), and a reply is checked by bytes search only: status ok at its start
    and/or its id among those in flight. Only correct replies are counted. Used for the
    "server capacity" run, to keep the clients from being the bottleneck as far as Python
    allows (the table's CPU columns show how far that holds).
    """

    def __init__(self, address: str, timeout_ms: int, window: int, check: str,
                 session_mode: str) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, min(timeout_ms, 1000))
        self._sock.setsockopt(zmq.IDENTITY, f"client-{secrets.token_hex(16)}".encode())
        self._sock.connect(address)
        self._timeout_ms = timeout_ms
        self._window = max(1, window)
        self._check_id = "id" in check
        self._check_ok = "ok" in check
        tag = secrets.token_hex(3)
        # Connect as labmesh's client does; keep whatever session the server grants.
        self._sock.send(f'{{"type":"connect","resources":[],"lease":10.0,"id":"{tag}:0"}}'
                        .encode())
        reply = self._recv_within(timeout_ms)
        if reply is None:
            raise TimeoutError(f"no reply to connect within {timeout_ms} ms")
        session: str | None
        if session_mode == "random":
            session = secrets.token_urlsafe(16)
        else:
            granted = json.loads(reply)
            if granted.get("status") != "ok":
                raise RuntimeError(f"connect refused: {reply[:200]!r}")
            session = granted.get("result", {}).get("session")
        self._head = b'{"type":"query","param":"' + PARAM.encode() + \
            b'","timeout":null,"id":"' + tag.encode() + b":"
        self._tail = b'"' + (b',"session":"' + session.encode() + b'"' if session else b"") + b"}"
        self._tag = tag.encode() + b":"
        self._counter = 0
        self._bye = b'{"type":"disconnect","id":"' + self._tag + b'bye' + self._tail

    def _recv_within(self, timeout_ms: int) -> bytes | None:
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            try:
                return self._sock.recv()
            except self._zmq.Again:
                continue
        return None

    def _correct(self, reply: bytes, in_flight: set[bytes]) -> bool:
        """Whether `reply` is status ok and (when ids are checked) answers one of `in_flight`."""
        if self._check_ok and not reply.startswith(_OK_PREFIXES):
            return False
        if not self._check_id:
            return True
        start = reply.find(_ID_KEY)
        if start < 0:
            return False
        start += len(_ID_KEY)
        rid = reply[start:reply.find(b'"', start)]
        if rid in in_flight:
            in_flight.remove(rid)
            return True
        return False

    def query(self) -> None:
        """One request, one checked reply (the untimed warm-up)."""
        self._counter += 1
        num = b"%d" % self._counter
        self._sock.send(self._head + num + self._tail)
        reply = self._recv_within(self._timeout_ms)
        if reply is None:
            raise TimeoutError(f"no reply within {self._timeout_ms} ms")
        if not self._correct(reply, {self._tag + num}):
            raise RuntimeError(f"wrong reply: {reply[:200]!r}")

    def run(self, calls: int, limit_s: float) -> dict[str, Any]:
        """The timed part: `calls` requests, at most `window` in flight, until `limit_s`.

        Bounded: stops sending at the deadline, and gives up (TimeoutError) when no reply comes
        for the receive timeout while requests are in flight; replies after the stop are not
        counted.
        """
        send, recv, again = self._sock.send, self._sock.recv, self._zmq.Again
        noblock = self._zmq.NOBLOCK
        head, tail, tag, window = self._head, self._tail, self._tag, self._window
        check_id, check_ok = self._check_id, self._check_ok
        monotonic = time.monotonic
        in_flight: set[bytes] = set()
        outstanding = sent = good = wrong = 0
        counter = self._counter
        quiet_since: float | None = None
        cpu0 = time.process_time()
        t0 = monotonic()
        deadline = t0 + limit_s
        capped = False
        while good + wrong < calls:
            while sent < calls and outstanding < window:
                counter += 1
                sent += 1
                outstanding += 1
                num = b"%d" % counter
                send(head + num + tail)
                if check_id:
                    in_flight.add(tag + num)
            try:
                reply = recv()
            except again:  # the receive timeout (at most 1 s) passed without a reply
                now = monotonic()
                quiet_since = quiet_since or now
                if now > deadline:
                    capped = True
                    break
                if (now - quiet_since) * 1000 > self._timeout_ms:
                    raise TimeoutError(f"no reply for {self._timeout_ms} ms with {outstanding} "
                                       f"request(s) in flight") from None
                continue
            quiet_since = None
            # Check this reply and any others already queued, then refill the window: one
            # wake-up (and one batch of sends) for all the replies that arrived together.
            for _ in range(window):
                ok = not check_ok or reply.startswith(_OK_PREFIXES)
                if check_id:  # only a reply with an id in flight frees a slot of the window
                    start = reply.find(_ID_KEY) + 6
                    rid = reply[start:reply.find(b'"', start)] if start >= 6 else b""
                    if rid in in_flight:
                        in_flight.remove(rid)
                        outstanding -= 1
                    else:
                        ok = False
                else:
                    outstanding -= 1
                if ok:
                    good += 1
                else:
                    wrong += 1
                if not outstanding:
                    break
                try:
                    reply = recv(noblock)
                except again:
                    break
            if monotonic() > deadline:
                capped = good + wrong < calls
                break
        t1 = monotonic()
        self._counter = counter
        return {"count": good, "wrong": wrong, "sent": sent, "t0": t0, "t1": t1,
                "cpu_s": time.process_time() - cpu0, "capped": capped}

    def close(self) -> None:
        """Release the session as labmesh's client does (not waiting for the answer)."""
        with contextlib.suppress(self._zmq.ZMQError):
            self._sock.send(self._bye, self._zmq.NOBLOCK)
        self._sock.close(linger=200)
        self._ctx.term()


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def pick(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] / 1000, 1)

    return {
        "n": n,
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "mean_us": round(statistics.fmean(ordered) / 1000, 1),
        "max_us": round(ordered[-1] / 1000, 1),
    }


def _worker_run(client: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """The timed part: `calls` sequential queries, stopping early at the run's deadline."""
    calls, record = cmd["calls"], cmd["record_latency"]
    deadline = time.monotonic() + cmd["limit_s"]
    samples: list[int] = []
    clock = time.perf_counter_ns
    cpu0 = time.process_time()
    t0 = time.monotonic()
    done = 0
    for _ in range(calls):
        if time.monotonic() > deadline:
            break
        if record:
            start = clock()
            client.query()
            samples.append(clock() - start)
        else:
            client.query()
        done += 1
    t1 = time.monotonic()
    reply: dict[str, Any] = {"count": done, "t0": t0, "t1": t1,
                             "cpu_s": time.process_time() - cpu0}
    if record and samples:
        reply["latency"] = _percentiles(samples)
    return reply


def worker_main(max_seconds: float) -> None:
    """Serve coordinator commands, one JSON object per line on stdin/stdout.

    prepare: connect a client to `address` and make `warmup` untimed calls; go: run the timed
    calls and close the client; anything else, or stdin closing, ends the worker.
    """
    killer = threading.Timer(max_seconds, os._exit, (3,))
    killer.daemon = True
    killer.start()
    client: Any = None

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "prepare":
                if client is not None:  # left over from a run the coordinator gave up on
                    client.close()
                    client = None
                if cmd["client"] == "load":
                    client = _LoadGenerator(cmd["address"], cmd["timeout_ms"], cmd["window"],
                                            cmd["check"], cmd["session"])
                else:
                    client = _CLIENTS[cmd["client"]](cmd["address"], cmd["timeout_ms"])
                for _ in range(cmd["warmup"]):
                    client.query()
                reply({"ready": True})
            elif cmd["cmd"] == "go":
                if isinstance(client, _LoadGenerator):
                    result = client.run(cmd["calls"], cmd["limit_s"])
                else:
                    result = _worker_run(client, cmd)
                client.close()
                client = None
                reply(result)
            else:
                return
        except Exception as exc:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
                client = None
            reply({"error": f"{type(exc).__name__}: {exc}"})


# ---- the coordinator ---------------------------------------------------------------------------
class Proc:
    """A child process spoken to by JSON lines, read with timeouts, ended by its PID."""

    def __init__(self, argv: list[str], name: str, log_dir: Path, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.stderr"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=cwd,
            env=env, start_new_session=True,
        )
        self.pid = self.popen.pid
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        assert self.popen.stdout is not None
        self._fd = self.popen.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._sel.register(self._fd, selectors.EVENT_READ)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(obj) + "\n").encode())
        self.popen.stdin.flush()

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} (pid {self.pid}) said nothing within {timeout} s")
            if not self._sel.select(left):
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.name} (pid {self.pid}) exited: {self.stderr_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def recv(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.readline(timeout))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all threads) so far, from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stderr_tail(self, limit: int = 800) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip()
        return text[-limit:] or "(no stderr)"

    def stop(self) -> None:
        """Close stdin (the polite stop), then SIGTERM, then SIGKILL, each bounded."""
        with contextlib.suppress(OSError, ValueError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        try:
            self.popen.wait(3.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(2.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(2.0)
        self._sel.close()
        with contextlib.suppress(OSError):
            assert self.popen.stdout is not None
            self.popen.stdout.close()
        self._log.close()


@dataclass
class ServerResult:
    key: str
    label: str
    latency: dict[str, float] | None = None
    throughput: dict[int, dict[str, Any]] = field(default_factory=dict)
    cpu_us_per_call: dict[str, float] | None = None
    error: str | None = None
    #: Server capacity runs (16 load generators), by pipeline window.
    capacity: dict[int, dict[str, Any]] = field(default_factory=dict)


def combine(rounds: list[ServerResult]) -> ServerResult:
    """One result per server from its rounds: the median of each figure (max of maxima)."""
    first = rounds[0]
    failed = [r for r in rounds if r.error]
    if failed:
        return ServerResult(first.key, first.label, error=failed[0].error)

    def med(values: list[Any]) -> float:
        return round(statistics.median(values), 1)

    lats = [r.latency for r in rounds if r.latency]
    latency = {k: (max if k == "max_us" else med)([lat[k] for lat in lats]) for k in lats[0]}
    latency["n"] = sum(lat["n"] for lat in lats)
    throughput: dict[int, dict[str, Any]] = {}
    for c in first.throughput:
        runs = [r.throughput[c] for r in rounds]
        throughput[c] = {
            "clients": c,
            "rps": med([run["rps"] for run in runs]),
            "calls": sum(run["calls"] for run in runs),
            "capped": any(run["capped"] for run in runs),
            "server_cpu_us_per_call": med([run["server_cpu_us_per_call"] for run in runs]),
            "client_cpu_us_per_call": med([run["client_cpu_us_per_call"] for run in runs]),
            "rps_per_round": [run["rps"] for run in runs],
        }
    capacity: dict[int, dict[str, Any]] = {}
    for window in first.capacity:
        runs = [r.capacity[window] for r in rounds]
        capacity[window] = {
            "generators": runs[0]["clients"],
            "window": window,
            "rps": med([run["rps"] for run in runs]),
            "calls": sum(run["calls"] for run in runs),
            "wrong": sum(run["wrong"] for run in runs),
            "capped": any(run["capped"] for run in runs),
            "server_cpu_us_per_call": med([run["server_cpu_us_per_call"] for run in runs]),
            "generator_cpu_us_per_call": med([run["client_cpu_us_per_call"] for run in runs]),
            "server_cores_busy": round(statistics.median(
                run["server_cores_busy"] or 0.0 for run in runs), 2),
            "rps_per_round": [run["rps"] for run in runs],
        }
    cpu = {side: med([r.cpu_us_per_call[side] for r in rounds if r.cpu_us_per_call])
           for side in ("server", "client")}
    latency_rounds = {"p50_us_per_round": [lat["p50_us"] for lat in lats],
                      "p99_us_per_round": [lat["p99_us"] for lat in lats]}
    return ServerResult(first.key, first.label, {**latency, **latency_rounds}, throughput, cpu,
                        capacity=capacity)


class Bench:
    """Runs every server through the same latency and throughput runs."""

    def __init__(self, counts: Counts, log_dir: Path, profile_dir: Path | None,
                 env: dict[str, str], capacity_windows: tuple[int, ...] = (4,)) -> None:
        self.counts = counts
        self.capacity_windows = capacity_windows
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.env = env
        self.workers: list[Proc] = []

    def start_workers(self, n: int) -> None:
        limit = str(self.counts.run_limit_s * 40 + 120)
        for i in range(n):
            self.workers.append(Proc([sys.executable, __file__, "--worker", "--max-seconds", limit],
                                     f"client-{i}", self.log_dir, env=self.env))

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def restart_workers(self) -> None:
        """Fresh workers after a failed run, so no late reply of it is read as the next one's."""
        n = len(self.workers)
        self.stop_workers()
        self.start_workers(n)

    def _run(self, server: Proc, spec: ServerSpec, address: str, clients: int, calls: int,
             warmup: int, record: bool, load_window: int | None = None) -> dict[str, Any]:
        """One run: prepare `clients` workers, start them together, collect their figures.

        With `load_window` the workers are load generators (server capacity run) instead of
        clients of the spec's kind.
        """
        workers = self.workers[:clients]
        prepare: dict[str, Any] = {"cmd": "prepare", "client": spec.client, "address": address,
                                   "timeout_ms": 5000, "warmup": warmup}
        limit_s = self.counts.run_limit_s
        if load_window is not None:
            prepare.update(client="load", window=load_window, check=spec.load_check,
                           session=spec.load_session)
            limit_s = self.counts.capacity_limit_s
        for worker in workers:
            worker.send(prepare)
        errors = []
        for worker in workers:
            reply = worker.recv(30.0)
            if "error" in reply:
                errors.append(f"{worker.name}: {reply['error']}")
        if errors:
            raise RuntimeError("; ".join(errors))
        cpu0 = server.cpu_seconds()
        go = {"cmd": "go", "calls": calls, "record_latency": record, "limit_s": limit_s}
        for worker in workers:
            worker.send(go)
        replies = [worker.recv(limit_s + 30.0) for worker in workers]
        server_cpu = server.cpu_seconds() - cpu0
        errors = [f"{w.name}: {r['error']}" for w, r in zip(workers, replies, strict=True)
                  if "error" in r]
        if errors:
            raise RuntimeError("; ".join(errors))
        total = sum(r["count"] for r in replies)
        seconds = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
        run: dict[str, Any] = {}
        if load_window is not None:
            if not total:
                raise RuntimeError(f"no correct reply to {clients} load generators (window "
                                   f"{load_window}); {sum(r['wrong'] for r in replies)} wrong")
            run = {"window": load_window, "wrong": sum(r["wrong"] for r in replies),
                   "server_cores_busy": round(server_cpu / seconds, 2) if seconds > 0 else None}
        return {
            **run,
            "clients": clients,
            "calls": total,
            "seconds": round(seconds, 4),
            "rps": round(total / seconds, 1) if seconds > 0 else 0.0,
            "capped": total < clients * calls,
            "server_cpu_us_per_call": round(server_cpu / total * 1e6, 1) if total else None,
            "client_cpu_us_per_call": round(sum(r["cpu_s"] for r in replies) / total * 1e6, 1)
            if total else None,
            "latency": replies[0].get("latency"),
        }

    def _start_profiler(self, server: Proc, spec: ServerSpec,
                        round_no: int) -> subprocess.Popen | None:
        if self.profile_dir is None:
            return None
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            print("  (py-spy not found; no profile)", file=sys.stderr)
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{spec.key}.round{round_no + 1}.folded"
        return subprocess.Popen(
            [py_spy, "record", "--pid", str(server.pid), "--format", "raw", "--output", str(out),
             "--rate", "250", "--threads", "--gil", "--nonblocking", "--duration", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def measure(self, spec: ServerSpec, round_no: int = 0) -> ServerResult:
        result = ServerResult(spec.key, spec.label)
        server = Proc(spec.argv, f"server-{spec.key}", self.log_dir, cwd=spec.cwd, env=self.env)
        profiler: subprocess.Popen | None = None
        try:
            line = server.readline(30.0)
            if not line.startswith("ADDRESS "):
                raise RuntimeError(f"{spec.label} did not announce its address: {line!r}")
            address = line.split(" ", 1)[1]
            profiler = self._start_profiler(server, spec, round_no)
            counts = self.counts
            lat = self._run(server, spec, address, 1, counts.latency_calls, counts.latency_warmup,
                            record=True)
            result.latency = lat["latency"]
            result.cpu_us_per_call = {"server": lat["server_cpu_us_per_call"],
                                      "client": lat["client_cpu_us_per_call"]}
            for clients in CONCURRENCY:
                run = self._run(server, spec, address, clients, counts.calls_per_client[clients],
                                counts.throughput_warmup, record=False)
                run.pop("latency")
                result.throughput[clients] = run
            for window in self.capacity_windows:
                run = self._run(server, spec, address, max(CONCURRENCY),
                                counts.capacity_requests, counts.capacity_warmup, record=False,
                                load_window=window)
                run.pop("latency")
                result.capacity[window] = run
            if not server.alive():
                raise RuntimeError(f"{spec.label} exited during the runs")
        except (RuntimeError, TimeoutError, OSError) as exc:
            result.error = f"{exc} [server stderr: {server.stderr_tail(300)}]"
            self.restart_workers()
        finally:
            if profiler is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(profiler.pid, signal.SIGINT)
                try:
                    profiler.wait(10.0)
                except subprocess.TimeoutExpired:
                    os.kill(profiler.pid, signal.SIGKILL)
                    profiler.wait(2.0)
            server.stop()
        return result


# ---- report ------------------------------------------------------------------------------------
def _ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return ""
    return f" ({value / base:.2f}x)"


def _rps(result: ServerResult, clients: int) -> float | None:
    run = result.throughput.get(clients)
    return run["rps"] if run else None


def _p50(result: ServerResult) -> float | None:
    return result.latency["p50_us"] if result.latency else None


def _one_line(error: str, limit: int = 160) -> str:
    """The gist of an error for a table cell: its first line, and the last line of any
    traceback quoted in it."""
    lines = [line.strip() for line in error.split("[server stderr:")[0].splitlines()
             if line.strip()]
    gist = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return gist.replace("|", "/")[:limit]


def _p99(result: ServerResult) -> float | None:
    return result.latency["p99_us"] if result.latency else None


def markdown_table(results: list[ServerResult], floor: ServerResult) -> str:
    head = ("| server | query p50 us | query p99 us | 1 client req/s | 4 clients req/s "
            "| 16 clients req/s | server CPU us/call | client CPU us/call |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        if r.error:
            lines.append(f"| {r.label} | failed: {_one_line(r.error)} |" + " |" * 6)
            continue
        assert r.latency is not None and r.cpu_us_per_call is not None
        cells = [
            f"{r.latency['p50_us']:.0f}{_ratio(r.latency['p50_us'], _p50(floor))}",
            f"{r.latency['p99_us']:.0f}{_ratio(r.latency['p99_us'], _p99(floor))}",
        ]
        for c in CONCURRENCY:
            rps = _rps(r, c)
            capped = " (capped)" if r.throughput[c]["capped"] else ""
            cells.append(f"{rps:.0f}{_ratio(rps, _rps(floor, c))}{capped}")
        cpu16 = r.throughput[16]
        cells.append(f"{r.cpu_us_per_call['server']:.0f} / {cpu16['server_cpu_us_per_call']:.0f}")
        cells.append(f"{r.cpu_us_per_call['client']:.0f} / {cpu16['client_cpu_us_per_call']:.0f}")
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _cap(result: ServerResult | None, window: int) -> float | None:
    run = result.capacity.get(window) if result is not None and not result.error else None
    return run["rps"] if run else None


def capacity_table(results: list[ServerResult], floor: ServerResult,
                   plesty: ServerResult | None, window: int) -> str:
    versus = f"vs {plesty.label}" if plesty is not None else "vs PLESTY"
    head = (f"| server | req/s | vs floor | {versus} | server CPU us/req "
            "| generator CPU us/req | server CPU busy (cores) | req/s per round |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        if r.error:
            lines.append(f"| {r.label} | failed: {_one_line(r.error)} |" + " |" * 6)
            continue
        run = r.capacity[window]
        notes = (" (capped)" if run["capped"] else "") + \
            (f" ({run['wrong']} wrong replies)" if run["wrong"] else "")
        base, theirs = _cap(floor, window), _cap(plesty, window)
        cells = [
            f"{run['rps']:.0f}{notes}",
            f"{run['rps'] / base:.2f}x" if base else "n/a",
            f"{run['rps'] / theirs:.2f}x" if theirs else "n/a",
            f"{run['server_cpu_us_per_call']:.0f}",
            f"{run['generator_cpu_us_per_call']:.0f}",
            f"{run['server_cores_busy']:.2f}",
            " / ".join(f"{rps:.0f}" for rps in run["rps_per_round"]),
        ]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_target(server: str, table: str, target: str, mine: float | None,
                  base: float | None, minimum: float) -> dict[str, Any]:
    ratio = mine / base if mine and base else None
    return {"server": server, "measured_by": table, "target": target, "ratio": _round(ratio),
            "met": ratio is not None and ratio >= minimum}


def evaluate_targets(results: list[ServerResult], floor: ServerResult,
                     plesty: ServerResult | None, window: int) -> list[dict[str, Any]]:
    """The targets of every labmesh server: the p50 latency one, and the two 16-way throughput
    ones on both tables (16 client-library clients; 16 load generators = server capacity)."""
    targets = []
    has_plesty = plesty is not None and not plesty.error
    library = "client library, 16 clients"
    capacity = f"server capacity, 16 load generators (window {window})"
    for r in results:
        if not r.key.startswith("labmesh") or r.error:
            continue
        p50_ratio = _p50(r) / _p50(floor) if _p50(r) and _p50(floor) else None
        targets.append({"server": r.label, "measured_by": "latency, 1 client",
                        "target": f"query p50 <= {TARGET_P50_VS_FLOOR}x floor",
                        "ratio": _round(p50_ratio),
                        "met": p50_ratio is not None and p50_ratio <= TARGET_P50_VS_FLOOR})
        for table, mine, base, theirs in (
            (library, _rps(r, 16), _rps(floor, 16), _rps(plesty, 16) if has_plesty else None),
            (capacity, _cap(r, window), _cap(floor, window), _cap(plesty, window)),
        ):
            targets.append(_ratio_target(r.label, table,
                                         f"req/s >= {TARGET_TPUT16_VS_FLOOR}x floor",
                                         mine, base, TARGET_TPUT16_VS_FLOOR))
            if has_plesty:
                assert plesty is not None
                targets.append(_ratio_target(r.label, table,
                                             f"req/s >= {TARGET_TPUT16_VS_PLESTY}x {plesty.label}",
                                             mine, theirs, TARGET_TPUT16_VS_PLESTY))
    return targets


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| server | measured by | target | measured | met |", "|---|---|---|---|---|"]
    for t in targets:
        measured = t.get("measured") or (f"{t['ratio']:.2f}x" if t["ratio"] is not None
                                         else "n/a")
        lines.append(f"| {t['server']} | {t['measured_by']} | {t['target']} | {measured} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def _version_of(python: str, module: str, dist: str) -> str:
    code = (f"import importlib.metadata as m, {module}; print(m.version({dist!r}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def server_specs(args: argparse.Namespace, max_s: str,
                 plesty_dir: str) -> tuple[list[ServerSpec], str]:
    peers = [str(PEERS), "--max-seconds", max_s]
    specs = [
        ServerSpec("floor", "floor: raw pyzmq ROUTER echo",
                   [sys.executable, peers[0], "echo", *peers[1:]], "raw", load_check="id",
                   load_session="random"),
        ServerSpec("labmesh_fixed", "labmesh fixed_threading=True",
                   [sys.executable, peers[0], "labmesh", "--fixed", *peers[1:]], "labmesh"),
        ServerSpec("labmesh_pool", "labmesh fixed_threading=False",
                   [sys.executable, peers[0], "labmesh", *peers[1:]], "labmesh"),
    ]
    interop = Path(args.interop_python)
    if not interop.exists():
        return specs, f"PLESTY skipped: no interop virtualenv ({interop} is missing; " \
                      "build it with scripts/interop_env.py)"
    version = _version_of(str(interop), "plesty.lib.service", "plesty_lib")
    if version == "?":
        return specs, f"PLESTY skipped: {interop} cannot import plesty.lib.service"
    specs.append(ServerSpec(
        "plesty", f"PLESTY {version} fixed_threading=True, logging WARNING",
        [str(interop), peers[0], "plesty", "--fixed", "--plesty-log-level", "WARNING",
         *peers[1:]], "labmesh", cwd=plesty_dir, load_check="ok"))
    if not args.no_plesty_default_logging:
        specs.append(ServerSpec(
            "plesty_default_logging", f"PLESTY {version} fixed_threading=True, its INFO logging",
            [str(interop), peers[0], "plesty", "--fixed", *peers[1:]], "labmesh",
            cwd=plesty_dir, load_check="ok"))
    return specs, f"PLESTY {version} from {interop}"


# ---- discovery: lookup round trip and registry capacity ------------------------------------------
#: Targets of the discovery service (issue 5): a lookup costs at most 2x the floor's round trip;
#: 5,000 servers heartbeating at 1 Hz keep it below half a core.
TARGET_LOOKUP_P50_VS_FLOOR = 2.0
TARGET_DISCOVERY_CPU_CORES = 0.5
#: The capacity run's registration TTL: labmesh's registrar heartbeats every TTL/3, so 1 Hz.
CAPACITY_TTL_S = 3.0
HEARTBEAT_PERIOD_S = CAPACITY_TTL_S / 3
#: The lookup run's TTL: long enough that its records need no heartbeats during the run.
LOOKUP_TTL_S = 600.0
LOAD_GENERATORS = 4
#: Records registered per second while the capacity run sets up (servers starting up).
REGISTER_RATE = 1000
#: The name every lookup asks for (registered among `lookup_records` others).
LOOKUP_NAME = "bench-dev-00042"


@dataclass(frozen=True)
class DiscoveryCounts:
    """Sizes of the discovery runs."""

    lookup_records: int  # records registered while lookups run
    servers: int  # registry capacity: device records renewed at 1 Hz
    devices_per_host: int  # the batched scenario: devices per `labmesh serve` host
    window_s: float  # the measured window of each capacity run


DEFAULT_DISCOVERY_COUNTS = DiscoveryCounts(1000, 5000, 10, 20.0)
QUICK_DISCOVERY_COUNTS = DiscoveryCounts(100, 500, 10, 5.0)


def bench_record(index: int, host: str, instance: str) -> dict[str, Any]:
    """A device record shaped like those `labmesh serve` registers (an NI card's tree)."""
    return {
        "name": f"bench-dev-{index:05d}",
        "kind": "daq",
        "address": f"tcp://127.0.0.1:{20000 + index % 40000}",
        "metrics_url": f"http://127.0.0.1:{9100 + index % 100}/metrics",
        "host": host,
        "labels": {"room": "bench"},
        "resources": {"Dev1": {"port0": [f"line{i}" for i in range(8)]}},
        "protocols": ["labmesh/1"],
        "version": "bench",
        "started": time.time(),
        "instance": instance,
    }


class _LookupClient(_RawClient):
    """The floor's bare DEALER, asking discovery for one record: `lookup` requests, each reply
    decoded and checked (its id, status ok, the name asked for)."""

    def query(self) -> None:
        self._counter += 1
        rid = f"{self._prefix}:{self._counter}"
        body = {"type": "lookup", "name": LOOKUP_NAME, "id": rid}
        self._sock.send(json.dumps(body, separators=(",", ":")).encode())
        if not self._sock.poll(self._timeout_ms):
            raise TimeoutError(f"no lookup reply within {self._timeout_ms} ms")
        reply = json.loads(self._sock.recv())
        if reply.get("id") != rid or reply.get("status") != "ok":
            raise RuntimeError(f"wrong lookup reply: {str(reply)[:200]}")
        if reply["result"]["name"] != LOOKUP_NAME:
            raise RuntimeError(f"lookup answered another record: {reply['result']['name']}")


class _ResolverClient:
    """labmesh's Resolver asking discovery for one record (`lookup`: never from its cache)."""

    def __init__(self, address: str, timeout_ms: int) -> None:
        from labmesh.discovery import Resolver

        self._resolver = Resolver([address], timeout_s=timeout_ms / 1000)

    def query(self) -> None:
        record = self._resolver.lookup(LOOKUP_NAME)
        if record["name"] != LOOKUP_NAME:
            raise RuntimeError(f"lookup answered another record: {record['name']}")

    def close(self) -> None:
        self._resolver.close()


_HEARTBEAT_OK = b'{"status":"ok"'
_NONE_UNKNOWN = b'"unknown":[]'


class _HeartbeatLoad:
    """Simulated device servers keeping their registrations alive, as labmesh's registrar does.

    Each unit is one server process with its own DEALER connection and identity: a single-device
    server (`per_unit` 1: one heartbeat request per record, so 5,000 servers send 5,000 requests
    a second) or a `labmesh serve` host with `per_unit` devices (one batched heartbeat
    `{records: [...]}` per period, as the registrar sends it). Unit i connects and registers at
    start + i * ramp / units (servers starting one after another), then heartbeats every period
    from then on; with the ramp a whole number of periods the heartbeats are spread evenly.
    Like the registrar (TTL 3 s: heartbeat interval and request timeout both 1 s), a unit waits
    for each reply; one still unanswered at the unit's next turn has timed out: the unit closes
    its connection, opens a new one and sends again (counted as a timeout). Names a heartbeat
    reply reports unknown are registered again at once, as the registrar does.
    """

    def __init__(self, cmd: dict[str, Any]) -> None:
        import zmq

        self._zmq = zmq
        self.address = cmd["address"]
        self.units = int(cmd["units"])
        self.per_unit = int(cmd["per_unit"])
        self.period_s = float(cmd["period_s"])
        self.ramp_s = float(cmd["ramp_s"])
        first = self._first = int(cmd["first"])
        self._ctx = zmq.Context()
        # after timeouts closed sockets linger a while: room for a few periods of reconnects
        self._ctx.set(zmq.MAX_SOCKETS, min(60000, 8 * self.units + 256))
        self._socks: list[Any] = [None] * self.units
        self._unit_of: dict[Any, int] = {}
        self._pending = [0] * self.units  # replies still due, per unit
        self._registering = [True] * self.units
        self._confirmed: list[set[str]] = [set() for _ in range(self.units)]
        self._sent_at = [0.0] * self.units
        self._rids = [b""] * self.units
        self._registers: list[list[bytes]] = []
        self._beats: list[tuple[bytes, bytes]] = []  # (head, tail) around the request id
        for unit in range(self.units):
            instance = secrets.token_hex(6)
            host = f"bench-host-{first + unit:05d}"
            indices = range((first + unit) * self.per_unit, (first + unit + 1) * self.per_unit)
            records = [bench_record(i, host, instance) for i in indices]
            self._registers.append(
                [
                    json.dumps({"type": "register", "record": r, "id": f"r{i}"}).encode()
                    for i, r in zip(indices, records, strict=True)
                ]
            )
            pairs = [{"name": r["name"], "instance": instance} for r in records]
            fields = {"records": pairs} if self.per_unit > 1 else pairs[0]
            head = json.dumps({"type": "heartbeat", **fields}, separators=(",", ":"))[:-1]
            self._beats.append(((head + ',"id":"').encode(), b'"}'))
        self.counters = {
            "requests": 0,
            "heartbeat_requests": 0,
            "replies": 0,
            "registered": 0,
            "renewed": 0,
            "unknown": 0,
            "errors": 0,
            "timeouts": 0,
            "reregistered": 0,
        }
        self.first_error: str | None = None
        self._samples_us: list[int] = []
        self._counter = 0

    def _connect(self, unit: int) -> Any:
        """A new connection for `unit` (its first, or after a timeout), as the registrar makes."""
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"registrar-{secrets.token_hex(6)}".encode())
        sock.connect(self.address)
        self._socks[unit] = sock
        self._unit_of[sock] = unit
        return sock

    def _turn(self, unit: int, now: float, poller: Any) -> None:
        """Unit `unit`'s turn: register (until registered) or heartbeat."""
        c = self.counters
        sock = self._socks[unit]
        if self._pending[unit]:  # unanswered for a whole period: the registrar's timeout
            c["timeouts"] += 1
            poller.unregister(sock)
            del self._unit_of[sock]
            sock.close(linger=0)
            self._pending[unit] = 0
            sock = None
        if sock is None:
            try:
                sock = self._connect(unit)
            except self._zmq.ZMQError as exc:  # out of sockets or descriptors: next turn
                self._error(f"cannot open a connection: {exc}".encode())
                return
        if self._registering[unit]:
            for body in self._registers[unit]:
                sock.send(body, self._zmq.NOBLOCK)
            self._pending[unit] = len(self._registers[unit])
            c["requests"] += self._pending[unit]
        else:
            self._counter += 1
            rid = b"%d" % self._counter
            head, tail = self._beats[unit]
            sock.send(head + rid + tail, self._zmq.NOBLOCK)
            self._rids[unit] = rid
            self._sent_at[unit] = now
            self._pending[unit] = 1
            c["requests"] += 1
            c["heartbeat_requests"] += 1
        poller.register(sock, self._zmq.POLLIN)

    def _error(self, reply: bytes) -> None:
        self.counters["errors"] += 1
        if self.first_error is None:
            self.first_error = reply[:300].decode(errors="replace")

    def _reply(self, unit: int, reply: bytes, now: float, poller: Any) -> None:
        c = self.counters
        c["replies"] += 1
        if self._registering[unit]:
            if reply.startswith(_HEARTBEAT_OK):
                rid = json.loads(reply)["id"]
                if rid in self._confirmed[unit]:  # registered again (sent again, or unknown)
                    c["reregistered"] += 1
                else:
                    self._confirmed[unit].add(rid)
                    c["registered"] += 1
            else:
                self._error(reply)
            self._pending[unit] -= 1
        else:
            ok = reply.startswith(_HEARTBEAT_OK) and b'"id":"' + self._rids[unit] + b'"' in reply
            self._pending[unit] = 0
            if ok and _NONE_UNKNOWN in reply:
                c["renewed"] += self.per_unit
                self._samples_us.append(int((now - self._sent_at[unit]) * 1e6))
            elif ok:
                unknown = json.loads(reply)["result"]["unknown"]
                c["unknown"] += len(unknown)
                c["renewed"] += self.per_unit - len(unknown)
                # as the registrar does: register what discovery does not know, right away
                base = (self._first + unit) * self.per_unit
                for name in unknown:
                    self._socks[unit].send(
                        self._registers[unit][int(name.rsplit("-", 1)[1]) - base],
                        self._zmq.NOBLOCK,
                    )
                self._pending[unit] = len(unknown)
                self._registering[unit] = bool(unknown)
                c["requests"] += len(unknown)
            else:
                self._error(reply)
        if not self._pending[unit]:
            self._registering[unit] = False
            poller.unregister(self._socks[unit])

    def snapshot(self) -> dict[str, Any]:
        """The counters so far, the heartbeat round trips since the last snapshot, CPU time."""
        samples, self._samples_us = self._samples_us, []
        return {
            "t": time.monotonic(),
            "cpu_s": time.process_time(),
            **self.counters,
            "first_error": self.first_error,
            "samples_us": samples,
        }

    def run(self, stdin_fd: int, reply: Any) -> None:
        """Turns on schedule until stdin says `stop` or closes; `mark` replies a snapshot."""
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(stdin_fd, zmq.POLLIN)
        start = time.monotonic()
        # (when, unit), sorted: a valid heap; units start one after another over the ramp
        turns = [(start + unit * self.ramp_s / self.units, unit) for unit in range(self.units)]
        buffered = b""
        monotonic = time.monotonic
        while True:
            now = monotonic()
            # a bounded batch of due turns, then replies and commands; like the registrar
            # (next heartbeat = now + interval) a late unit skips the turns it missed
            for _ in range(256):
                when, unit = turns[0]
                if when > now:
                    break
                self._turn(unit, now, poller)
                heapq.heapreplace(turns, (now + self.period_s, unit))
            wait_ms = max(0, int((turns[0][0] - monotonic()) * 1000) + 1)
            for sock, _ in poller.poll(wait_ms):
                if sock == stdin_fd:
                    chunk = os.read(stdin_fd, 4096)
                    if not chunk:
                        return
                    buffered += chunk
                    while b"\n" in buffered:
                        line, buffered = buffered.split(b"\n", 1)
                        cmd = json.loads(line)["cmd"]
                        reply(self.snapshot())
                        if cmd == "stop":
                            return
                    continue
                unit = self._unit_of[sock]
                now = monotonic()
                while self._pending[unit]:
                    try:
                        self._reply(unit, sock.recv(zmq.NOBLOCK), now, poller)
                    except zmq.Again:
                        break

    def close(self) -> None:
        for sock in self._socks:
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()


def heartbeat_load_main(max_seconds: float) -> None:
    """A load-generator process: one `start` command (JSON line on stdin), then turns until
    `stop` (or stdin closing); `mark` and `stop` reply a snapshot of the counters."""
    killer = threading.Timer(max_seconds, os._exit, (3,))
    killer.daemon = True
    killer.start()

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    line = sys.stdin.readline()
    if not line:
        return
    try:
        load = _HeartbeatLoad(json.loads(line))
    except Exception as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return
    reply({"started": True})
    try:
        load.run(sys.stdin.fileno(), reply)
    finally:
        load.close()


def _raise_fd_limit(needed: int) -> None:
    """Let this process and its children open `needed` descriptors (sockets), if allowed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _scrape(http_url: str) -> dict[str, float]:
    """The discovery service's own /metrics, as {sample name with labels: value}."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only
    with opener.open(f"{http_url}/metrics", timeout=5.0) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


_EXPIRIES = "labmesh_discovery_expiries_total"
_UNKNOWN_BEATS = 'labmesh_discovery_heartbeats_total{result="unknown"}'
_REGISTERED = "labmesh_discovery_registered_devices"


class DiscoveryBench:
    """Runs `labmesh discovery` (the real command, in its own process, 127.0.0.1, no beacon)
    through a lookup latency run and two registry capacity runs."""

    def __init__(self, bench: Bench, counts: Counts, dcounts: DiscoveryCounts) -> None:
        self.bench = bench
        self.counts = counts
        self.dcounts = dcounts

    def _start_service(self, name: str, ttl_s: float) -> tuple[Proc, str, str]:
        argv = [
            sys.executable, "-m", "labmesh.cli", "discovery",
            "--address", "tcp://127.0.0.1:0", "--pub", "tcp://127.0.0.1:0",
            "--http-host", "127.0.0.1", "--http-port", "0",
            "--ttl", str(ttl_s), "--no-beacon",
        ]  # fmt: skip
        proc = Proc(argv, name, self.bench.log_dir, env=self.bench.env)
        try:
            line = proc.readline(30.0)
            found = re.search(r"API (\S+), changes \S+, HTTP (\S+);", line)
            if not found:
                raise RuntimeError(f"labmesh discovery did not announce itself: {line!r}")
        except BaseException:
            self._stop_service(proc)
            raise
        return proc, found.group(1), found.group(2)

    @staticmethod
    def _stop_service(proc: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # how `labmesh discovery` is stopped
        proc.stop()

    def run(self) -> dict[str, Any]:
        _raise_fd_limit(self.dcounts.servers * 3 + 1024)
        out: dict[str, Any] = {"lookup": self.lookup()}
        out["capacity"] = [
            self.capacity(per_unit=1),
            self.capacity(per_unit=self.dcounts.devices_per_host),
        ]
        return out

    # ---- lookup round trip -------------------------------------------------------------------
    def lookup(self) -> dict[str, Any]:
        specs = [
            ServerSpec("lookup_raw", "raw DEALER (the floor's client), lookup", [], "lookup"),
            ServerSpec("lookup_resolver", "labmesh Resolver.lookup", [], "resolver"),
        ]
        print("discovery: lookup round trip ...", file=sys.stderr, flush=True)
        runs: dict[str, list[dict[str, Any]]] = {spec.key: [] for spec in specs}
        try:
            service, api, _ = self._start_service("discovery-lookup", LOOKUP_TTL_S)
        except (RuntimeError, TimeoutError, OSError) as exc:
            return {"error": str(exc)}
        try:
            _register_records(api, self.dcounts.lookup_records)
            for round_no in range(self.counts.rounds):
                shift = round_no % len(specs)
                for spec in specs[shift:] + specs[:shift]:
                    runs[spec.key].append(
                        self.bench._run(
                            service,
                            spec,
                            api,
                            1,
                            self.counts.latency_calls,
                            self.counts.latency_warmup,
                            record=True,
                        )
                    )
        except (RuntimeError, TimeoutError, OSError) as exc:
            self.bench.restart_workers()
            return {"error": f"{exc} [discovery stderr: {service.stderr_tail(300)}]"}
        finally:
            self._stop_service(service)
        result: dict[str, Any] = {"records": self.dcounts.lookup_records, "clients": {}}
        for spec in specs:
            lats = [run["latency"] for run in runs[spec.key]]
            result["clients"][spec.key] = {
                "label": spec.label,
                "n": sum(lat["n"] for lat in lats),
                "p50_us": round(statistics.median(lat["p50_us"] for lat in lats), 1),
                "p99_us": round(statistics.median(lat["p99_us"] for lat in lats), 1),
                "p50_us_per_round": [lat["p50_us"] for lat in lats],
                "server_cpu_us_per_call": round(
                    statistics.median(run["server_cpu_us_per_call"] for run in runs[spec.key]), 1
                ),
            }
        return result

    # ---- registry capacity ---------------------------------------------------------------------
    def capacity(self, per_unit: int) -> dict[str, Any]:
        d = self.dcounts
        units = d.servers // per_unit
        scenario = (
            f"{units} servers, one heartbeat request each"
            if per_unit == 1
            else f"{units} hosts x {per_unit} devices, one batched heartbeat per host"
        )
        result: dict[str, Any] = {
            "scenario": scenario,
            "records": units * per_unit,
            "units": units,
            "devices_per_unit": per_unit,
            "generators": LOAD_GENERATORS,
            "period_s": HEARTBEAT_PERIOD_S,
            "ttl_s": CAPACITY_TTL_S,
        }
        print(f"discovery: registry capacity, {scenario} ...", file=sys.stderr, flush=True)
        try:
            service, api, http = self._start_service(
                f"discovery-capacity-{per_unit}", CAPACITY_TTL_S
            )
        except (RuntimeError, TimeoutError, OSError) as exc:
            return {**result, "error": str(exc)}
        limit = str(d.window_s + 120)
        generators: list[Proc] = []
        try:
            idle0, t_idle = service.cpu_seconds(), time.monotonic()
            time.sleep(1.0)  # the service's own ticks (expiry, change feed hello, HTTP poll)
            idle_cores = (service.cpu_seconds() - idle0) / (time.monotonic() - t_idle)
            ramp_s = HEARTBEAT_PERIOD_S * max(1, math.ceil(result["records"] / REGISTER_RATE))
            share = [
                units // LOAD_GENERATORS + (i < units % LOAD_GENERATORS)
                for i in range(LOAD_GENERATORS)
            ]
            first = 0
            for i, n in enumerate(share):
                gen = Proc(
                    [sys.executable, __file__, "--heartbeat-load", "--max-seconds", limit],
                    f"heartbeat-load-{per_unit}-{i}",
                    self.bench.log_dir,
                    env=self.bench.env,
                )
                generators.append(gen)
                gen.send(
                    {
                        "cmd": "start",
                        "address": api,
                        "first": first,
                        "units": n,
                        "per_unit": per_unit,
                        "period_s": HEARTBEAT_PERIOD_S,
                        "ramp_s": ramp_s,
                    }
                )
                first += n
            for gen in generators:
                started = gen.recv(30.0)
                if "error" in started:
                    raise RuntimeError(f"{gen.name}: {started['error']}")
            # every unit registers during the ramp, then heartbeats once more before the window;
            # a service that cannot keep up is measured anyway (the table shows what it lost)
            t_setup = time.monotonic()
            deadline = t_setup + ramp_s + 5 * HEARTBEAT_PERIOD_S + 10.0
            registered = 0
            while registered < result["records"] and time.monotonic() < deadline:
                time.sleep(0.1)
                registered = sum(m["registered"] for m in self._mark(generators))
            result["setup_s"] = round(time.monotonic() - t_setup, 2)
            result["registered_before_window"] = registered
            time.sleep(HEARTBEAT_PERIOD_S * 1.5)
            before = _scrape(http)
            ours = {os.getpid(), service.pid, *(gen.pid for gen in generators)}
            others0 = _cpu_of_others(ours)
            cpu0, t0 = service.cpu_seconds(), time.monotonic()
            marks0 = self._mark(generators)
            time.sleep(d.window_s)
            cpu1, t1 = service.cpu_seconds(), time.monotonic()
            marks1 = self._mark(generators)
            others1 = _cpu_of_others(ours)
            after = _scrape(http)
            if not service.alive():
                raise RuntimeError("labmesh discovery exited during the run")
        except (RuntimeError, TimeoutError, OSError) as exc:
            return {**result, "error": f"{exc} [discovery stderr: {service.stderr_tail(300)}]"}
        finally:
            for gen in generators:
                gen.stop()
            self._stop_service(service)
        seconds = t1 - t0

        def delta(key: str) -> int:
            return sum(b[key] - a[key] for a, b in zip(marks0, marks1, strict=True))

        requests = delta("requests")
        samples = sorted(s for m in marks1 for s in m["samples_us"])
        result.update(
            window_s=round(seconds, 2),
            requests_per_s=round(requests / seconds, 1),
            heartbeats_per_s=round(delta("renewed") / seconds, 1),
            expected_heartbeats_per_s=round(result["records"] / HEARTBEAT_PERIOD_S, 1),
            cpu_cores=round((cpu1 - cpu0) / seconds, 3),
            idle_cpu_cores=round(idle_cores, 3),
            cpu_us_per_request=round((cpu1 - cpu0) / requests * 1e6, 1) if requests else None,
            heartbeat_p50_us=_percentile(samples, 0.50),
            heartbeat_p99_us=_percentile(samples, 0.99),
            expired_in_window=int(after[_EXPIRIES] - before[_EXPIRIES]),
            expired_before_window=int(before[_EXPIRIES]),
            unknown_in_window=int(after[_UNKNOWN_BEATS] - before[_UNKNOWN_BEATS]),
            timeouts_in_window=delta("timeouts"),
            timeouts_before_window=sum(m["timeouts"] for m in marks0),
            reregistered_in_window=delta("reregistered"),
            errors=sum(m["errors"] for m in marks1),
            first_error=next((m["first_error"] for m in marks1 if m["first_error"]), None),
            registered_at_end=int(after[_REGISTERED]),
            generator_cpu_cores=round(delta("cpu_s") / seconds, 3),
            # what every other process on the machine used meanwhile (contention)
            other_cpu_cores=round((others1 - others0) / seconds, 2),
        )
        return result

    @staticmethod
    def _mark(generators: list[Proc]) -> list[dict[str, Any]]:
        for gen in generators:
            gen.send({"cmd": "mark"})
        return [gen.recv(10.0) for gen in generators]


def _cpu_of_others(exclude: set[int]) -> float:
    """CPU seconds of every process but `exclude`, with the reaped children of each (so a
    process that ended since is still counted, in its parent), from /proc."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def _percentile(ordered: list[int], q: float) -> float | None:
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else None


def _register_records(address: str, count: int) -> None:
    """Register `count` records (LOOKUP_NAME among them) over one DEALER, pipelined."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        instance = secrets.token_hex(6)
        for i in range(max(count, 43)):
            record = bench_record(i, f"bench-host-{i // 10:05d}", instance)
            sock.send(json.dumps({"type": "register", "record": record, "id": i}).encode())
        for _ in range(max(count, 43)):
            if not sock.poll(10000):
                raise TimeoutError("discovery did not answer a register within 10 s")
            reply = json.loads(sock.recv())
            if reply.get("status") != "ok":
                raise RuntimeError(f"register refused: {str(reply)[:300]}")
    finally:
        sock.close(linger=0)
        ctx.term()


def discovery_report(
    disc: dict[str, Any], floor: ServerResult, counts: Counts, dcounts: DiscoveryCounts
) -> str:
    """The discovery section: the lookup table and the registry capacity table."""
    lines = [
        "discovery (`labmesh discovery` in its own process on 127.0.0.1, no beacon):",
        "",
        f"lookup round trip: 1 client process, {counts.latency_calls} sequential lookups of one "
        f"name among {dcounts.lookup_records} registered records (each with a resource tree), "
        f"median of {counts.rounds} rounds; (x) = ratio to the floor's query round trip above:",
        "",
    ]
    lookup = disc["lookup"]
    if "error" in lookup:
        lines.append(f"lookup run failed: {_one_line(lookup['error'], 300)}")
    else:
        lines += [
            "| client | lookup p50 us | lookup p99 us | discovery CPU us/lookup | p50 per round |",
            "|---|---|---|---|---|",
        ]
        for run in lookup["clients"].values():
            lines.append(
                f"| {run['label']} | {run['p50_us']:.0f}{_ratio(run['p50_us'], _p50(floor))} | "
                f"{run['p99_us']:.0f}{_ratio(run['p99_us'], _p99(floor))} | "
                f"{run['server_cpu_us_per_call']:.0f} | "
                + " / ".join(f"{p:.0f}" for p in run["p50_us_per_round"])
                + " |"
            )
    lines += [
        "",
        f"registry capacity: {dcounts.servers} device records renewed every "
        f"{HEARTBEAT_PERIOD_S:g} s (TTL {CAPACITY_TTL_S:g} s; labmesh's registrar heartbeats "
        f"every TTL/3), {LOAD_GENERATORS} load-generator processes, each unit with its own "
        f"connection, turns spread evenly over the period; measured over {dcounts.window_s:g} s "
        "after every record registered and heartbeated once; CPU = the discovery process's "
        "utime+stime from /proc over the window:",
        "",
        "| scenario | requests/s | heartbeats/s (records renewed) | discovery CPU (one core) "
        "| CPU us/request | heartbeat p50 / p99 us | expired in window | unknown heartbeats "
        "| timed out, sent again | registered at end | generators CPU (cores) "
        "| other processes' CPU (cores) |",
        "|" + "---|" * 12,
    ]
    for run in disc["capacity"]:
        if "error" in run:
            lines.append(
                f"| {run['scenario']} | failed: {_one_line(run['error'], 300)} |" + " |" * 10
            )
            continue
        lines.append(
            f"| {run['scenario']} | {run['requests_per_s']:.0f} | {run['heartbeats_per_s']:.0f} "
            f"of {run['expected_heartbeats_per_s']:.0f} | {run['cpu_cores'] * 100:.1f}% "
            f"(idle {run['idle_cpu_cores'] * 100:.0f}%) | "
            f"{_figure(run['cpu_us_per_request'])} | {_figure(run['heartbeat_p50_us'])} / "
            f"{_figure(run['heartbeat_p99_us'])} | {run['expired_in_window']} | "
            f"{run['unknown_in_window']} | {run['timeouts_in_window']} | "
            f"{run['registered_at_end']} of {run['records']} | {run['generator_cpu_cores']:.2f} | "
            f"{run['other_cpu_cores']:.2f} |"
        )
        if run["registered_before_window"] < run["records"]:
            lines.append(
                f"  ({run['scenario']}: only {run['registered_before_window']} of "
                f"{run['records']} records registered in {run['setup_s']:.0f} s of setup, "
                f"{run['expired_before_window']} expired, {run['timeouts_before_window']} "
                "requests timed out)"
            )
        if run["other_cpu_cores"] > 0.25:
            lines.append(
                f"  ({run['scenario']}: other processes kept {run['other_cpu_cores']:.2f} of "
                f"{os.cpu_count()} CPUs busy during the window, competing with the service and "
                "the generators: noisy figures, and any timeouts or expiries may be the "
                "machine's)"
            )
        if run["errors"]:
            lines.append(f"  ({run['errors']} error replies; first: {run['first_error']})")
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def discovery_targets(disc: dict[str, Any], floor: ServerResult) -> list[dict[str, Any]]:
    """Lookup p50 <= 2x the floor (through labmesh's Resolver); CPU < 0.5 core with every
    record alive, for both capacity scenarios."""
    targets = []
    run = disc["lookup"].get("clients", {}).get("lookup_resolver")
    ratio = run["p50_us"] / _p50(floor) if run and _p50(floor) else None
    targets.append(
        {
            "server": "labmesh discovery",
            "measured_by": "lookup, 1 client (Resolver.lookup)",
            "target": f"lookup p50 <= {TARGET_LOOKUP_P50_VS_FLOOR:g}x floor",
            "ratio": _round(ratio),
            "met": ratio is not None and ratio <= TARGET_LOOKUP_P50_VS_FLOOR,
        }
    )
    for run in disc["capacity"]:
        ok = "error" not in run
        alive = (
            ok
            and run["registered_before_window"] == run["records"]
            and run["expired_in_window"] == 0
            and run["registered_at_end"] == run["records"]
        )
        targets.append(
            {
                "server": "labmesh discovery",
                "measured_by": f"registry capacity: {run['scenario']}",
                "target": f"CPU < {TARGET_DISCOVERY_CPU_CORES:.0%} of one core, none expired",
                "ratio": run["cpu_cores"] if ok else None,
                "measured": f"{run['cpu_cores']:.1%}, {run['expired_in_window']} expired"
                if ok
                else "failed",
                "met": alive and run["cpu_cores"] < TARGET_DISCOVERY_CPU_CORES,
            }
        )
    return targets


#: The clients a worker can run, by the name a `prepare` command gives.
_CLIENTS = {
    "raw": _RawClient,
    "labmesh": _LabmeshClient,
    "lookup": _LookupClient,
    "resolver": _ResolverClient,
}


def _load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _git_state() -> str:
    """The commit measured, marked dirty when services/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "services"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head or '?'}{' + uncommitted changes in services/' if dirty else ''}"


# ---- LAPLACE-LHC: GET round trip against the real ServerLHC --------------------------------
LAPLACE_PEER = REPO / "tests" / "interop" / "laplace_peer_server.py"
LAPLACE_LABMESH = REPO / "tests" / "interop" / "laplace_labmesh_server.py"
#: The LAPLACE master's polling period (it sends PING then GET to every server); the sparse run
#: draws each interval from LAPLACE_POLL_S +- LAPLACE_POLL_JITTER_S, because at exactly 300 ms
#: after its previous request ServerLHC is always inside its 100 ms poll, never in the 10 ms
#: sleep between two polls, which a real master's timer, GUI and other clients do hit.
LAPLACE_POLL_S = 0.3
LAPLACE_POLL_JITTER_S = 0.1
TARGET_LAPLACE_SPARSE_P99_US = 1000.0


@dataclass(frozen=True)
class LaplaceCounts:
    """GETs per server back to back, and ticks of sparse polling (one every LAPLACE_POLL_S)."""

    back_to_back: int
    sparse_ticks: int


DEFAULT_LAPLACE_COUNTS = LaplaceCounts(5000, 300)
QUICK_LAPLACE_COUNTS = LaplaceCounts(300, 10)


def _laplace_message(cmd: str, payload: dict[str, Any], msg: str) -> bytes:
    """A request exactly as the LAPLACE master's laplace_server.protocol builders make it."""
    return json.dumps({"from": "Master", "to": "peer", "cmd": cmd, "payload": payload,
                       "version": "0.2.2", "error_msg": None, "msg": msg}).encode()


def _laplace_exchange(sock: Any, body: bytes, cmd: str) -> None:
    sock.send(body)
    reply = json.loads(sock.recv())  # decoded, as the master's recv_json does
    if reply.get("cmd") != cmd or reply.get("error_msg") is not None:
        raise RuntimeError(f"unexpected reply to {cmd}: {str(reply)[:200]}")


def laplace_bench(interop_python: str, env: dict[str, str], log_dir: Path,
                  lcounts: LaplaceCounts) -> dict[str, Any]:
    """GET round trips of laplace-server's ServerLHC and of labmesh, in the same run.

    Each server in its own process on 127.0.0.1, serving {"positions": [0, 0], "unit": "mm"}:
    the real ServerLHC (interop venv; tests/interop/laplace_peer_server.py), labmesh's
    LaplaceServer, and a simulated MotorStage behind a DeviceServer with a LaplaceAdapter (its
    GET reads the stage's four parameters and positions), and the floor: a bare pyzmq REP
    socket answering with a fixed reply (what this machine's sockets and wake-ups cost alone).
    The client is this process with one REQ socket per server, as the master has, sending the
    master's request bytes and decoding every reply. Back to back: sequential GETs, the servers
    interleaved one GET at a time. Sparse: every LAPLACE_POLL_S on average (seeded jitter) each
    server gets a GET alone (even ticks) or the master's PING+GET (odd ticks, the pair timed),
    so it has idled in between as under a real master.
    """
    import random
    import socket

    import zmq

    specs = [("floor", "floor: bare pyzmq REP, fixed reply",
              [sys.executable, str(LAPLACE_LABMESH), "0", "--floor"]),
             ("labmesh", "labmesh LaplaceServer",
              [sys.executable, str(LAPLACE_LABMESH), "0"]),
             ("labmesh_stage", "labmesh MotorStage + LaplaceAdapter",
              [sys.executable, str(LAPLACE_LABMESH), "0", "--stage"])]
    note = None
    if Path(interop_python).exists():
        with contextlib.closing(socket.socket()) as probe:  # ServerLHC needs a port number
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        specs.insert(1, ("laplace_server", "laplace-server ServerLHC",
                         [interop_python, str(LAPLACE_PEER), str(port), "--quiet",
                          "--max-lifetime", "600"]))
    else:
        note = f"laplace-server not measured: no interop virtualenv at {interop_python}"
    ctx = zmq.Context()
    procs: list[Proc] = []
    socks: dict[str, Any] = {}
    out: dict[str, Any] = {"servers": {}, "note": note,
                           "counts": dataclasses.asdict(lcounts), "poll_s": LAPLACE_POLL_S,
                           "poll_jitter_s": LAPLACE_POLL_JITTER_S}
    get = _laplace_message("GET", {}, "Get values.")
    ping = _laplace_message("PING", {"PING": None}, "Alive?")
    try:
        for key, label, argv in specs:
            proc = Proc(argv, f"laplace-{key}", log_dir, env=env)
            procs.append(proc)
            out["servers"][key] = {"label": label}
            try:
                line = proc.readline(30.0)
                if not line.startswith("READY "):
                    raise RuntimeError(f"{label} said {line!r} instead of READY")
            except (TimeoutError, RuntimeError) as exc:
                out["servers"][key]["error"] = str(exc)
                continue
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 2000)  # the master's timeout
            sock.connect(line.split(" ", 1)[1].strip())
            socks[key] = sock
        samples: dict[str, dict[str, list[int]]] = {
            key: {"back_to_back": [], "sparse_get": [], "sparse_ping_get": []} for key in socks}
        clock = time.perf_counter_ns

        def timed(key: str, series: str | None, *bodies: tuple[bytes, str]) -> None:
            if key not in socks:
                return
            try:
                started = clock()
                for body, cmd in bodies:
                    _laplace_exchange(socks[key], body, cmd)
                if series is not None:
                    samples[key][series].append(clock() - started)
            except (zmq.ZMQError, RuntimeError, ValueError) as exc:
                out["servers"][key]["error"] = f"{series}: {exc}"
                socks.pop(key).close(0)

        keys = list(socks)
        for key in keys:
            for _ in range(200):
                timed(key, None, (get, "GET"))  # warm-up
        print(f"LAPLACE: {lcounts.back_to_back} GETs back to back per server ...",
              file=sys.stderr, flush=True)
        for i in range(lcounts.back_to_back):
            for key in keys[i % len(keys):] + keys[:i % len(keys)]:
                timed(key, "back_to_back", (get, "GET"))
        print(f"LAPLACE: {lcounts.sparse_ticks} sparse polls, one every {LAPLACE_POLL_S} s ...",
              file=sys.stderr, flush=True)
        jitter = random.Random(0)
        tick = time.monotonic()
        for i in range(lcounts.sparse_ticks):
            tick += LAPLACE_POLL_S + jitter.uniform(-LAPLACE_POLL_JITTER_S, LAPLACE_POLL_JITTER_S)
            time.sleep(max(0.0, tick - time.monotonic()))
            for key in keys[i % len(keys):] + keys[:i % len(keys)]:
                if i % 2 == 0:
                    timed(key, "sparse_get", (get, "GET"))
                else:
                    timed(key, "sparse_ping_get", (ping, "PING"), (get, "GET"))
        for key, series in samples.items():
            for name, values in series.items():
                if values:
                    out["servers"][key][name] = _percentiles(values)
            sparse = series["sparse_get"]
            out["servers"][key]["sparse_get_over_1ms"] = sum(v > 1_000_000 for v in sparse)
    finally:
        for sock in socks.values():
            sock.close(0)
        ctx.term()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)  # both servers stop on SIGTERM
            proc.stop()
    return out


def laplace_report(lap: dict[str, Any]) -> str:
    """The LAPLACE section as a markdown table (us)."""
    def cell(run: dict[str, Any], series: str) -> str:
        s = run.get(series)
        return f"{s['p50_us']:.0f} / {s['p99_us']:.0f} / {s['max_us']:.0f}" if s else "n/a"

    counts = lap["counts"]
    lines = [f"LAPLACE-LHC GET round trip (us, p50 / p99 / max), one REQ client sending the "
             f"master's bytes: {counts['back_to_back']} GETs back to back per server, then "
             f"{counts['sparse_ticks']} polls one every {lap['poll_s']:g} +- "
             f"{lap['poll_jitter_s']:g} s (GET alone, or the master's PING+GET timed as a "
             "pair):", "",
             "| server | back to back | sparse GET | sparse PING+GET | sparse GETs > 1 ms |",
             "|---|---|---|---|---|"]
    for run in lap["servers"].values():
        if "error" in run:
            lines.append(f"| {run['label']} | failed: {_one_line(run['error'])} | | | |")
            continue
        n = run.get("sparse_get", {}).get("n", 0)
        lines.append(f"| {run['label']} | {cell(run, 'back_to_back')} | "
                     f"{cell(run, 'sparse_get')} | {cell(run, 'sparse_ping_get')} | "
                     f"{run['sparse_get_over_1ms']} of {n} |")
    if lap.get("note"):
        lines += ["", lap["note"]]
    return "\n".join(lines)


def laplace_targets(lap: dict[str, Any]) -> list[dict[str, Any]]:
    """labmesh's GET p50 <= the real ServerLHC's (back to back); sparse GET p99 < 1 ms."""
    servers = lap["servers"]
    real = servers.get("laplace_server", {}).get("back_to_back")
    targets = []
    for key in ("labmesh", "labmesh_stage"):
        run = servers.get(key, {})
        mine = run.get("back_to_back")
        if key == "labmesh":
            ratio = mine["p50_us"] / real["p50_us"] if mine and real else None
            targets.append({"server": run.get("label", key),
                            "measured_by": "LAPLACE GET, back to back",
                            "target": "p50 <= laplace-server ServerLHC's p50",
                            "ratio": _round(ratio),
                            "measured": f"{mine['p50_us']:.0f} vs {real['p50_us']:.0f} us"
                            if mine and real else "n/a",
                            "met": ratio is not None and ratio <= 1.0})
        sparse = run.get("sparse_get")
        floor = servers.get("floor", {}).get("sparse_get")
        targets.append({"server": run.get("label", key),
                        "measured_by": f"LAPLACE GET, polled every {lap['poll_s']:g} s",
                        "target": f"p99 < {TARGET_LAPLACE_SPARSE_P99_US / 1000:g} ms",
                        "ratio": None,
                        "measured": (f"{sparse['p99_us']:.0f} us" if sparse else "n/a")
                        + (f" (floor {floor['p99_us']:.0f} us)" if floor else ""),
                        "met": bool(sparse) and sparse["p99_us"] < TARGET_LAPLACE_SPARSE_P99_US})
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--interop-python", default=str(DEFAULT_INTEROP_PYTHON),
                        help="Python of the virtualenv with plesty_lib (default: %(default)s)")
    parser.add_argument("--no-plesty-default-logging", action="store_true",
                        help="skip the PLESTY run with its own INFO logging")
    parser.add_argument("--profile-dir", metavar="DIR",
                        help="record every server with py-spy into DIR (folded stacks of the "
                             "samples where it holds the GIL, i.e. its Python work; one file per "
                             "server and round); py-spy slows the servers, so the figures of "
                             "such a run are not for publishing")
    parser.add_argument("--rounds", type=int, help="rounds to take the median of "
                        "(default: 3, or 1 with --quick)")
    parser.add_argument("--capacity-windows", default="4", metavar="W[,W...]",
                        help="requests each load generator keeps in flight in the server "
                             "capacity run; several (e.g. 1,4) make one run each, the first "
                             "is the one the targets use (default: %(default)s)")
    parser.add_argument("--no-discovery", action="store_true",
                        help="skip the discovery section (lookup round trip, registry capacity)")
    parser.add_argument("--no-laplace", action="store_true",
                        help="skip the LAPLACE-LHC section (GET round trip vs the real ServerLHC)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.max_seconds)
        return 0
    if args.heartbeat_load:
        heartbeat_load_main(args.max_seconds)
        return 0

    # Stop cleanly (every child ended by its PID) on Ctrl+C and on SIGTERM, also when started
    # in the background by a shell that set SIGINT to be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        windows = tuple(dict.fromkeys(int(w) for w in args.capacity_windows.split(",")))
    except ValueError:
        parser.error("--capacity-windows takes whole numbers separated by commas, e.g. 1,4")
    if not windows or not all(1 <= w <= 64 for w in windows):
        parser.error("--capacity-windows: each window must be 1 to 64")
    counts = QUICK_COUNTS if args.quick else DEFAULT_COUNTS
    dcounts = QUICK_DISCOVERY_COUNTS if args.quick else DEFAULT_DISCOVERY_COUNTS
    if args.rounds is not None:
        counts = dataclasses.replace(counts, rounds=max(1, min(args.rounds, 20)))
    started = time.monotonic()
    commit = _git_state()
    load_before = _load_average()
    with tempfile.TemporaryDirectory(prefix="labmesh-bench-") as tmp:
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        plesty_dir = Path(tmp) / "plesty-cwd"  # PLESTY writes logs/ into its working directory
        plesty_dir.mkdir()
        max_s = str(counts.run_limit_s * 10 + 60)
        specs, plesty_note = server_specs(args, max_s, str(plesty_dir))
        print(plesty_note, file=sys.stderr)
        # Servers and clients import a copy of labmesh taken now, so every round of this run
        # measures the same code even while someone edits services/.
        shutil.copytree(REPO / "services" / "labmesh", Path(tmp) / "src" / "labmesh",
                        ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src"), "PYTHONHASHSEED": "0"}
        bench = Bench(counts, log_dir, Path(args.profile_dir) if args.profile_dir else None, env,
                      windows)
        by_key: dict[str, list[ServerResult]] = {spec.key: [] for spec in specs}
        try:
            bench.start_workers(max(CONCURRENCY))
            for round_no in range(counts.rounds):
                # Rotate the order each round so no server always runs first (or last).
                shift = round_no % len(specs)
                for spec in specs[shift:] + specs[:shift]:
                    print(f"round {round_no + 1}/{counts.rounds}: {spec.label} ...",
                          file=sys.stderr, flush=True)
                    by_key[spec.key].append(bench.measure(spec, round_no))
            discovery = None if args.no_discovery else DiscoveryBench(bench, counts, dcounts).run()
            laplace = None if args.no_laplace else laplace_bench(
                args.interop_python, env, log_dir,
                QUICK_LAPLACE_COUNTS if args.quick else DEFAULT_LAPLACE_COUNTS)
        finally:
            bench.stop_workers()
        results = [combine(by_key[spec.key]) for spec in specs]

    floor = results[0]
    plesty = next((r for r in results if r.key == "plesty"), None)
    window = windows[0]
    targets = evaluate_targets(results, floor, plesty, window) if not floor.error else []
    if discovery is not None:
        targets += discovery_targets(discovery, floor)
    if laplace is not None:
        targets += laplace_targets(laplace)
    import zmq

    meta = {
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "quick": args.quick,
        "counts": {"latency_calls": counts.latency_calls,
                   "calls_per_client": counts.calls_per_client, "rounds": counts.rounds,
                   "capacity_requests_per_generator": counts.capacity_requests,
                   "capacity_limit_s": counts.capacity_limit_s,
                   "capacity_windows": list(windows),
                   "discovery": None if args.no_discovery else dataclasses.asdict(dcounts)},
        "plesty": plesty_note,
        "labmesh_commit": commit,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "profiled": bool(args.profile_dir),
    }
    print()
    print(f"labmesh bench: Python {meta['python']}, pyzmq {meta['pyzmq']} (libzmq "
          f"{meta['libzmq']}), {meta['cpus']} CPUs, labmesh {meta['labmesh_commit']}, "
          f"127.0.0.1; latency over "
          f"{counts.latency_calls} sequential queries, throughput with "
          f"{'/'.join(str(counts.calls_per_client[c]) for c in CONCURRENCY)} calls per client "
          f"for 1/4/16 clients; median of {counts.rounds} rounds; (x) = ratio to the floor; "
          "CPU = per call with 1 client / with 16 clients.")
    print()
    print("client library (1/4/16 client processes, each running build_client(...).query):")
    print()
    print(markdown_table(results, floor))
    print()
    gens = max(CONCURRENCY)
    for w in windows:
        print(f"server capacity ({gens} load generators): {gens} processes, each a raw DEALER "
              f"keeping up to {w} pre-encoded native queries in flight, "
              f"{counts.capacity_requests} per generator (at most {counts.capacity_limit_s:g} s), "
              "counting only replies checked correct (floor: its id; labmesh: its id and status "
              f"ok; PLESTY, which echoes no id: status ok); window {w}:")
        print()
        print(capacity_table(results, floor, plesty, w))
        print()
    if discovery is not None:
        print(discovery_report(discovery, floor, counts, dcounts))
        print()
    if laplace is not None:
        print(laplace_report(laplace))
        print()
    print("targets (throughput ones on both tables: 'client library' = the first table, "
          "'server capacity' = the load-generator one):")
    print()
    print(targets_table(targets))
    print()
    ceiling = _rps(floor, 16) / _rps(plesty, 16) if plesty and _rps(plesty, 16) and \
        _rps(floor, 16) else None
    if ceiling is not None and ceiling < TARGET_TPUT16_VS_PLESTY:
        assert plesty is not None
        print(f"Note (client library): the floor itself reaches only {ceiling:.2f}x "
              f"{plesty.label} with 16 clients here: the 16 client processes share the "
              f"{os.cpu_count()} CPUs with the server, so no server can reach "
              f"{TARGET_TPUT16_VS_PLESTY}x in that table on this machine.")
    meta["floor_vs_plesty_16_clients"] = round(ceiling, 2) if ceiling else None
    cap_floor, cap_plesty = _cap(floor, window), _cap(plesty, window)
    cap_ceiling = cap_floor / cap_plesty if cap_floor and cap_plesty else None
    meta["floor_vs_plesty_capacity"] = round(cap_ceiling, 2) if cap_ceiling else None
    if cap_ceiling is not None and cap_ceiling < TARGET_TPUT16_VS_PLESTY:
        assert plesty is not None
        print(f"Note (server capacity): the floor itself reaches only {cap_ceiling:.2f}x "
              f"{plesty.label} with the load generators.")
    floor_run = floor.capacity.get(window) if not floor.error else None
    if floor_run:
        busy = floor_run["server_cores_busy"]
        print(f"Note (server capacity): the floor's echo server was {busy:.2f} cores busy at "
              f"{floor_run['server_cpu_us_per_call']:.0f} us CPU per request while the "
              f"generators spent {floor_run['generator_cpu_us_per_call']:.0f} us per request"
              + (": the generators (sharing the CPUs), not the echo server, limit the floor "
                 "there, so ratios to the floor in that table overstate the other servers."
                 if busy < 0.9 else "."))
    if plesty is not None and not plesty.error:
        theirs = plesty.throughput[16]["server_cpu_us_per_call"]
        theirs_cap = plesty.capacity[window]["server_cpu_us_per_call"]
        for r in results:
            if not r.key.startswith("labmesh") or r.error:
                continue
            mine = r.throughput[16]["server_cpu_us_per_call"]
            mine_cap = r.capacity[window]["server_cpu_us_per_call"]
            print(f"Server CPU per request, 16 clients / capacity run: {r.label} {mine:.0f} / "
                  f"{mine_cap:.0f} us, {plesty.label} {theirs:.0f} / {theirs_cap:.0f} us "
                  f"({theirs / mine:.1f}x / {theirs_cap / mine_cap:.1f}x less).")
    print(plesty_note)
    if load_before is not None and load_before > 0.5:
        print(f"Warning: the 1-minute load average was {load_before:.2f} before the run; "
              "other work on this machine makes these figures noisy.")
    print(f"elapsed {meta['elapsed_s']} s" + ("  (PROFILED: py-spy attached)" if args.profile_dir
                                             else ""))
    if args.json:
        doc = {
            "meta": meta,
            "servers": {r.key: {"label": r.label, "latency": r.latency,
                                "throughput": {str(c): v for c, v in r.throughput.items()},
                                "cpu_us_per_call_1_client": r.cpu_us_per_call,
                                "capacity": {str(w): v for w, v in r.capacity.items()},
                                "error": r.error}
                        for r in results},
            "discovery": discovery,
            "laplace": laplace,
            "targets": targets,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    failed_discovery = discovery is not None and (
        "error" in discovery["lookup"] or any("error" in run for run in discovery["capacity"])
    )
    failed_laplace = laplace is not None and any(
        "error" in run for run in laplace["servers"].values())
    return 1 if any(r.error for r in results) or failed_discovery or failed_laplace else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench interrupted; every process it started was stopped", file=sys.stderr)
        sys.exit(130)
