"""What a client promises, run against both clients (sync and asyncio) over real sockets.

Both drive one exchange (labmesh.protocol.exchange); these tests check that the two behave the
same where it shows: late replies, re-sends, lease loss and `reacquire`. The asyncio client is
driven from the test thread through an event loop running in another thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from labmesh import RemoteError, build_async_client, build_client, build_server
from labmesh.discovery.resolver import Resolver

from support import MemoryDaq, MemoryMeter, serve, wait_until

pytestmark = pytest.mark.integration


class AsyncFacade:
    """An AsyncDeviceClient used from this thread: its coroutines run on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any) -> None:
        self._loop = loop
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: run_on(self._loop, attr(*args, **kwargs))
        return attr


def run_on(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = 30) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture(params=["sync", "async"])
def connect(request) -> Callable[..., Any]:
    """connect(address, **options): a connected client of the parametrized kind."""
    loop = None
    if request.param == "async":
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
    made: list[Any] = []

    def make(address: str, **options: Any) -> Any:
        if loop is None:
            client = build_client(address, **options)
        else:
            client = AsyncFacade(loop, run_on(loop, build_async_client(address, **options)))
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    if loop is not None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


class FakePeer:
    """A ROUTER on 127.0.0.1 that answers each request with what `handle` returns (a list of
    replies, possibly none), from its own thread, until stopped."""

    def __init__(self, handle: Callable[[dict], list[dict]]) -> None:
        self.handle = handle
        self.requests: list[dict] = []
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(50):
                    continue
                frames = self._sock.recv_multipart()
                request = json.loads(frames[-1])
                self.requests.append(request)
                for reply in self.handle(request):
                    self._sock.send_multipart([frames[0], json.dumps(reply).encode()])
        finally:
            self._sock.close(linger=0)

    def of_type(self, rtype: str) -> list[dict]:
        return [r for r in self.requests if r.get("type") == rtype]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def ok(request: dict, result: Any) -> dict:
    return {"status": "ok", "result": result, "id": request.get("id")}


DESCRIPTION = {
    "name": "stage",
    "methods": ["home", "move_to"],
    "idempotent": ["home"],
    "budgets": {},
    "doc": {"functions": []},
}


def device_like(request: dict, others: Callable[[dict], list[dict]]) -> list[dict]:
    """connect and describe answered as a labmesh server would (no lease: no heartbeats)."""
    if request["type"] == "connect":
        return [ok(request, {"session": "s-1", "lease": None, "resources": []})]
    if request["type"] == "describe":
        return [ok(request, DESCRIPTION)]
    if request["type"] == "disconnect":
        return [ok(request, True)]
    return others(request)


@pytest.fixture
def peer():
    made: list[FakePeer] = []

    def make(others: Callable[[dict], list[dict]]) -> FakePeer:
        fake = FakePeer(lambda request: device_like(request, others))
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


# ---- late replies -----------------------------------------------------------------------------
def test_a_reply_to_another_request_on_the_same_socket_is_dropped_and_logged(connect, peer, caplog):
    fake = peer(
        lambda request: [
            {"status": "ok", "result": "stale", "id": "someone-else:7"},
            ok(request, "fresh"),
        ]
    )
    client = connect(fake.address, timeout=3000)
    with caplog.at_level(logging.INFO, logger="labmesh.client"):
        assert client.query("POWER") == "fresh"
    assert "dropped a late reply (id 'someone-else:7'" in caplog.text


def test_a_reply_without_id_from_a_peer_that_echoes_ids_is_not_taken(connect, peer):
    fake = peer(lambda request: [{"status": "ok", "result": "forged"}, ok(request, "fresh")])
    client = connect(fake.address, timeout=3000)
    assert client.query("POWER") == "fresh"


def test_a_late_reply_after_a_timeout_never_answers_the_next_request(connect):
    srv = serve(MemoryMeter())
    try:
        client = connect(srv.address, timeout=3000, retries=0)
        with pytest.raises(TimeoutError, match="no reply .* to call sleep within 200 ms"):
            client._request(
                {"type": "call", "func": "sleep", "args": [0.6], "kwargs": {}}, wait_ms=200
            )
        # the sleep's reply (0.6) arrives while we wait for this query: it must not answer it
        assert client.query("WAVELENGTH") == 532.0
        assert client.add(40, 2) == 42
    finally:
        srv.stop()


# ---- re-sends ---------------------------------------------------------------------------------
def test_only_safe_requests_and_idempotent_calls_are_sent_again(connect, peer):
    fake = peer(lambda request: [])  # answers nothing but connect and describe
    client = connect(fake.address, timeout=150, retries=2)
    for action, rtype, times in [
        (lambda: client.query("POSITION"), "query", 3),
        (lambda: client.write("POSITION", 1.0), "write", 1),
        (lambda: client.home(), "call", 3),
        (lambda: client.move_to(2.0), "call", 1),
    ]:
        before = len(fake.of_type(rtype))
        with pytest.raises(TimeoutError) as info:
            action()
        # each attempt waited 150 ms for its reply, so all of them have long arrived
        assert len(fake.of_type(rtype)) - before == times, rtype
        assert ("sent 3 times" in str(info.value)) == (times == 3)
    # every attempt carried its own id
    ids = [r["id"] for r in fake.requests]
    assert len(ids) == len(set(ids))


# ---- lease loss -------------------------------------------------------------------------------
def test_after_a_server_restart_heartbeats_reacquire_or_report_the_lost_locks(connect):
    srv = serve(MemoryDaq())
    address = srv.address
    try:
        holder = connect(address, resources="Dev1/port0/line0", lease_s=0.3, timeout=2000)
        again = connect(address, resources="Dev1/port1", lease_s=0.3, reacquire=True, timeout=2000)
        srv.stop()
        srv = build_server(MemoryDaq(), address=address).start()
        # no request from either: their heartbeats find the new server
        with build_client(address, timeout=2000) as observer:

            def holders() -> list[str]:
                # a socket replaced after a timeout connects as `client_id~n` (docs/server.md)
                return [h["client_id"].split("~")[0] for h in observer.locks()["holders"]]

            assert wait_until(lambda: holders() == [again.client_id], 5)
        assert wait_until(lambda: holder.lease_lost is not None, 5)
        assert "LeaseExpiredError" in holder.lease_lost or "lease" in holder.lease_lost
        assert again.lease_lost is None
        with pytest.raises(RemoteError) as info:
            holder.write_line("Dev1/port0/line0", True)
        assert type(info.value).__name__ == "LeaseExpiredError"
        assert again.write_line("Dev1/port1/line0", True) is True
    finally:
        srv.stop()


def test_without_locks_an_expired_lease_reconnects_silently(connect):
    srv = serve(MemoryMeter())
    address = srv.address
    try:
        client = connect(address, timeout=2000, lease_s=30)
        srv.stop()
        srv = build_server(MemoryMeter(), address=address).start()
        assert client.query("WAVELENGTH") == 532.0  # refused as expired, reconnected, answered
        assert client.lease_lost is None
    finally:
        srv.stop()


# ---- the asyncio client never blocks its loop ------------------------------------------------
def test_a_slow_name_lookup_does_not_stall_the_event_loop():
    server = serve(MemoryMeter())
    lookups: list[float] = []

    def slow_discovery(request: dict) -> list[dict]:
        if request["type"] != "lookup":
            return []
        lookups.append(time.monotonic())
        time.sleep(0.6)  # a discovery service under load
        record = {"name": request["name"], "address": server.address, "kind": "meter"}
        return [ok(request, record)]

    discovery = FakePeer(slow_discovery)
    resolver = Resolver([discovery.address], timeout_s=3.0)

    async def main() -> tuple[float, float, Any]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        client = await build_async_client("meter", discovery=resolver, timeout=3000)
        took = time.monotonic() - t0
        value = await client.query("WAVELENGTH")
        await client.close()
        stop.set()
        await ticking
        return took, max(gaps), value

    try:
        took, worst_gap, value = asyncio.run(main())
    finally:
        discovery.stop()
        resolver.close()
        server.stop()
    assert value == 532.0 and len(lookups) == 1
    assert took >= 0.6  # the lookup really was slow ...
    # the 0.6 s lookup ran off the event loop: its ticks kept coming (a stall would be >= 0.6 s;
    # the bound leaves room for a loaded 2-core machine)
    assert worst_gap < 0.3, f"the event loop stalled for {worst_gap * 1000:.0f} ms"


@pytest.mark.parametrize("by", ["name", "address"])
def test_an_unclosed_async_client_ends_its_heartbeat_quietly_when_the_loop_shuts_down(by):
    """A device left connected (an ophyd-async device at the end of a bluesky session) kept
    heartbeating after its server had gone; once the loop's executor was shut down, the
    heartbeat's reconnect (re-resolving the name in a worker thread) raised 'cannot schedule
    new futures after shutdown' and Python printed 'Task exception was never retrieved' at
    exit. A client found by name now ends its heartbeat quietly; one given an address has no
    name to re-resolve, needs no executor and carries on until the loop cancels it."""
    server = serve(MemoryMeter("meter"))

    def lookup(request: dict) -> list:
        record = {"name": request["name"], "address": server.address, "kind": "meter"}
        return [ok(request, record)]

    discovery = FakePeer(lookup)
    resolver = Resolver([discovery.address], timeout_s=3.0)
    errors: list[dict] = []

    async def main() -> BaseException | None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        target = "meter" if by == "name" else server.address
        client = await build_async_client(target, discovery=resolver, lease_s=0.6, timeout=300)
        assert await client.query("WAVELENGTH") == 532.0
        heartbeat = client._heartbeat
        assert heartbeat is not None and not heartbeat.done()
        await asyncio.get_running_loop().shutdown_default_executor()
        server.stop()  # the next heartbeat times out and makes a fresh socket
        deadline = time.monotonic() + (10 if by == "name" else 2)
        while not heartbeat.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if by == "name":
            assert heartbeat.done(), "the heartbeat kept running"
            return heartbeat.exception()
        assert not heartbeat.done(), "a client by address stopped heartbeating on its own"
        return None

    try:
        assert asyncio.run(main()) is None
    finally:
        discovery.stop()
        resolver.close()
        server.stop()
    assert errors == []


def test_a_monitored_socket_is_closed_monitor_first():
    """One of ten stressed runs of this tier went silent from one test on: every sync client,
    resolver and raw socket of the process timed out. libzmq's I/O thread sends a monitor
    event with a blocking send; a handshake failing after the client had closed its monitor
    reader (and before the socket's own asynchronous teardown) blocked that thread, and with
    it the whole context (libzmq #3575). close_monitored stops the monitor before anything
    is closed; the client, the resolver and the server all close through it."""
    from labmesh.transport import close_monitored

    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def disable_monitor(self) -> None:
            calls.append(f"{self.name}.disable_monitor")

        def close(self, linger: int | None = None) -> None:
            calls.append(f"{self.name}.close")

    close_monitored(Recorder("sock"), Recorder("monitor"))
    assert calls == ["sock.disable_monitor", "sock.close", "monitor.close"]
    calls.clear()
    close_monitored(None, Recorder("monitor"))  # a socket already gone: the reader still closes
    assert calls == ["monitor.close"]

    # and with real sockets: a client whose CURVE handshakes keep failing (wrong server key,
    # reconnecting every millisecond), closed through it 50 times, leaves its context working
    server_ctx, ctx = zmq.Context(), zmq.Context()
    try:
        public, secret = zmq.curve_keypair()
        curve = server_ctx.socket(zmq.ROUTER)
        curve.linger = 0
        curve.curve_server, curve.curve_secretkey, curve.curve_publickey = 1, secret, public
        port = curve.bind_to_random_port("tcp://127.0.0.1")
        echo = server_ctx.socket(zmq.ROUTER)
        echo.linger = 0
        echo_port = echo.bind_to_random_port("tcp://127.0.0.1")
        from labmesh.transport import handshake_monitor

        wrong, _ = zmq.curve_keypair()
        mine, my_secret = zmq.curve_keypair()
        for _ in range(50):
            sock = ctx.socket(zmq.DEALER)
            sock.linger, sock.reconnect_ivl = 0, 1
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
                wrong,
                mine,
                my_secret,
            )
            monitor = handshake_monitor(sock)
            sock.connect(f"tcp://127.0.0.1:{port}")
            monitor.rcvtimeo = 5000
            monitor.recv_multipart()  # it failed at least once
            close_monitored(sock, monitor)
        probe = ctx.socket(zmq.DEALER)
        probe.linger, probe.rcvtimeo = 0, 5000
        probe.connect(f"tcp://127.0.0.1:{echo_port}")
        probe.send(b"ping")
        assert echo.poll(5000) and echo.recv_multipart()[1] == b"ping"
        probe.close()
    finally:
        ended = threading.Event()
        threading.Thread(target=lambda: (ctx.term(), ended.set()), daemon=True).start()
        assert ended.wait(10), "the client context no longer ends: its I/O thread is stuck"
        server_ctx.destroy(linger=0)
