"""The client side: worker processes that run one kind of client each (the floor's bare
DEALER, labmesh's client, discovery lookups) and the capacity load generators."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import statistics
import sys
import threading
import time
from typing import Any

from bench.common import EXPECTED_VALUE, LOOKUP_NAME, PARAM


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
        body = {
            "type": "query",
            "param": PARAM,
            "timeout": None,
            "id": rid,
            "session": self._session,
        }
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

    def __init__(
        self, address: str, timeout_ms: int, window: int, check: str, session_mode: str
    ) -> None:
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
        self._sock.send(f'{{"type":"connect","resources":[],"lease":10.0,"id":"{tag}:0"}}'.encode())
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
        self._head = (
            b'{"type":"query","param":"'
            + PARAM.encode()
            + b'","timeout":null,"id":"'
            + tag.encode()
            + b":"
        )
        self._tail = b'"' + (b',"session":"' + session.encode() + b'"' if session else b"") + b"}"
        self._tag = tag.encode() + b":"
        self._counter = 0
        self._bye = b'{"type":"disconnect","id":"' + self._tag + b"bye" + self._tail

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
        rid = reply[start : reply.find(b'"', start)]
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
                    raise TimeoutError(
                        f"no reply for {self._timeout_ms} ms with {outstanding} "
                        f"request(s) in flight"
                    ) from None
                continue
            quiet_since = None
            # Check this reply and any others already queued, then refill the window: one
            # wake-up (and one batch of sends) for all the replies that arrived together.
            for _ in range(window):
                ok = not check_ok or reply.startswith(_OK_PREFIXES)
                if check_id:  # only a reply with an id in flight frees a slot of the window
                    start = reply.find(_ID_KEY) + 6
                    rid = reply[start : reply.find(b'"', start)] if start >= 6 else b""
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
        return {
            "count": good,
            "wrong": wrong,
            "sent": sent,
            "t0": t0,
            "t1": t1,
            "cpu_s": time.process_time() - cpu0,
            "capped": capped,
        }

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
        # the distribution, for bench.plot: the 1st to 99th percentiles
        "percentiles_us": [pick(q / 100) for q in range(1, 100)],
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
    reply: dict[str, Any] = {"count": done, "t0": t0, "t1": t1, "cpu_s": time.process_time() - cpu0}
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
                    client = _LoadGenerator(
                        cmd["address"],
                        cmd["timeout_ms"],
                        cmd["window"],
                        cmd["check"],
                        cmd["session"],
                    )
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


#: The clients a worker can run, by the name a `prepare` command gives.
_CLIENTS = {
    "raw": _RawClient,
    "labmesh": _LabmeshClient,
    "lookup": _LookupClient,
    "resolver": _ResolverClient,
}
