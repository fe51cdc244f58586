"""Discovery: the lookup round trip and the registry's capacity under heartbeat load."""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import re
import secrets
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Counts, ServerSpec, bench_command
from bench.device import (
    Bench,
    Proc,
    ServerResult,
    _median_percentiles,
    _one_line,
    _p50,
    _p99,
    _ratio,
    _round,
)

# ---- discovery: lookup round trip and registry capacity ------------------------------------------
#: Targets of the discovery service (issue 5): a lookup costs at most 2x the floor's round trip;
#: 5,000 servers heartbeating at 1 Hz keep it below half a core.
TARGET_LOOKUP_P50_VS_FLOOR = 1.3
TARGET_DISCOVERY_CPU_CORES = 0.5
#: The capacity run's registration TTL: labmesh's registrar heartbeats every TTL/3, so 1 Hz.
CAPACITY_TTL_S = 3.0
HEARTBEAT_PERIOD_S = CAPACITY_TTL_S / 3
#: The lookup run's TTL: long enough that its records need no heartbeats during the run.
LOOKUP_TTL_S = 600.0
LOAD_GENERATORS = 4
#: Records registered per second while the capacity run sets up (servers starting up).
REGISTER_RATE = 1000


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
                "percentiles_us": _median_percentiles(lats),
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
                    bench_command("--heartbeat-load", "--max-seconds", limit),
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
