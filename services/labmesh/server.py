"""The device server: one ROUTER socket, one I/O thread, the device's executor behind it.

The I/O thread owns the socket. It decodes every message, answers control requests (connect,
describe, ping, locks, ...) itself and hands device calls to the executor, so it never blocks
on the instrument: a `ping` is answered during a 20 s exposure. Results come back through a
deque and a wake-up socket pair. Budgets are enforced here: when one runs out the client gets
TimeoutError at once, while the device stays busy (no second call starts) until the call
really ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
import logging
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from labmesh.device.base import describe_device
from labmesh.device.executor import QUEUED, RUNNING, Job, make_executor
from labmesh.locks import DEFAULT_IDLE_LIMIT_S, LeaseTable
from labmesh.protocol import native
from labmesh.protocol.errors import (
    ExecutorDeadError,
    LabmeshError,
    ProtocolError,
    ResourceAllocationError,
    UnknownOperationError,
    wire_type_of,
)
from labmesh.transport import bound_address, router_socket

log = logging.getLogger("labmesh.server")

CAPABILITIES = ["budgets", "still_running", "sessions", "leases", "ping", "heartbeat", "locks"]
#: How long shutdown waits for the device's disconnect before closing anyway.
SHUTDOWN_BUDGET_S = 1.5
#: Longest the I/O loop sleeps when nothing is due (lease expiry checks).
_MAX_POLL_MS = 500


@dataclass(slots=True)
class _Pending:
    """A device call in flight: where its reply goes and whether it was already answered."""

    route: list[bytes]
    request: native.Request
    received: float
    deadline: float | None
    answered: bool = False


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
    ) -> None:
        self.device = device
        self.description = describe_device(device)
        self.name = name or self.description["name"]
        self.description["name"] = self.name
        self.max_message_bytes = max_message_bytes
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self.epoch = secrets.token_hex(6)
        self.locks = LeaseTable(self.description["resources"], idle_limit_s=idle_limit_s)
        self.executor = make_executor(self.name, fixed_threading)
        self._ctx = context or zmq.Context.instance()
        self._sock = router_socket(self._ctx, address, max_message_bytes)
        self.address = bound_address(self._sock)
        self._methods = frozenset(self.description["methods"])
        self._budgets: dict[str, float] = self.description["budgets"]
        self._help_text = _help_text(self.description)
        self._takes_resources: dict[str, bool] = {}
        self._plesty_sessions: dict[str, str] = {}
        self._pending: dict[Job, _Pending] = {}
        self._deadlines: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._results: deque[Job] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0
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
        """Connect the device (on its executor) and serve in a background thread.

        Raises whatever the device's connect raised, after closing the socket.
        """
        if self._thread is not None:
            return self
        self._started_at = self.clock()
        self._thread = threading.Thread(target=self._serve, name=f"io:{self.name}", daemon=True)
        self._thread.start()
        done = threading.Event()
        job = Job(_enter_device, (self.device,), label="connect", on_done=lambda j: done.set())
        self.executor.submit(job)
        if not done.wait(self.connect_timeout_s):
            self.stop()
            raise TimeoutError(
                f"{self.name}: device connect did not finish within {self.connect_timeout_s} s"
            )
        if not job.ok:
            self.stop()
            assert job.error is not None
            raise job.error
        self.connected = True
        log.info("%s: serving on %s", self.name, self.address)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving, disconnect the device and close the socket (bounded by `timeout`)."""
        self._stop_requested.set()
        self._wake()
        if self._thread is None:
            self._close_socket()
            self.executor.shutdown(0.1)
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    async def run(self) -> None:
        """Serve until cancelled (Ctrl+C in `asyncio.run`) or until `stop()` is called."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.start)
        stopped = loop.create_future()

        def wait_for_stop() -> None:
            self._stopped.wait()
            loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))

        threading.Thread(target=wait_for_stop, daemon=True).start()
        try:
            await stopped
        finally:
            self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped.is_set()

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the I/O loop ---------------------------------------------------------------------
    def _wake(self) -> None:
        # a full buffer means a wake-up is already pending; OSError: we are shutting down
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _job_done(self, job: Job) -> None:
        """Runs on the worker thread: hand the finished job to the I/O thread."""
        self._results.append(job)
        self._wake()

    def _serve(self) -> None:
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_lock_check = 0.0
        try:
            while not self._stop_requested.is_set():
                now = self.clock()
                if now >= next_lock_check:
                    self._expire_leases(now)
                    next_lock_check = now + 0.25
                timeout = _MAX_POLL_MS
                if self._deadlines:
                    timeout = min(timeout, max(0, int((self._deadlines[0][0] - now) * 1000) + 1))
                events = dict(poller.poll(timeout))
                if sock in events:
                    for _ in range(256):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._handle(frames)
                if self._wake_r.fileno() in events:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(65536)
                while self._results:
                    self._deliver(self._results.popleft())
                if self._deadlines:
                    self._expire_budgets(self.clock())
        except Exception:
            log.exception("%s: I/O loop failed; shutting down", self.name)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for pending in self._pending.values():
            if not pending.answered:
                self._send(
                    pending.route,
                    self._error(pending.request, "server is shutting down", "ShutdownError"),
                )
        if self.executor.healthy and (self.connected or self.executor.busy):
            self.executor.submit(Job(_exit_device, (self.device,), label="disconnect"))
        if not self.executor.shutdown(SHUTDOWN_BUDGET_S):
            current = self.executor.current
            log.warning(
                "%s: device still busy with %s at shutdown; closing without disconnect",
                self.name,
                current.label if current else "?",
            )
        self.connected = False
        self._close_socket()
        self._stopped.set()
        log.info("%s: stopped", self.name)

    def _close_socket(self) -> None:
        self._sock.close(linger=0)
        self._wake_r.close()
        self._wake_w.close()

    def _send(self, route: list[bytes], reply: dict[str, Any]) -> None:
        body = native.encode_reply(reply)
        try:
            self._sock.send_multipart([*route, body], zmq.NOBLOCK, copy=False)
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
        parts = native.split_frames(frames)
        request = None
        try:
            obj = native.decode_body(parts, self.max_message_bytes)
            request = native.parse_request(obj)
            self._handlers[request.type](parts, request)
        except ProtocolError as exc:
            log.warning(
                "%s: malformed request from %s: %s",
                self.name,
                native.client_id_of(parts.identity),
                exc,
            )
            self._send(
                parts.route,
                native.error_reply(
                    str(exc),
                    exc.wire_type,
                    exc.details.get("request_id"),
                    exc.details.get("has_id", False),
                ),
            )
        except LabmeshError as exc:
            self._send(parts.route, self._error(request, str(exc), exc.wire_type, **_details(exc)))
        except Exception as exc:  # a bug of ours must cost one request, never the server
            log.exception("%s: failed to handle a request", self.name)
            self._send(
                parts.route,
                self._error(request, f"internal server error: {exc!r}", "InternalError"),
            )

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
        session = self._session_of(parts, request) or secrets.token_urlsafe(16)
        now = self.clock()
        try:
            grant = self.locks.acquire(
                session,
                client_id,
                request.get("resources"),
                now,
                lease_s=lease,
                metadata=metadata,
            )
        except ResourceAllocationError as exc:
            log.info("%s: connect of %s refused: %s", self.name, client_id, exc)
            self._send(
                parts.route,
                self._error(
                    request,
                    str(exc),
                    exc.wire_type,
                    result={"client_id": client_id, "resources": [], "metadata": metadata},
                    **_details(exc),
                ),
            )
            return
        if lease is None:
            self._plesty_sessions[client_id] = session
        if grant.leaves:
            log.info("%s: %s holds %s", self.name, grant.describe_holder(), list(grant.leaves))
        result = {
            "client_id": client_id,
            "resources": list(grant.leaves),
            "metadata": metadata,
            "session": session,
            "lease": lease,
            "epoch": self.epoch,
        }
        self._send(parts.route, native.ok_reply(result, request))

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
        self._send(parts.route, native.ok_reply({"client_id": client_id}, request))

    def _on_describe(self, parts: native.Frames, request: native.Request) -> None:
        result = {
            **self.description,
            "protocol": native.PROTOCOL_NAME,
            "capabilities": CAPABILITIES,
            "healthy": self.executor.healthy,
            "epoch": self.epoch,
        }
        self._send(parts.route, native.ok_reply(result, request))

    def _on_help(self, parts: native.Frames, request: native.Request) -> None:
        self._send(parts.route, native.ok_reply({"help": self._help_text}, request))

    def _on_ping(self, parts: native.Frames, request: native.Request) -> None:
        now = self.clock()
        current = self.executor.current
        result = {
            "pong": True,
            "name": self.name,
            "healthy": self.executor.healthy,
            "connected": self.connected,
            "busy": current is not None,
            "running": {"label": current.label, "for_s": round(now - current.started_at, 3)}
            if current is not None
            else None,
            "queue_depth": self.executor.queue_depth,
            "epoch": self.epoch,
            "uptime_s": round(now - self._started_at, 3),
        }
        self._send(parts.route, native.ok_reply(result, request))

    def _on_heartbeat(self, parts: native.Frames, request: native.Request) -> None:
        now = self.clock()
        grant = self.locks.renew(request.session or "", now)
        result = {"lease_remaining": self.locks.remaining(grant, now), "epoch": self.epoch}
        self._send(parts.route, native.ok_reply(result, request))

    def _on_locks(self, parts: native.Frames, request: native.Request) -> None:
        now = self.clock()
        result = {"resources": sorted(self.locks.leaves), "holders": self.locks.holders(now)}
        self._send(parts.route, native.ok_reply(result, request))

    def _expire_leases(self, now: float) -> None:
        for grant in self.locks.expire(now):
            log.warning(
                "%s: lease of %s expired; freed %s",
                self.name,
                grant.describe_holder(),
                list(grant.leaves),
            )
            if self._plesty_sessions.get(grant.client_id) == grant.session:
                del self._plesty_sessions[grant.client_id]

    # ---- device requests (run on the executor) --------------------------------------------
    def _on_device_request(self, parts: native.Frames, request: native.Request) -> None:
        if not self.executor.healthy:
            raise ExecutorDeadError(
                f"{self.name}: the thread that runs this device's calls is not running; "
                "restart the server"
            )
        now = self.clock()
        session = self._session_of(parts, request)
        resources: list[str] = []
        if session is not None:
            grant = self.locks.grant(session)
            if grant is not None:
                grant.last_seen = now
                resources = list(grant.leaves)
        fn, args, kwargs, label = self._device_call(request)
        if resources and self._accepts_resources(label, fn):
            kwargs["resources"] = resources
        budget = request.timeout
        if budget is None and request.type == "call":
            budget = self._budgets.get(request.fields["func"])
        job = Job(fn, args, kwargs, label=label, on_done=self._job_done)
        deadline = now + budget if budget is not None else None
        self._pending[job] = _Pending(parts.route, request, now, deadline)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), job))
        self.executor.submit(job)

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
        if job.ok:
            self._send(pending.route, native.ok_reply(job.value, request))
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
        self._send(pending.route, self._error(request, message, wire_type_of(exc), **_details(exc)))

    def _expire_budgets(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self._deadlines)
            pending = self._pending.get(job)
            if pending is None or pending.answered:
                continue
            pending.answered = True
            if job.state == QUEUED and self.executor.cancel(job):
                del self._pending[job]
                current = self.executor.current
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
                )
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
            )


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
    summary = description["doc"].get("description")
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
