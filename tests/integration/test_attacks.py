"""Attacks on a real device server, as a lab would feel them.

Each test starts tests/attack_server.py (a MemoryMeter behind `DeviceServer(fixed_threading=True)`)
as a subprocess that logs to a file, reproduces one abuse against it over 127.0.0.1, bounded in
count and time, and asserts on what the lab feels while it lasts: the p99 latency of a separate
probe process pinging every 20 ms, the server's RSS (/proc/PID/status VmRSS) during and after,
the number of log lines written, that every refusal is an error reply, who holds the lock
afterwards, and that the server still answers.

Each failure message lists every number measured for its attack, not just the first one off.
See TESTING.md, "Attacks, as tests".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from support import wait_until

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = TESTS / "attack_server.py"

#: What a lab must not feel during (and after) any attack.
P99_LIMIT_MS = 50.0
RSS_LIMIT_MB = 100.0
LOG_LINES_LIMIT = 50
#: Bounds of the server being built (its defaults).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
PEER_QUEUE_LIMIT = 100
#: A probe ping without a reply within this long counts as this latency.
PROBE_TIMEOUT_S = 2.0
PROBE_INTERVAL_S = 0.02
#: How long after an attack the lab is still watched (backlog the server still works off).
SETTLE_S = 0.5

# The probe runs in its own process, so its latencies measure the server, not this process'
# GIL (which the attacking loop holds most of the time). One line per ping: "sent latency",
# latency -1 when no reply came within PROBE_TIMEOUT_S; monotonic clocks are system-wide.
PROBE = """
import json, os, sys, time, zmq
address, out_path, timeout_s, interval_s = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:5])
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(address)
out = open(out_path, "w", buffering=1)
n = 0
next_at = started = time.monotonic()
parent = os.getppid()
# bounded by itself: at most 180 s, and never beyond the test process that started it
while time.monotonic() - started < 180 and os.getppid() == parent:
    n += 1
    sent = time.monotonic()
    sock.send(json.dumps({"type": "ping", "id": n}).encode())
    latency = -1.0
    while (left := sent + timeout_s - time.monotonic()) > 0:
        if not sock.poll(left * 1000):
            break
        try:
            reply = json.loads(sock.recv_multipart()[-1])
        except ValueError:
            continue
        if isinstance(reply, dict) and reply.get("id") == n:
            latency = time.monotonic() - sent
            break
    out.write(f"{sent:.6f} {latency:.6f}\\n")
    next_at += interval_s
    delay = next_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    else:
        next_at = time.monotonic()
"""


# ---- the server subprocess --------------------------------------------------------------------
class ServerProcess:
    """tests/attack_server.py in a subprocess: its address, PID, log file and RSS."""

    def __init__(self, workdir: Path, options: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        self.out_path = workdir / "server.out"  # stdout and stderr: a file, never a pipe
        address_file = workdir / "server.addr"
        args = [sys.executable, str(SERVER_SCRIPT), str(self.log_path), str(address_file)]
        if options:
            args.append(json.dumps(options))
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid
        wait_until(lambda: address_file.exists() or self.proc.poll() is not None, timeout=30)
        if not address_file.exists():
            self.kill()
            raise AssertionError(
                f"attack server with options {options} did not start (exit status "
                f"{self.proc.returncode}):\n{self.out_path.read_text(errors='replace')[-3000:]}"
            )
        self.address, self.metrics_url = address_file.read_text().split()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the server's /metrics (0 when absent)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss_mb(self) -> float:
        """VmRSS of the server process, in MB (nan once it is gone)."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return math.nan

    def output_lines(self) -> list[str]:
        """Every line the server wrote so far: its log file, then its stdout/stderr."""
        lines: list[str] = []
        for path in (self.log_path, self.out_path):
            if path.exists():
                lines.extend(path.read_text(errors="replace").splitlines())
        return lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def start_server(tmp_path):
    """Start attack servers (options: extra DeviceServer keywords); all killed by PID after."""
    started: list[ServerProcess] = []

    def start(**options: Any) -> ServerProcess:
        server = ServerProcess(tmp_path / f"server{len(started)}", options)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def server(start_server) -> ServerProcess:
    """One attack server with the server's own defaults."""
    return start_server()


@pytest.fixture
def ctx():
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, 8192)  # thousands of short-lived peers, some still lingering
    try:
        yield context
    finally:
        context.destroy(linger=0)


# ---- wire helpers -----------------------------------------------------------------------------
def dealer(context: zmq.Context, address: str, identity: bytes | None = None, **opts) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, opts.pop("linger", 0))
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    for name, value in opts.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    sock.connect(address)
    return sock


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def parse(frames: list[bytes]) -> dict[str, Any]:
    """A reply from its frames (a REQ-style route puts an empty frame before the body)."""
    try:
        reply = json.loads(frames[-1])
    except ValueError:
        return {"status": "unparseable", "raw": frames[-1][:200]}
    return reply if isinstance(reply, dict) else {"status": "unparseable", "raw": reply}


def recv_reply(sock: zmq.Socket, timeout: float, want_id: Any = None) -> dict[str, Any] | None:
    """The next reply (with `id` == want_id when given) within `timeout` seconds, or None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(left * 1000):
            return None
        reply = parse(sock.recv_multipart())
        if want_id is None or reply.get("id") == want_id:
            return reply
    return None


def ask(sock: zmq.Socket, obj: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
    sock.send(encode(obj))
    return recv_reply(sock, timeout, obj.get("id"))


def drain(sock: zmq.Socket, replies: list[dict[str, Any]], wait_ms: int = 0) -> None:
    """Read every reply already there (waiting up to wait_ms for the first)."""
    if wait_ms and not sock.poll(wait_ms):
        return
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        replies.append(parse(frames))


def pump(sock: zmq.Socket, messages, replies: list[dict[str, Any]], deadline: float) -> int:
    """Send every message (a list of frames) while reading replies; returns how many were sent."""
    sent = 0
    for frames in messages:
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                break
            except zmq.Again:
                drain(sock, replies, wait_ms=5)
                if time.monotonic() > deadline:
                    return sent
        sent += 1
        if sent % 64 == 0:
            drain(sock, replies)
    return sent


def holders_of(locks_reply: dict[str, Any] | None, resource: str) -> list[str]:
    if not locks_reply or locks_reply.get("status") != "ok":
        return [f"<locks failed: {locks_reply}>"]
    return [
        row["client_id"]
        for row in locks_reply["result"]["holders"]
        if row.get("resource") == resource
    ]


def locks_now(context: zmq.Context, address: str) -> dict[str, Any] | None:
    sock = dealer(context, address)
    try:
        return ask(sock, {"type": "locks", "id": "locks"})
    finally:
        sock.close()


# ---- what the lab feels -----------------------------------------------------------------------
class Probe:
    """A separate process pinging the server every 20 ms, recording each latency."""

    def __init__(self, address: str, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROBE,
                address,
                str(path),
                str(PROBE_TIMEOUT_S),
                str(PROBE_INTERVAL_S),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_until(lambda: len(self.samples()) >= 3, timeout=15):
            self.stop()
            raise AssertionError("the ping probe did not get going")

    def samples(self) -> list[tuple[float, float]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sent, latency = map(float, parts)
                out.append((sent, latency if latency >= 0 else PROBE_TIMEOUT_S))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


class RssSampler(threading.Thread):
    def __init__(self, server: ServerProcess, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.max_mb = server.rss_mb()
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            rss = self.server.rss_mb()
            if not math.isnan(rss):
                self.max_mb = max(self.max_mb, rss)

    def stop(self) -> float:
        self._halt.set()
        self.join(2)
        return self.max_mb


@dataclass
class Felt:
    """What one attack did to the lab, and what went wrong (collected, reported together)."""

    attack: str
    numbers: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)

    def note(self, **numbers: Any) -> None:
        self.numbers.update(numbers)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def summary(self) -> str:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items())
        return f"[{self.attack}] {shown}"

    def verify(self) -> None:
        print(self.summary())
        sample = ""
        if self.log_lines:
            longest = max(self.log_lines, key=len)
            sample = (
                f"\nfirst log lines written: {[line[:200] for line in self.log_lines[:3]]}"
                f"\nlongest log line ({len(longest)} chars) starts: {longest[:200]!r}"
            )
        if self.problems:
            pytest.fail(
                self.summary() + "\n- " + "\n- ".join(self.problems) + sample, pytrace=False
            )


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@contextlib.contextmanager
def lab_watch(
    server: ServerProcess,
    tmp_path: Path,
    attack: str,
    rss_limit_mb: float = RSS_LIMIT_MB,
    log_line_limit: int | None = None,
    p99_limit_ms: float = P99_LIMIT_MS,
):
    """Watch the lab during the `with` block (the attack) and SETTLE_S after it, then check
    the common expectations: probe p99, RSS during and after, log lines, server answers."""
    probe = Probe(server.address, tmp_path / f"{attack}.probe")
    felt = Felt(attack)
    lines_before = len(server.output_lines())
    sampler = RssSampler(server)
    rss_before = server.rss_mb()
    start = time.monotonic()
    try:
        yield felt
        end = time.monotonic()
        time.sleep(SETTLE_S)
        rss_max = sampler.stop()
        latencies = [lat for sent, lat in probe.samples() if start <= sent <= end + SETTLE_S]
    finally:
        probe.stop()  # first: a probe process must never outlive the test
        sampler.stop()
    felt.log_lines = server.output_lines()[lines_before:]
    rss_after = server.rss_mb()
    answered = _ping_latency(server.address)
    worst = p99(latencies) * 1000 if latencies else math.inf
    felt.note(
        attack_s=round(end - start, 2),
        pings=len(latencies),
        lost_pings=sum(1 for lat in latencies if lat >= PROBE_TIMEOUT_S),
        p99_ms=worst,
        max_ping_ms=max(latencies, default=math.inf) * 1000,
        rss_before_mb=rss_before,
        rss_max_mb=rss_max,
        rss_after_mb=rss_after,
        log_lines=len(felt.log_lines),
        longest_log_line=max(map(len, felt.log_lines), default=0),
        answers_after=answered is not None,
    )
    felt.expect(len(latencies) >= 5, f"only {len(latencies)} probe pings during the attack")
    felt.expect(worst < p99_limit_ms, f"ping p99 {worst:.1f} ms >= {p99_limit_ms} ms")
    felt.expect(rss_max < rss_limit_mb, f"RSS peaked at {rss_max:.1f} MB >= {rss_limit_mb} MB")
    felt.expect(rss_after < RSS_LIMIT_MB, f"RSS after {rss_after:.1f} MB >= {RSS_LIMIT_MB} MB")
    felt.expect(
        len(felt.log_lines) < LOG_LINES_LIMIT,
        f"{len(felt.log_lines)} log lines written (limit {LOG_LINES_LIMIT})",
    )
    if log_line_limit is not None:
        longest = max(map(len, felt.log_lines), default=0)
        felt.expect(
            longest <= log_line_limit, f"a log line of {longest} chars (limit {log_line_limit})"
        )
    felt.expect(answered is not None, "the server does not answer a ping afterwards")
    felt.expect(server.proc.poll() is None, f"the server exited ({server.proc.returncode})")
    felt.verify()


def _ping_latency(address: str) -> float | None:
    context = zmq.Context()
    try:
        sock = dealer(context, address)
        start = time.monotonic()
        reply = ask(sock, {"type": "ping", "id": "after"}, timeout=3.0)
        sock.close()
        return time.monotonic() - start if reply and reply.get("status") == "ok" else None
    finally:
        context.destroy(linger=0)


# ---- 1. malformed frames ----------------------------------------------------------------------
def malformed(rng: random.Random, n: int) -> list[list[bytes]]:
    kinds = [
        lambda: [rng.randbytes(rng.randrange(1, 64))],  # random bytes
        lambda: [b'{"type": "ping", "x": "\xff\xfe"}'],  # bad UTF-8
        lambda: [b"\xc3\x28" + rng.randbytes(8)],
        lambda: [rng.choice([b"[1, 2, 3]", b"42", b'"ping"', b"null", b"true", b"3.5"])],
        lambda: [b'{"type": "ping"}', b'{"type": "ping"}'],  # several frames
        lambda: [b"", b"", rng.randbytes(4)],
        lambda: [b""],  # an empty delimiter and no body
        lambda: [b'{"type": "ping"'],  # truncated JSON
    ]
    return [rng.choice(kinds)() for _ in range(n)]


def test_5000_malformed_frames_from_one_peer(server, ctx, tmp_path):
    frames = malformed(random.Random(1), 5000)
    sock = dealer(ctx, server.address)
    replies: list[dict[str, Any]] = []
    with lab_watch(server, tmp_path, "malformed") as felt:
        sent = pump(sock, frames, replies, deadline=time.monotonic() + 10)
        wait_until(lambda: drain(sock, replies, 20) or len(replies) >= sent, timeout=5)
        types = Counter(r.get("type", r.get("status")) for r in replies)
        # a peer that falls behind reading may lose replies beyond the bound, counted
        dropped = server.metric("labmesh_replies_dropped_total", reason="peer_not_reading")
        felt.note(sent=sent, replies=len(replies), reply_types=dict(types), dropped=dropped)
        felt.expect(sent == len(frames), f"only {sent} of {len(frames)} frames could be sent")
        felt.expect(
            types["ProtocolError"] == len(replies) and len(replies) + dropped == len(frames),
            f"{types['ProtocolError']} ProtocolError replies and {dropped} counted drops for "
            f"{len(frames)} malformed frames",
        )
        sock.close()


def short_lived_peer(context: zmq.Context, address: str) -> zmq.Socket:
    """A DEALER whose send waits until it is connected (IMMEDIATE) and whose request still goes
    out after close (LINGER): thousands of these neither outrun the server's listen backlog nor
    lose their request, and none reads its reply."""
    return dealer(context, address, linger=1000, immediate=1, sndtimeo=1000)


def send_and_leave(
    context: zmq.Context, address: str, count: int, request: Callable[[int], dict[str, Any]]
) -> tuple[int, int, float]:
    """`count` short-lived peers each send `request(i)` and close without reading (at most
    12 s). Returns (sent, unsent, seconds)."""
    begun = time.monotonic()
    sent = unsent = 0
    while sent < count and time.monotonic() - begun < 12:
        sock = short_lived_peer(context, address)
        try:
            sock.send(encode(request(sent)))
            sent += 1
        except zmq.Again:
            unsent += 1
        sock.close()
    return sent, unsent, time.monotonic() - begun


# ---- 2. peers that leave before their reply ---------------------------------------------------
def test_2000_peers_leave_before_reading_their_reply(server, ctx, tmp_path):
    with lab_watch(server, tmp_path, "leavers") as felt:
        peers, unsent, loop_s = send_and_leave(
            ctx, server.address, 2000, lambda i: {"type": "describe", "id": i}
        )
        felt.note(peers=peers, unsent=unsent, loop_s=loop_s)
        felt.expect(peers == 2000, f"only {peers} peers sent their request within 12 s")
        time.sleep(1.0)  # the last requests reach the server, their replies find nobody


# ---- 3. peers that never read -----------------------------------------------------------------
def test_16_peers_send_10000_describes_each_and_never_read(server, ctx, tmp_path):
    peers = [
        dealer(ctx, server.address, sndhwm=100, rcvhwm=10, identity=f"flood-{i}".encode())
        for i in range(16)
    ]
    request = encode({"type": "describe"})
    accepted = [0] * len(peers)
    with lab_watch(server, tmp_path, "non-readers") as felt:
        deadline = time.monotonic() + 3.0
        for _ in range(10_000):
            if time.monotonic() > deadline:
                break
            for i, sock in enumerate(peers):
                try:
                    sock.send(request, zmq.NOBLOCK)
                    accepted[i] += 1
                except zmq.Again:
                    pass
        sent_s = time.monotonic() - (deadline - 3.0)
        time.sleep(2.0)  # the server works off what it took while nobody reads
        dropped = server.metric("labmesh_replies_dropped_total", reason="peer_not_reading")
        felt.note(
            send_s=sent_s,
            accepted=sum(accepted),
            accepted_min=min(accepted),
            rss_still_open_mb=server.rss_mb(),
            replies_dropped=dropped,
        )
        felt.expect(dropped > 0, "no reply to a peer that never reads was counted as dropped")
        for sock in peers:
            sock.close()


# ---- 4. lock waiters that vanish --------------------------------------------------------------
RESOURCE = "Dev1/port0/line0"


def connect(resources: Any = RESOURCE, **fields: Any) -> dict[str, Any]:
    return {"type": "connect", "resources": resources, **fields}


def test_5000_vanished_waiters_never_inherit_the_lock(server, ctx, tmp_path):
    holder = dealer(ctx, server.address, identity=b"lease-holder")
    granted = ask(holder, connect(lease=30, id=1, name="holder"))
    assert granted and granted["status"] == "ok", granted
    with lab_watch(server, tmp_path, "vanished-waiters") as felt:
        ghosts, unsent, loop_s = send_and_leave(
            ctx, server.address, 5000, lambda i: connect(wait=3600, id=i, name=f"ghost-{i}")
        )
        felt.note(ghosts=ghosts, unsent=unsent, loop_s=loop_s)
        felt.expect(ghosts == 5000, f"only {ghosts} waiters within 12 s")
        time.sleep(1.0)  # the last connects arrive and their peers are gone
        released = ask(
            holder, {"type": "disconnect", "session": granted["result"]["session"], "id": 2}
        )
        felt.expect(bool(released) and released["status"] == "ok", f"disconnect: {released}")
        live = dealer(ctx, server.address, identity=b"live-client")
        asked = time.monotonic()
        reply = ask(live, connect(wait=2.0, lease=10, id=3), timeout=4.0)
        took = time.monotonic() - asked
        holders = holders_of(locks_now(ctx, server.address), RESOURCE)
        felt.note(live_connect_s=took, live_reply=_brief(reply), holders=holders)
        felt.expect(
            bool(reply) and reply["status"] == "ok" and took < 2.2,
            f"the live client did not get {RESOURCE} within 2 s: {_brief(reply)} "
            f"after {took:.2f} s",
        )
        felt.expect(holders == ["live-client"], f"{RESOURCE} held by {holders}, not live-client")
        live.close()
        holder.close()


def test_waiters_beyond_max_waiters_are_refused_and_the_next_live_waiter_gets_the_lock(
    start_server, ctx, tmp_path
):
    server = start_server(max_waiters=20)
    holder = dealer(ctx, server.address, identity=b"lease-holder")
    granted = ask(holder, connect(lease=30, id="h"))
    assert granted and granted["status"] == "ok", granted
    with lab_watch(server, tmp_path, "max-waiters") as felt:
        waiters = [dealer(ctx, server.address, identity=f"waiter-{i}".encode()) for i in range(25)]
        early = []
        for i, sock in enumerate(waiters):
            # one at a time, so they queue in this order: a ping behind the connect on the same
            # connection is answered only after the connect was handled (at once: refused)
            sock.send(encode(connect(wait=30, lease=10, id=i)))
            before_ping = replies_until_pong(sock, timeout=1.0)
            early.append(next((r for r in before_ping if r.get("id") == i), None))
        within = [_brief(a) for a in early[:20]]
        beyond = [_brief(a) for a in early[20:]]
        felt.note(first_20=Counter(map(str, within)), beyond_20=beyond)
        felt.expect(all(a is None for a in early[:20]), f"the first 20 waiters got {within}")
        felt.expect(
            all(a is not None and a.get("type") == "BusyError" for a in early[20:]),
            f"waiters 21-25 got {beyond}, not BusyError at once",
        )
        for sock in waiters[:3]:  # the first three waiters vanish
            sock.close()
        time.sleep(0.3)
        released = ask(
            holder, {"type": "disconnect", "session": granted["result"]["session"], "id": "bye"}
        )
        felt.expect(bool(released) and released["status"] == "ok", f"disconnect: {released}")
        took = time.monotonic()
        fourth = recv_reply(waiters[3], 2.0, want_id=3)
        took = time.monotonic() - took
        holders = holders_of(locks_now(ctx, server.address), RESOURCE)
        felt.note(fourth=_brief(fourth), fourth_s=took, holders=holders)
        felt.expect(
            bool(fourth) and fourth["status"] == "ok",
            f"the first live waiter (waiter-3) did not get the lock within 2 s: {_brief(fourth)}",
        )
        felt.expect(holders == ["waiter-3"], f"{RESOURCE} held by {holders}, not waiter-3")
        for sock in waiters[3:]:
            sock.close()
        holder.close()


def replies_until_pong(sock: zmq.Socket, timeout: float) -> list[dict[str, Any]]:
    """Send a ping and return the replies that arrive before its pong (within `timeout`)."""
    sock.send(encode({"type": "ping", "id": "pong"}))
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while (reply := recv_reply(sock, deadline - time.monotonic())) is not None:
        if reply.get("id") == "pong":
            break
        replies.append(reply)
    return replies


def _brief(reply: dict[str, Any] | None) -> Any:
    if reply is None:
        return None
    if reply.get("status") == "ok":
        return "ok"
    return f"{reply.get('type')}: {str(reply.get('error'))[:160]}"


# ---- 5. a flood of device calls ---------------------------------------------------------------
def test_20000_pipelined_calls_while_the_device_is_busy(server, ctx, tmp_path):
    busy = dealer(ctx, server.address)
    busy.send(encode({"type": "call", "func": "sleep", "args": [2.0], "id": "busy"}))
    control = dealer(ctx, server.address)
    assert wait_until(
        lambda: (ask(control, {"type": "ping", "id": 0}) or {}).get("result", {}).get("busy"),
        timeout=2,
    ), "the device never got busy"
    sock = dealer(ctx, server.address)
    calls = [
        [encode({"type": "call", "func": "sleep", "args": [0.05], "id": i})] for i in range(20_000)
    ]
    replies: list[dict[str, Any]] = []
    with lab_watch(server, tmp_path, "call-flood") as felt:
        begun = time.monotonic()
        sent = pump(sock, calls, replies, deadline=begun + 10)
        sent_s = time.monotonic() - begun
        # 20,000 refusals at once: 1 s was enough on a quiet 2-core machine, but CI once saw
        # 19,320 of 19,900 by then (the same machine running other jobs); 2 s still tells
        # "refused at once" from "answered when their 5 s budgets run out"
        wait_until(lambda: drain(sock, replies, 20) or len(replies) >= sent - 110, timeout=2.0)
        refused_at_once = sum(1 for r in replies if r.get("type") == "BusyError")
        # every accepted call is answered by now: run, or its 5 s budget ran out unstarted
        wait_until(
            lambda: drain(sock, replies, 50) or len(replies) >= sent,
            timeout=max(0.0, begun + 6.5 - time.monotonic()),
        )
        types = Counter(r.get("type", r.get("status")) for r in replies)
        accepted = sent - types["BusyError"]
        messages = {r.get("error") for r in replies if r.get("type") == "BusyError"}
        felt.note(
            sent=sent,
            send_s=sent_s,
            busy_within_2s=refused_at_once,
            accepted=accepted,
            replies=len(replies),
            reply_types=dict(types),
            busy_message=next(iter(messages), None),
        )
        felt.expect(sent == len(calls), f"only {sent} of {len(calls)} calls could be sent")
        felt.expect(
            accepted <= PEER_QUEUE_LIMIT + 10,
            f"{accepted} calls accepted from one peer (limit {PEER_QUEUE_LIMIT})",
        )
        felt.expect(
            refused_at_once >= sent - PEER_QUEUE_LIMIT - 10,
            f"only {refused_at_once} BusyError replies within 2 s of the flood",
        )
        felt.expect(
            bool(messages) and all(str(PEER_QUEUE_LIMIT) in m for m in messages),
            f"BusyError messages do not name the depth {PEER_QUEUE_LIMIT}: {list(messages)[:3]}",
        )
        felt.expect(len(replies) == sent, f"{sent - len(replies)} calls never got a reply")
        counted = server.metric("labmesh_bound_refusals_total", bound="max_queue_per_session")
        felt.expect(
            counted == types["BusyError"],
            f"labmesh_bound_refusals_total counts {counted}, {types['BusyError']} were refused",
        )
        for s in (sock, busy, control):
            s.close()


# ---- 6. huge resource lists -------------------------------------------------------------------
# Decoding a 10 MB JSON array of a million distinct strings costs any Python server ~75 MB and
# ~0.2 s holding the GIL (json.loads is one C call), before it can see what the request asks. So
# during this attack RSS may rise by that one request (not after it), and pings may wait as long
# as the attacker's own reply may take (1 s) -- today they wait ~2 s.
HUGE_REQUEST_RSS_LIMIT_MB = RSS_LIMIT_MB + 80
HUGE_REQUEST_P99_LIMIT_MS = 1000.0


def test_connect_with_huge_resource_lists(server, ctx, tmp_path):
    sock = dealer(ctx, server.address, identity=b"hoarder")
    attempts = {  # name: (connect request, the error type it must get)
        "dev1_x400000": (connect(["Dev1"] * 400_000), "ProtocolError"),
        "unknown_x1000000": (connect([f"n{i}" for i in range(1_000_000)]), "ProtocolError"),
        # under the path limit: refused as unknown, naming a few and how many, not all 4000
        "unknown_x4000": (connect([f"nope{i}" for i in range(4000)]), None),
        "metadata_5000B": (connect(name="x" * 5000), "ProtocolError"),
    }
    with lab_watch(
        server,
        tmp_path,
        "huge-resources",
        rss_limit_mb=HUGE_REQUEST_RSS_LIMIT_MB,
        log_line_limit=1024,
        p99_limit_ms=HUGE_REQUEST_P99_LIMIT_MS,
    ) as felt:
        for n, (name, (request, wanted)) in enumerate(attempts.items()):
            body = encode({**request, "id": n})
            asked = time.monotonic()
            sock.send(body)
            frames = sock.recv_multipart() if sock.poll(5000) else None
            took = time.monotonic() - asked
            reply = parse(frames) if frames else None
            size = len(frames[-1]) if frames else 0
            felt.note(
                **{
                    f"{name}_MB": round(len(body) / 1e6, 3),
                    f"{name}_s": took,
                    f"{name}_reply_bytes": size,
                    f"{name}_reply": _brief(reply),
                }
            )
            felt.expect(
                reply is not None
                and reply.get("status") == "error"
                and (wanted is None or reply.get("type") == wanted)
                and took < 1.0,
                f"{name}: {_brief(reply)} after {took:.2f} s, not {wanted or 'an error'} "
                "within 1 s",
            )
            felt.expect(size < 4096, f"{name}: the reply is {size} bytes (limit 4096)")
            if name == "unknown_x4000" and reply:
                counts = [int(x) for x in re.findall(r"\d+", str(reply.get("error")))]
                felt.expect(
                    any(3990 <= count <= 4000 for count in counts),  # all, or "(+3995 more)"
                    f"{name}: the refusal does not say how many names are unknown (4000)",
                )
            if reply and reply.get("status") == "ok":
                ask(sock, {"type": "disconnect", "id": "undo"})
        sock.close()


# ---- 7. an oversize frame ---------------------------------------------------------------------
# The server has to receive a 40 MB frame to see its size: while it does, RSS may hold it once
# (plus allocator slack: 78-107 MB measured for a server that answers it), not after.
FRAME_RSS_LIMIT_MB = RSS_LIMIT_MB + 20


def test_40_MB_frame_gets_a_protocol_error(server, ctx, tmp_path):
    sock = dealer(ctx, server.address)
    head = b'{"type": "ping", "id": "big", "pad": "'
    body = head + b"x" * (40_000_000 - len(head) - 2) + b'"}'
    with lab_watch(server, tmp_path, "40MB-frame", rss_limit_mb=FRAME_RSS_LIMIT_MB) as felt:
        asked = time.monotonic()
        sock.send(body, copy=False)
        reply = recv_reply(sock, 2.5)
        took = time.monotonic() - asked
        felt.note(frame_bytes=len(body), reply=_brief(reply), reply_s=took)
        felt.expect(
            reply is not None and reply.get("type") == "ProtocolError" and took < 2.0,
            f"{_brief(reply)} after {took:.2f} s, not a ProtocolError within 2 s",
        )
        sock.close()
    assert len(body) > MAX_MESSAGE_BYTES * 2


# ---- 8. strangers and a PLESTY lock -----------------------------------------------------------
@pytest.mark.parametrize(
    "holder_id",
    [b"plesty-holder-7", b"\xff\xfe" + random.Random(8).randbytes(8)],  # the latter is not UTF-8
    ids=["utf8-id", "binary-id"],
)
def test_strangers_cannot_use_or_release_a_plesty_lock(server, ctx, tmp_path, holder_id):
    holder = dealer(ctx, server.address, identity=holder_id)
    granted = ask(holder, {"type": "connect", "resources": [RESOURCE], "id": "c"})
    assert granted and granted["status"] == "ok", granted
    client_id = holders_of(locks_now(ctx, server.address), RESOURCE)
    assert len(client_id) == 1, client_id
    client_id = client_id[0]
    strangers = {  # the one that can cut the holder off at the ZeroMQ level comes last
        "other-id": b"intruder-" + os.urandom(4).hex().encode(),
        "no-id": None,
        "same-client-id": client_id.encode(),
    }
    kind = "binary-id" if client_id == holder_id.hex() else "utf8-id"
    with lab_watch(server, tmp_path, f"plesty-strangers-{kind}") as felt:
        felt.note(holder_client_id=client_id)
        for name, identity in strangers.items():
            for first in ("nothing", "connect"):
                # a PLESTY client connects first (no resources); try without that too
                stranger = dealer(ctx, server.address, identity=identity)
                requests = {
                    "connect": {"type": "connect", "id": "c"},
                    "write": {"type": "write", "param": "WAVELENGTH", "value": 777.0, "id": "w"},
                    "call": {"type": "call", "func": "add", "args": [1, 2], "id": "a"},
                    "disconnect": {"type": "disconnect", "id": "d"},
                }
                if first != "connect":
                    del requests["connect"]
                got = {what: ask(stranger, req, timeout=0.5) for what, req in requests.items()}
                stranger.close()
                for _ in range(10):
                    # The previous case used this routing id too: until the server has seen
                    # that socket go, libzmq parks a new connection claiming the id (unread,
                    # no reply at all); that is the rule under test for the holder's own id
                    # only, so for a stranger's reused id ask again on a fresh socket.
                    if identity in (None, holder_id) or any(v is not None for v in got.values()):
                        break
                    time.sleep(0.2)
                    stranger = dealer(ctx, server.address, identity=identity)
                    got = {w: ask(stranger, req, timeout=0.5) for w, req in requests.items()}
                    stranger.close()
                holders = holders_of(locks_now(ctx, server.address), RESOURCE)
                case = f"{name}/{first}-first"
                felt.note(**{case: {k: _brief(v) for k, v in got.items()}, f"{case}>": holders})
                for what in ("write", "call"):
                    reply = got[what]
                    if identity == holder_id and reply is None:
                        # The very routing id of a live holder: ZeroMQ either hands the route
                        # over to the stranger (ROUTER_HANDOVER, which deafens the holder) or
                        # parks the stranger's connection unread until the holder leaves. The
                        # latter answers nothing; it is the only way the holder keeps working.
                        continue
                    felt.expect(
                        (reply or {}).get("type") == "ResourceLockedError",
                        f"stranger {case}: {what} got {_brief(reply)}, not ResourceLockedError",
                    )
                felt.expect(
                    holders == [client_id],
                    f"after stranger {case} the lock is held by {holders}, not {client_id}",
                )
                if holders != [client_id]:  # the holder takes it back for the next case
                    again = ask(
                        holder, {"type": "connect", "resources": [RESOURCE], "id": "c2"}, 0.5
                    )
                    felt.note(**{f"{case}>holder-reconnect": _brief(again)})
        watcher = dealer(ctx, server.address)
        wavelength = ask(watcher, {"type": "query", "param": "WAVELENGTH", "id": "q"}) or {}
        watcher.close()
        mine = ask(holder, {"type": "write", "param": "WAVELENGTH", "value": 600.0, "id": "w"})
        felt.note(wavelength=wavelength.get("result"), holder_write=_brief(mine))
        felt.expect(
            wavelength.get("result") == 532.0,
            f"a stranger changed WAVELENGTH to {wavelength.get('result')}",
        )
        felt.expect(
            bool(mine) and mine["status"] == "ok", f"the holder's own write got {_brief(mine)}"
        )
        holder.close()
