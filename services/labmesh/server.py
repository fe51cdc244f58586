"""The device server: one ROUTER socket served by two threads, one device call at a time.

The thread that owns the socket decodes every message, answers control requests (connect,
describe, ping, locks, ...) and runs short device calls inline, so a query costs no thread hop.
When a call runs long (a 20 s exposure) the watchdog hands the socket to the standby thread,
which keeps answering ping and describe, enforces budgets and queues further calls: a budget
that runs out gets TimeoutError at once, while the device stays busy (no second call starts)
until the call really ends. See `labmesh.device.executor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
import logging
import secrets
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from labmesh import metrics
from labmesh.device.base import describe_device, touched_resources
from labmesh.device.executor import RUNNING, TAKEOVER_AFTER_S, Job, Watchdog
from labmesh.locks import DEFAULT_IDLE_LIMIT_S, Grant, LeaseTable, Waiter
from labmesh.protocol import laplace as laplace_envelope
from labmesh.protocol import native
from labmesh.protocol.errors import (
    ExecutorDeadError,
    LabmeshError,
    LeaseExpiredError,
    ProtocolError,
    ResourceAllocationError,
    ResourceLockedError,
    UnknownOperationError,
    wire_type_of,
)
from labmesh.transport import bound_address, router_socket
from labmesh.version import __version__

if TYPE_CHECKING:
    from labmesh.laplace import LaplaceAdapter, LaplaceAnswer

log = logging.getLogger("labmesh.server")

CAPABILITIES = ["budgets", "still_running", "sessions", "leases", "ping", "heartbeat", "locks"]
# plain ints: pyzmq's enum arithmetic costs about a microsecond a call on the hot path
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
#: How long an idle server waits in one receive before looking at its other duties (ms).
_IDLE_RECV_MS = 100
_POLLIN = int(zmq.POLLIN)
#: Longest the I/O loop sleeps when nothing is due (lease expiry checks).
_MAX_POLL_MS = 500


@dataclass(slots=True)
class _Pending:
    """A device call in flight: where its reply goes and whether it was already answered."""

    route: list[bytes]
    request: native.Request
    received: float
    deadline: float | None
    session: str | None = None
    touches: tuple[str, ...] = ()
    operation: str = ""
    answered: bool = False
    #: the LAPLACE message this call answers (None: a native request)
    answer: LaplaceAnswer | None = None

    def observed(self) -> tuple[str, str, float]:
        return (self.request.type, self.operation, self.received)


class DeviceServer:
    """Serves one device on one ZeroMQ ROUTER endpoint.

    Parameters:
        device: the driver object (a `labmesh.Device`, or any object with query/write and
            `@operation` methods).
        fixed_threading: run every device call on one dedicated thread (True) or serialized
            on a shared pool (False).
        address: where to listen, e.g. `tcp://*:5555` or `tcp://127.0.0.1:0` (port chosen).
        name: the device's name in the lab (default: `device.name` or the class name).
        max_message_bytes: largest accepted request; larger ones get a ProtocolError.
        idle_limit_s: how long a lock without a lease (PLESTY client) survives silence.
        connect_timeout_s: how long `start()` waits for the device's connect.
        laplace: a `labmesh.laplace.LaplaceAdapter` answering LAPLACE-LHC messages (`cmd` and
            `version`, no `type`) on this same socket (PROTOCOL.md section 4).
    """

    def __init__(
        self,
        device: Any,
        *,
        fixed_threading: bool = False,
        address: str = "tcp://*:5555",
        name: str | None = None,
        max_message_bytes: int = native.DEFAULT_MAX_MESSAGE_BYTES,
        idle_limit_s: float = DEFAULT_IDLE_LIMIT_S,
        connect_timeout_s: float = 60.0,
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        laplace: LaplaceAdapter | None = None,
    ) -> None:
        self.device = device
        self.name = name or describe_device(device)["name"]
        self.max_message_bytes = max_message_bytes
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self.epoch = secrets.token_hex(6)
        self.locks = LeaseTable(idle_limit_s=idle_limit_s)
        self._describe()
        self._laplace = laplace
        if laplace is not None:
            laplace.attach(self)
        self.fixed_threading = fixed_threading
        # An own context by default: terminating it on stop guarantees the port is released
        # when stop() returns (a socket close alone finishes asynchronously).
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        try:
            self._sock = router_socket(self._ctx, address, max_message_bytes)
        except OSError:
            if self._own_ctx:
                self._ctx.term()
            raise
        self.address = bound_address(self._sock)
        self._takes_resources: dict[str, bool] = {}
        self._plesty_sessions: dict[str, str] = {}
        self._pending: dict[Job, _Pending] = {}
        self._deadlines: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._queue: deque[Job] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sock.setsockopt(zmq.RCVTIMEO, _IDLE_RECV_MS)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        # shared between the two server threads (guarded by _cond)
        self._state = threading.Lock()  # the hot path takes the bare lock
        self._cond = threading.Condition(self._state)
        self._owner: threading.Thread | None = None
        self._running: Job | None = None
        self._results: list[Job] = []
        self._stop_requested = False
        self._finished = 0
        self._dead: set[threading.Thread] = set()
        self._threads: list[threading.Thread] = []
        self._device_thread: threading.Thread | None = None
        self._connect_done = threading.Event()
        self._connect_error: BaseException | None = None
        self._stopped = threading.Event()
        self._started_at = 0.0
        self._next_lock_check = 0.0
        self._observing: tuple[str, str, float] | None = None
        self._lock_rows: list[dict[str, Any]] = []
        self.connected = False
        self._handlers = {
            "connect": self._on_connect,
            "disconnect": self._on_disconnect,
            "describe": self._on_describe,
            "help": self._on_help,
            "ping": self._on_ping,
            "heartbeat": self._on_heartbeat,
            "locks": self._on_locks,
            "query": self._on_device_request,
            "write": self._on_device_request,
            "call": self._on_device_request,
        }

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> DeviceServer:
        """Connect the device (on its own thread) and serve in the background.

        Raises whatever the device's connect raised, after closing the socket.
        """
        if self._threads:
            return self
        self._started_at = self.clock()
        self._threads = [
            threading.Thread(target=self._thread_main, name=f"device:{self.name}", daemon=True),
            threading.Thread(target=self._thread_main, name=f"standby:{self.name}", daemon=True),
        ]
        self._device_thread = self._threads[0]
        for thread in self._threads:
            thread.start()
        if not self._connect_done.wait(self.connect_timeout_s):
            self.stop()
            raise TimeoutError(
                f"{self.name}: device connect did not finish within {self.connect_timeout_s} s"
            )
        if self._connect_error is not None:
            self.stop()
            raise self._connect_error
        log.info("%s: serving on %s", self.name, self.address)
        return self

    def stop(self, timeout: float = 1.5) -> None:
        """Stop serving, disconnect the device and close the socket (bounded by `timeout`)."""
        with self._cond:
            self._stop_requested = True
            job = self._running
            if job is not None and self._owner is job.thread and self._threads:
                # the owner is inside a device call: let the other thread close the socket
                self._owner = self._other(job.thread)
            self._cond.notify_all()
        self._wake()
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))
        if not self._threads:
            self._close_socket()
            self._wake_r.close()
            self._wake_w.close()
        if any(t.is_alive() for t in self._threads):
            job = self._running
            log.warning(
                "%s: device still busy with %s at shutdown; it is disconnected when that ends",
                self.name,
                job.label if job else "?",
            )

    async def run(self) -> None:
        """Serve until stop(), Ctrl+C or SIGTERM (then return normally), or cancellation.

        In the main thread SIGINT and SIGTERM stop the server cleanly (device disconnected,
        socket closed) and `asyncio.run(main())` ends with exit status 0, as PLESTY's does.
        """
        loop = asyncio.get_running_loop()
        signals = _install_stop_signals(loop, lambda: loop.run_in_executor(None, self.stop))
        try:
            await loop.run_in_executor(None, self.start)
            await loop.run_in_executor(None, self._stopped.wait)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self.stop()

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stopped.is_set()

    @property
    def healthy(self) -> bool:
        """Both server threads alive (a dead device thread means calls cannot run)."""
        return bool(self._threads) and all(
            t.is_alive() and t not in self._dead for t in self._threads
        )

    @property
    def busy_with(self) -> Job | None:
        """The device call running now, if any."""
        return self._running

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- threads and socket ownership -----------------------------------------------------
    # Exactly one thread owns the socket at a time (`_owner`, changed under `_cond`). The owner
    # runs device calls inline when it may (fixed_threading: only the device thread). When a
    # call runs long the watchdog moves ownership to the other thread, which keeps answering
    # while the call runs; the caller posts its finished job to `_results` and waits.
    def _thread_main(self) -> None:
        me = threading.current_thread()
        if me is self._device_thread:
            self._connect_device(me)
        try:
            while True:
                with self._cond:
                    while self._owner is not me and not self._stop_requested:
                        self._cond.wait()
                    owner = self._owner is me
                if owner:
                    self._serve_as_owner(me)
                if self._stop_requested:
                    break
        except BaseException:
            # Only a bug of ours (or an exception injected from outside) gets here: keep the
            # socket served by the other thread; ping and describe now report unhealthy.
            log.critical("%s: server thread %s died", self.name, me.name, exc_info=True)
            with self._cond:
                self._dead.add(me)
                if self._owner is me:
                    self._owner = self._other(me)
                    self._cond.notify_all()
            self._thread_finished()
            raise
        if me is self._device_thread:
            self._disconnect_device()
        self._thread_finished()

    def _other(self, me: threading.Thread) -> threading.Thread:
        return self._threads[1] if me is self._threads[0] else self._threads[0]

    def _thread_finished(self) -> None:
        with self._cond:
            self._finished += 1
            last = self._finished == len(self._threads)
        if last:
            self._wake_r.close()
            self._wake_w.close()
            self._stopped.set()
            log.info("%s: stopped", self.name)

    def _describe(self) -> None:
        """(Re)read the device's declarations: at construction, and again after connect,
        where a driver may have learned its limits or channels from the instrument."""
        description = describe_device(self.device)
        description["name"] = self.name
        self.locks.register(description["resources"])
        self._methods = frozenset(description["methods"])
        self._budgets: dict[str, float] = description["budgets"]
        self._help_text = _help_text(description)
        self.description = description
        declared = {p["name"] for p in description["doc"]["parameters"]["default"]}
        self.metrics = metrics.DeviceMetrics(
            self.name, frozenset(declared | self._methods), frozenset(self._budgets)
        )

    def _connect_device(self, me: threading.Thread) -> None:
        job = Job(_enter_device, (self.device,), label="connect")
        job.run()
        if job.ok:
            self._describe()
            self.connected = True
            Watchdog.shared().add(self)
            metrics.SERVERS.add(self)
            metrics.SERVER_INFO.labels(
                self.name, self.description["kind"], __version__, native.PROTOCOL_NAME
            ).set(1)
            with self._cond:
                self._owner = me
                self._cond.notify_all()
        else:
            self._connect_error = job.error
            with self._cond:
                self._stop_requested = True
                self._owner = me
                self._cond.notify_all()
        self._connect_done.set()

    def _disconnect_device(self) -> None:
        Watchdog.shared().remove(self)
        metrics.SERVERS.remove(self)
        with contextlib.suppress(KeyError):
            metrics.SERVER_INFO.remove(
                self.name, self.description["kind"], __version__, native.PROTOCOL_NAME
            )
        if self.connected:
            job = Job(_exit_device, (self.device,), label="disconnect")
            job.run()
            self.connected = False
            if not job.ok:
                log.error("%s: disconnect failed: %r", self.name, job.error)

    def metrics_snapshot(self) -> dict[str, Any]:
        """Scrape-time state for metrics (read from another thread: plain attribute reads)."""
        return {
            "device": self.name,
            "up": self.connected and self.healthy,
            "busy": self._running is not None,
            "queue_depth": len(self._queue),
            "in_flight": len(self._pending),
            "waiters": len(self.locks.waiters),
            "locks": self._lock_rows,
        }

    def _locks_changed(self, now: float) -> None:
        """Republish who holds what (a fresh list, so a scrape never sees one half-built)."""
        wall = time.time()
        self._lock_rows = [
            {
                "resource": row["resource"],
                "holder": row["client_id"],
                "holder_name": str(
                    row["metadata"].get("name") or row["metadata"].get("experiment") or ""
                ),
                "since": wall - row["since_s"],
            }
            for row in self.locks.holders(now)
        ]

    def check_long_call(self, now: float) -> bool:
        """Called by the watchdog: hand the socket to the other thread if a call runs long."""
        job = self._running
        if job is None:
            return False
        thread = job.thread
        if thread is None or now - job.started_at < TAKEOVER_AFTER_S:
            return True
        with self._cond:
            other = self._other(thread)
            if (
                self._running is job
                and self._owner is thread
                and not self._stop_requested
                and other.is_alive()
                and other not in self._dead
            ):
                self._owner = other
                self._cond.notify_all()
        return True

    def _may_run_calls(self, me: threading.Thread) -> bool:
        return not self.fixed_threading or me is self._device_thread

    def _device_thread_alive(self) -> bool:
        thread = self._device_thread
        return thread is not None and thread.is_alive() and thread not in self._dead

    def _hand_over(self, to: threading.Thread) -> None:
        with self._cond:
            self._owner = to
            self._cond.notify_all()

    def _wake(self) -> None:
        # a full buffer means a wake-up is already pending; OSError: we are shutting down
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _serve_as_owner(self, me: threading.Thread) -> None:
        """Serve the socket until ownership moves elsewhere or the server stops."""
        poller = self._poller
        sock = self._sock
        may_run = self._may_run_calls(me)
        wake_fd = self._wake_r.fileno()
        while True:
            if self._stop_requested:
                self._shutdown_as_owner()
                return
            if self._results:
                with self._cond:
                    done, self._results = self._results, []
                for job in done:
                    self._deliver(job)
            if self._running is None:
                if not may_run and self._device_thread_alive():
                    self._hand_over(self._device_thread)  # queued calls run there
                    return
                if self._queue and may_run and not self._run_inline(me, self._queue.popleft()):
                    return
            now = self.clock()
            if now >= self._next_lock_check:
                self._lock_tick(now)
            if self._running is None and not self._queue and not self._results:
                # idle: only the socket needs watching (stop is seen within _IDLE_RECV_MS),
                # so wait in a plain receive, which is cheaper than a poll
                if not self._receive(me, may_run, block=True):
                    return
                continue
            if (self._queue and self._running is None) or self._results:
                timeout = 0
            else:
                due = self._next_lock_check
                if self._deadlines:
                    due = min(due, self._deadlines[0][0])
                timeout = min(_MAX_POLL_MS, max(0, int((due - now) * 1000) + 1))
            try:
                events = dict(poller.poll(timeout))
            except zmq.ZMQError as exc:
                log.error("%s: poll failed: %s", self.name, exc)
                continue
            if sock in events and not self._receive(me, may_run, block=False):
                return
            if wake_fd in events:
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_r.recv(65536)
            if self._deadlines:
                self._expire_budgets(self.clock())

    def _receive(self, me: threading.Thread, may_run: bool, block: bool) -> bool:
        """Read what the socket has (waiting up to _IDLE_RECV_MS if `block`); a call that can
        start now runs right away. False if the socket was handed over meanwhile."""
        sock = self._sock
        flags = 0 if block else _NOBLOCK
        for _ in range(256):
            try:
                frames = sock.recv_multipart(flags)
            except zmq.Again:
                return True
            flags = _NOBLOCK
            self._handle(frames)
            if (
                self._queue
                and self._running is None
                and may_run
                and not self._run_inline(me, self._queue.popleft())
            ):
                return False
            if not sock.get(_EVENTS) & _POLLIN:
                return True
        return True

    def _run_inline(self, me: threading.Thread, job: Job) -> bool:
        """Run a call on this thread; False if the socket was handed over meanwhile."""
        pending = self._pending.get(job)
        if pending is not None and pending.touches:
            # checked when the call starts, not when it arrived: a lock taken meanwhile counts
            try:
                self.locks.check(pending.session, pending.touches, self.clock())
            except ResourceLockedError as exc:
                job.error = exc
                self._deliver(job)
                return True
        job.thread = me
        with self._state:
            self._running = job
        job.run()
        with self._state:
            self._running = None
            still_owner = self._owner is me
            if not still_owner:
                self._results.append(job)
        if still_owner:
            self._deliver(job)
            return True
        self._wake()
        return False

    def _shutdown_as_owner(self) -> None:
        for job, pending in self._pending.items():
            if not pending.answered:
                pending.answered = True
                message = f"server is shutting down; {job.label} was " + (
                    "interrupted" if job.state == RUNNING else "not started"
                )
                if pending.answer is None:
                    reply = self._error(pending.request, message, "ShutdownError")
                else:
                    reply = pending.answer.failed(message)
                if reply is not None:
                    self._send(pending.route, reply)
        self._queue.clear()
        self._close_socket()
        with self._cond:
            self._owner = None
            self._cond.notify_all()

    def _close_socket(self) -> None:
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def _send(
        self,
        route: list[bytes],
        reply: dict[str, Any],
        observe: tuple[str, str, float] | None = None,
    ) -> None:
        """Send a reply; `observe` = (request type, operation label, received at) records its
        latency (control requests set `_observing` for the request being handled)."""
        if observe is None:
            observe, self._observing = self._observing, None
        if observe is not None:
            rtype, operation, received = observe
            # a LAPLACE reply has no status: it failed when it carries an error_msg
            status = reply.get("status") or ("ok" if reply.get("error_msg") is None else "error")
            if status != "ok":
                self.metrics.error(rtype, str(reply.get("type", "LaplaceError")))
                if reply.get("type") == "TimeoutError" and "started" in reply:
                    status = "timeout"
            self.metrics.observe(rtype, operation, status, self.clock() - received)
        body = native.encode_reply(reply)
        sock = self._sock
        try:
            for frame in route:
                sock.send(frame, _SNDMORE_NOBLOCK)
            sock.send(body, _NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("%s: reply to %r dropped: client not reading", self.name, route[0])
        except zmq.ZMQError as exc:
            log.info("%s: reply to %r dropped: client gone (%s)", self.name, route[0], exc)

    def _error(
        self, request: native.Request | None, message: str, error_type: str, **extra: Any
    ) -> dict[str, Any]:
        if request is None:
            return native.error_reply(message, error_type, **extra)
        return native.error_reply(message, error_type, request.id, request.has_id, **extra)

    def _handle(self, frames: list[bytes]) -> None:
        received = self.clock()
        parts = native.split_frames(frames)
        request = None
        obj = None
        self._observing = ("invalid", "", received)
        try:
            obj = native.decode_body(parts, self.max_message_bytes)
            if self._laplace is not None and laplace_envelope.is_envelope(obj):
                self._on_laplace(parts.route, obj, received)
            else:
                request = native.parse_request(obj)
                self._observing = (request.type, "", received)
                self._handlers[request.type](parts, request)
        except ProtocolError as exc:
            log.warning(
                "%s: malformed request from %s: %s",
                self.name,
                native.client_id_of(parts.identity),
                exc,
            )
            reply = native.error_reply(
                str(exc),
                exc.wire_type,
                exc.details.get("request_id"),
                exc.details.get("has_id", False),
            )
            if obj is None and self._laplace is not None:
                # no envelope to read: answer in both shapes, so a LAPLACE client can read it too
                reply.update(self._laplace.undecodable(str(exc)))
            self._send(parts.route, reply)
        except LabmeshError as exc:
            self._send(parts.route, self._error(request, str(exc), exc.wire_type, **_details(exc)))
        except Exception as exc:  # a bug of ours must cost one request, never the server
            log.exception("%s: failed to handle a request", self.name)
            self._send(
                parts.route,
                self._error(request, f"internal server error: {exc!r}", "InternalError"),
            )
        self._observing = None

    def _on_laplace(self, route: list[bytes], obj: dict[str, Any], received: float) -> None:
        """A LAPLACE message: answered now, and/or queued on the device like a native call."""
        assert self._laplace is not None
        answer = self._laplace.handle(obj, self._running is not None or bool(self._queue))
        self._observing = ("laplace", answer.command, received)
        job = answer.job
        if job is not None:
            request = native.Request("laplace", obj)
            self._pending[job] = _Pending(
                route, request, received, None, None, answer.touches, answer.command, answer=answer
            )
            self._queue.append(job)
        if answer.now is not None:
            self._send(route, answer.now)

    # ---- control requests (answered on the I/O thread) ------------------------------------
    def _session_of(self, parts: native.Frames, request: native.Request) -> str | None:
        """The session a request speaks for: its token, or a PLESTY client's connection."""
        if request.session is not None:
            return request.session
        return self._plesty_sessions.get(native.client_id_of(parts.identity))

    def _on_connect(self, parts: native.Frames, request: native.Request) -> None:
        client_id = native.client_id_of(parts.identity)
        metadata = {
            k: v for k, v in request.fields.items() if k not in native.CONNECT_PROTOCOL_KEYS
        }
        lease = request.get("lease")
        if lease is not None:
            # no lease outlives the idle limit: a client cannot hold a lock "forever"
            lease = min(float(lease), self.locks.idle_limit_s)
        known = self._session_of(parts, request)
        if known is not None and self.locks.grant(known) is None:
            known = None  # a stale token (lease ran out, server restarted): start afresh
        session = known or secrets.token_urlsafe(16)
        now = self.clock()
        try:
            leaves = self.locks.expand(request.get("resources"))
            grant = self.locks.acquire(
                session, client_id, leaves, now, lease_s=lease, metadata=metadata
            )
        except ResourceAllocationError as exc:
            wait = request.get("wait")
            if wait and "unknown" not in exc.details:
                self.locks.enqueue(
                    Waiter(
                        session,
                        client_id,
                        leaves,
                        now + wait,
                        metadata,
                        lease,
                        (parts.route, request, now),
                    )
                )
                log.info(
                    "%s: %s waits up to %.1f s for %s", self.name, client_id, wait, list(leaves)
                )
                return
            self._refuse_connect(parts.route, request, client_id, metadata, exc)
            return
        self._granted(parts.route, request, grant)

    def _granted(
        self,
        route: list[bytes],
        request: native.Request,
        grant: Grant,
        observe: tuple[str, str, float] | None = None,
    ) -> None:
        self._locks_changed(self.clock())
        if grant.lease_s is None:
            self._plesty_sessions[grant.client_id] = grant.session
        if grant.leaves:
            log.info("%s: %s holds %s", self.name, grant.describe_holder(), list(grant.leaves))
        result = {
            "client_id": grant.client_id,
            "resources": list(grant.leaves),
            "metadata": grant.metadata,
            "session": grant.session,
            "lease": grant.lease_s,
            "epoch": self.epoch,
        }
        self._send(route, native.ok_reply(result, request), observe)

    def _refuse_connect(
        self,
        route: list[bytes],
        request: native.Request,
        client_id: str,
        metadata: dict[str, Any],
        exc: ResourceAllocationError,
        observe: tuple[str, str, float] | None = None,
    ) -> None:
        log.info("%s: connect of %s refused: %s", self.name, client_id, exc)
        self._send(
            route,
            self._error(
                request,
                str(exc),
                exc.wire_type,
                result={"client_id": client_id, "resources": [], "metadata": metadata},
                **_details(exc),
            ),
            observe,
        )

    def _serve_waiters(self, now: float) -> None:
        granted, expired = self.locks.serve_waiters(now)
        for waiter, grant in granted:
            route, request, since = waiter.token
            self.metrics.lock_waited("granted", now - since)
            self._granted(route, request, grant, ("connect", "", since))
        for waiter in expired:
            route, request, since = waiter.token
            self.metrics.lock_waited("timeout", now - since)
            busy = self.locks.busy_message(waiter.leaves, now)
            exc = ResourceAllocationError(
                f"waited {request.get('wait')} s; requested resources are still not available: "
                + busy
            )
            self._refuse_connect(
                route, request, waiter.client_id, waiter.metadata, exc, ("connect", "", since)
            )

    def _on_disconnect(self, parts: native.Frames, request: native.Request) -> None:
        client_id = native.client_id_of(parts.identity)
        session = self._session_of(parts, request)
        if session is not None:
            grant = self.locks.release(session)
            if grant is not None and grant.leaves:
                log.info(
                    "%s: %s released %s", self.name, grant.describe_holder(), list(grant.leaves)
                )
            if self._plesty_sessions.get(client_id) == session:
                del self._plesty_sessions[client_id]
            self._locks_changed(self.clock())
        self._send(parts.route, native.ok_reply({"client_id": client_id}, request))
        self._serve_waiters(self.clock())

    def _on_describe(self, parts: native.Frames, request: native.Request) -> None:
        result = {
            **self.description,
            "protocol": native.PROTOCOL_NAME,
            "capabilities": CAPABILITIES,
            "healthy": self.healthy,
            "epoch": self.epoch,
        }
        self._send(parts.route, native.ok_reply(result, request))

    def _on_help(self, parts: native.Frames, request: native.Request) -> None:
        self._send(parts.route, native.ok_reply({"help": self._help_text}, request))

    def _on_ping(self, parts: native.Frames, request: native.Request) -> None:
        now = self.clock()
        current = self._running
        result = {
            "pong": True,
            "name": self.name,
            "healthy": self.healthy,
            "connected": self.connected,
            "busy": current is not None,
            "running": {"label": current.label, "for_s": round(now - current.started_at, 3)}
            if current is not None
            else None,
            "queue_depth": len(self._queue),
            "epoch": self.epoch,
            "uptime_s": round(now - self._started_at, 3),
        }
        self._send(parts.route, native.ok_reply(result, request))

    def _on_heartbeat(self, parts: native.Frames, request: native.Request) -> None:
        now = self.clock()
        grant = self.locks.renew(request.session or "", now)
        grant.last_seen = now
        result = {"lease_remaining": self.locks.remaining(grant, now), "epoch": self.epoch}
        self._send(parts.route, native.ok_reply(result, request))

    def _on_locks(self, parts: native.Frames, request: native.Request) -> None:
        now = self.clock()
        result = {"resources": sorted(self.locks.leaves), "holders": self.locks.holders(now)}
        self._send(parts.route, native.ok_reply(result, request))

    def _lock_tick(self, now: float) -> None:
        """Expire leases (never of a session with a call in flight) and serve waiters."""
        alive = [p.session for p in self._pending.values() if p.session and not p.answered]
        expired = self.locks.expire(now, alive)
        for grant in expired:
            self.metrics.lease_expired()
            log.warning(
                "%s: lease of %s expired after %.1f s without a request; freed %s",
                self.name,
                grant.describe_holder(),
                now - grant.last_seen,
                list(grant.leaves),
            )
            if self._plesty_sessions.get(grant.client_id) == grant.session:
                del self._plesty_sessions[grant.client_id]
        self._serve_waiters(now)
        if expired:
            self._locks_changed(now)
        if self._deadlines:
            self._expire_budgets(now)
        following = self.locks.next_event()
        self._next_lock_check = now + 0.25 if following is None else min(now + 0.25, following)

    # ---- device requests ------------------------------------------------------------------
    def _on_device_request(self, parts: native.Frames, request: native.Request) -> None:
        if self.fixed_threading and self._dead and not self._device_thread_alive():
            raise ExecutorDeadError(
                f"{self.name}: the thread that runs this device's calls is not running; "
                "restart the server"
            )
        now = self.clock()
        session = self._session_of(parts, request)
        resources: list[str] = []
        if session is not None:
            grant = self.locks.grant(session)
            if grant is None:
                raise LeaseExpiredError(
                    f"{self.name}: this session is unknown here (its lease ran out, or the "
                    "server restarted); any locks it held are gone: connect again"
                )
            grant.last_seen = now
            resources = list(grant.leaves)
        fn, args, kwargs, label = self._device_call(request)
        touches: tuple[str, ...] = ()
        if request.type != "query" and self.locks.leaves:
            touches = self._touches(request, args, kwargs)
        if resources and self._accepts_resources(label, fn):
            kwargs["resources"] = resources
        budget = request.timeout
        if budget is None and request.type == "call":
            budget = self._budgets.get(request.fields["func"])
        job = Job(fn, args, kwargs, label)
        deadline = now + budget if budget is not None else None
        operation = self.metrics.operation_label(
            request.fields.get("param") or request.fields.get("func")
        )
        self._pending[job] = _Pending(
            parts.route, request, now, deadline, session, touches, operation
        )
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), job))
        self._queue.append(job)

    def _touches(self, request: native.Request, args: tuple, kwargs: dict) -> tuple[str, ...]:
        """The registered leaves a write or call touches (all of them unless declared)."""
        name = request.fields.get("param") or request.fields.get("func")
        declared = touched_resources(self.device, request.type, name, args, kwargs)
        if declared is None:
            return tuple(sorted(self.locks.leaves))
        try:
            return self.locks.expand(declared)
        except ResourceAllocationError:
            # e.g. a template filled from a bad argument: lock-check it as the whole device,
            # and let the call itself refuse the argument with its own error
            return tuple(sorted(self.locks.leaves))

    def _device_call(self, request: native.Request) -> tuple[Callable, tuple, dict, str]:
        fields = request.fields
        if request.type == "query":
            return self.device.query, (fields["param"],), {}, f"query {fields['param']}"
        if request.type == "write":
            return (
                self.device.write,
                (fields["param"], fields["value"]),
                {},
                f"write {fields['param']}",
            )
        func = fields["func"]
        if func not in self._methods:
            raise UnknownOperationError(
                f"{self.name} has no operation {func!r}; operations: {sorted(self._methods)}"
            )
        kwargs = dict(fields.get("kwargs") or {})
        kwargs.pop("resources", None)  # never trust client-sent resources
        return getattr(self.device, func), tuple(fields.get("args") or ()), kwargs, func

    def _accepts_resources(self, label: str, fn: Callable) -> bool:
        """Whether a device method takes `resources=` (PLESTY passes it; ours may not)."""
        key = label.split(" ", 1)[0] if label.startswith(("query ", "write ")) else label
        known = self._takes_resources.get(key)
        if known is None:
            try:
                params = inspect.signature(fn).parameters.values()
                known = any(p.kind is p.VAR_KEYWORD or p.name == "resources" for p in params)
            except (TypeError, ValueError):
                known = False
            self._takes_resources[key] = known
        return known

    def _deliver(self, job: Job) -> None:
        pending = self._pending.pop(job, None)
        if pending is None:
            return
        if pending.answered:
            log.warning(
                "%s: %s finished %.3f s after its budget ran out; result discarded",
                self.name,
                job.label,
                job.finished_at - job.started_at,
            )
            return
        pending.answered = True
        request = pending.request
        if pending.session is not None:
            grant = self.locks.grant(pending.session)
            if grant is not None:
                grant.last_seen = self.clock()
        if pending.answer is not None:
            reply = pending.answer.reply(job)
            if reply is not None:
                self._send(pending.route, reply, pending.observed())
            return
        if job.ok:
            self._send(pending.route, native.ok_reply(job.value, request), pending.observed())
            return
        exc = job.error
        assert exc is not None
        if isinstance(exc, (SystemExit, KeyboardInterrupt, GeneratorExit)):
            message = (
                f"{type(exc).__name__}({', '.join(map(repr, exc.args))}) raised inside "
                f"{job.label}; the call failed, the server carries on"
            )
            log.error("%s: %s", self.name, message)
        else:
            message = str(exc) or type(exc).__name__
            log.info("%s: %s failed: %s: %s", self.name, job.label, wire_type_of(exc), message)
        self._send(
            pending.route,
            self._error(request, message, wire_type_of(exc), **_details(exc)),
            pending.observed(),
        )

    def _expire_budgets(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self._deadlines)
            pending = self._pending.get(job)
            if pending is None or pending.answered:
                continue
            pending.answered = True
            if job in self._queue:
                self._queue.remove(job)
                del self._pending[job]
                current = self._running
                detail = (
                    f"not started: the device was busy with {current.label} for "
                    f"{now - current.started_at:.1f} s"
                    if current
                    else "not started"
                )
                self._send(
                    pending.route,
                    self._error(
                        pending.request,
                        "Operation timed out",
                        "TimeoutError",
                        still_running=False,
                        started=False,
                        detail=detail,
                    ),
                    pending.observed(),
                )
                self.metrics.budget_expired(pending.operation, still_running=False)
                continue
            running = job.state == RUNNING
            self._send(
                pending.route,
                self._error(
                    pending.request,
                    "Operation timed out",
                    "TimeoutError",
                    still_running=running,
                    started=True,
                    detail=f"{job.label} ran past its budget of "
                    f"{(pending.deadline or now) - pending.received:.3f} s; the device stays "
                    "busy until it ends",
                ),
                pending.observed(),
            )
            self.metrics.budget_expired(pending.operation, still_running=running)


def _install_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], Any]) -> list:
    """Route SIGINT/SIGTERM to `stop` while serving (main thread, POSIX loops only)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # e.g. Windows' proactor loop: Ctrl+C then cancels run() instead
        installed.append(sig)
    return installed


def _enter_device(device: Any) -> None:
    enter = getattr(device, "__enter__", None)
    if enter is not None:
        enter()
    elif hasattr(device, "connect"):
        device.connect()


def _exit_device(device: Any) -> None:
    exit_ = getattr(device, "__exit__", None)
    if exit_ is not None:
        exit_(None, None, None)
    elif hasattr(device, "disconnect"):
        device.disconnect()


def _details(exc: BaseException) -> dict[str, Any]:
    """Extra reply fields an error carries (e.g. lock holders); never the protocol's own."""
    details = getattr(exc, "details", None)
    if not isinstance(details, dict):
        return {}
    return {k: v for k, v in details.items() if k not in ("status", "error", "type", "id")}


def _help_text(description: dict[str, Any]) -> str:
    lines = [f"{description['name']} ({description['kind']})"]
    summary = (description["doc"].get("description") or "").split("\n\n")[0]
    if summary:
        lines.append(summary)
    params = description["doc"]["parameters"]["default"]
    if params:
        lines.append("")
        lines.append("Parameters:")
        for p in params:
            limits = ""
            if p["options"] is not None:
                limits = f" options {p['options']}"
            elif p["min_value"] is not None or p["max_value"] is not None:
                limits = f" [{p['min_value']}, {p['max_value']}]"
            access = " read-only" if p["read_only"] else " write-only" if p["write_only"] else ""
            unit = f" {p['unit']}" if p["unit"] else ""
            lines.append(f"  {p['name']}: {p['dtype']}{unit}{limits}{access}  {p['description']}")
    if description["doc"]["functions"]:
        lines.append("")
        lines.append("Operations:")
        for f in description["doc"]["functions"]:
            args = ", ".join(a["name"] for a in f["iparams"])
            budget = f" (budget {f['kind']['budget_s']} s)" if f["kind"]["budget_s"] else ""
            first = f["description"].splitlines()[0] if f["description"] else ""
            lines.append(f"  {f['name']}({args}){budget}  {first}")
    if description["resources"]:
        lines.append("")
        lines.append(f"Lockable resources: {description['resources']}")
    return "\n".join(lines)


def build_server(
    device: Any,
    fixed_threading: bool = False,
    address: str = "tcp://*:5555",
    **options: Any,
) -> DeviceServer:
    """Serve `device` at `address` (PLESTY's signature). Then `await server.run()`, or
    `server.start()` ... `server.stop()` from synchronous code. `options` go to DeviceServer.
    """
    return DeviceServer(device, fixed_threading=fixed_threading, address=address, **options)
