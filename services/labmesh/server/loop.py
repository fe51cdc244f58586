"""The device server's socket loop: one ROUTER socket, two threads, the core's actions executed.

Every decision is the pure `ServerCore`'s (see `labmesh.server.core`); this module owns what
has I/O: the ROUTER socket and its connection monitor, the two threads and the hand-over between
them, the clock, metrics and the log.

The thread that owns the socket decodes every message (through the core), answers control
requests and runs short device calls inline, so a query costs no thread hop. When a call runs
long (a 20 s exposure) the watchdog hands the socket to the standby thread, which keeps answering
ping and describe, enforces budgets and queues further calls: a budget that runs out gets
TimeoutError at once, while the device stays busy (no second call starts) until the call really
ends. See `labmesh.device.executor`.

Connections: libzmq's monitor reports each accepted and closed connection with its file
descriptor, and every message carries the descriptor it came in on, so the loop gives each
connection an id (`conn`) and tells the core when one closes. That is what binds a PLESTY
client's lock to its live connection and drops the waits of peers that left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from labmesh import access, metrics
from labmesh.audit import AuditLog
from labmesh.device.base import describe_device
from labmesh.device.executor import RUNNING, TAKEOVER_AFTER_S, Job, Watchdog
from labmesh.locks import DEFAULT_IDLE_LIMIT_S, LeaseTable
from labmesh.protocol import native
from labmesh.security import ServerSecurity, authenticate, stop_authenticating
from labmesh.server.core import (
    DEFAULT_FIXED_THREADING,
    Audit,
    Count,
    LocksChanged,
    Log,
    Publish,
    Run,
    Send,
    ServerCore,
    ServerLimits,
)
from labmesh.signals import install_stop_signals
from labmesh.transport import (
    bind_plaintext,
    bound_address,
    close_monitored,
    connection_monitor,
    pub_socket,
    router_socket,
)
from labmesh.version import __version__

if TYPE_CHECKING:
    from labmesh.compat.laplace import LaplaceAdapter

log = logging.getLogger("labmesh.server")

# plain ints: pyzmq's enum arithmetic costs about a microsecond a call on the hot path
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SRCFD = int(zmq.SRCFD)
_ACCEPTED = int(zmq.EVENT_ACCEPTED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
#: Message properties: the public key the ZAP handler proved, and the peer's IP address.
_USER_ID = "User-Id"
_PEER_ADDRESS = "Peer-Address"
#: How long an idle server waits in one receive before looking at its other duties (ms).
_IDLE_RECV_MS = 100
#: Longest an idle server with no session waits in one receive (ms); stop() wakes it at once.
_LONG_IDLE_MS = 60_000
#: Values a driver published that the server has not handled yet, at most (older ones drop).
_MAX_PUBLISHED_PENDING = 10_000


def _pub_address_for(address: str) -> str:
    """Where a server at `address` publishes updates: the same interface, a free port (or
    `<path>.pub` for ipc://, `<name>-pub` for inproc://)."""
    scheme, _, rest = address.partition("://")
    if scheme == "tcp":
        return f"tcp://{rest.rpartition(':')[0]}:0"
    return f"{address}.pub" if scheme == "ipc" else f"{address}-pub"


#: Longest the I/O loop sleeps when nothing is due.
_MAX_POLL_MS = 500
#: Longest the connection monitor goes unread while messages keep coming (s).
_MONITOR_CHECK_S = 0.01
#: Messages read in one go before the loop looks at its other duties.
_BATCH = 256


class DeviceServer:
    """Serves one device on one ZeroMQ ROUTER endpoint.

    Parameters:
        device: the driver object (a `labmesh.Device`, or any object with query/write and
            `@operation` methods).
        fixed_threading: run every device call on one dedicated thread (True, the default:
            see DEFAULT_FIXED_THREADING) or on whichever server thread is free (False).
        address: where to listen, e.g. `tcp://*:5555` or `tcp://127.0.0.1:0` (port chosen).
        name: the device's name in the lab (default: `device.name` or the class name).
        max_message_bytes: largest accepted request; larger ones get a ProtocolError
            (shorthand for `limits.max_message_bytes`).
        idle_limit_s: how long a lock without a lease (PLESTY client) survives silence.
        connect_timeout_s: how long `start()` waits for the device's connect.
        laplace: a `labmesh.compat.laplace.LaplaceAdapter` answering LAPLACE-LHC messages (`cmd` and
            `version`, no `type`) on this same socket (docs/protocol.md section 5).
        limits: the bounds on what a peer can make the server hold (`ServerLimits`); single
            fields can also be given as keywords, e.g. `max_waiters=100`.
        security: listen with CurveZMQ (`address` and the update feed), give each known key
            its role, and optionally a plaintext listener (labmesh.security.ServerSecurity;
            docs/security.md). None: plaintext, every peer may do everything.
        audit: where audit lines go (labmesh.audit.AuditLog; events are counted either way).
    """

    def __init__(
        self,
        device: Any,
        *,
        fixed_threading: bool = DEFAULT_FIXED_THREADING,
        address: str = "tcp://*:5555",
        name: str | None = None,
        max_message_bytes: int | None = None,
        idle_limit_s: float = DEFAULT_IDLE_LIMIT_S,
        connect_timeout_s: float = 60.0,
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        laplace: LaplaceAdapter | None = None,
        limits: ServerLimits | None = None,
        pub_address: str | None = None,
        export: dict[str, float] | None = None,
        security: ServerSecurity | None = None,
        audit: AuditLog | None = None,
        **limit_fields: Any,
    ) -> None:
        limits = limits or ServerLimits()
        if max_message_bytes is not None:
            limit_fields["max_message_bytes"] = max_message_bytes
        if limit_fields:
            fields = {f.name for f in dataclasses.fields(ServerLimits)}
            unknown = sorted(set(limit_fields) - fields)
            if unknown:
                raise TypeError(
                    f"DeviceServer got unknown option(s) {unknown}; limits are {sorted(fields)}"
                )
            limits = dataclasses.replace(limits, **limit_fields)
        self.device = device
        self.name = name or describe_device(device)["name"]
        self.limits = limits
        self.max_message_bytes = limits.max_message_bytes
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self.security = security
        self.audit = audit
        policy = None
        if security is not None:
            policy = access.AccessPolicy(
                security.roles, security.plaintext_role, security.keyring.name_of
            )
        self.core = ServerCore(
            device,
            self.name,
            limits=limits,
            idle_limit_s=idle_limit_s,
            envelope=laplace,
            access=policy,
        )
        self.core.export(export or {}, self.clock())
        self._new_metrics()
        self._laplace = laplace
        if laplace is not None:
            laplace.attach(self)
        self.fixed_threading = fixed_threading
        # An own context by default: terminating it on stop guarantees the port is released
        # when stop() returns (a socket close alone finishes asynchronously).
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        self._domains: tuple[str, ...] = ()
        curve = plaintext = plaintext_pub = None
        #: the server's public key (Z85 text) when it listens with CurveZMQ
        self.server_key: str | None = None
        if security is not None and policy is not None:
            curve = security.pair
            self.server_key = curve.public.decode()
            plaintext = security.plaintext_address
            if (
                plaintext is not None
                and access.role_rank(security.plaintext_role, "plaintext") >= access.OBSERVER
            ):
                plaintext_pub = _pub_address_for(plaintext)
            self._domains = (f"labmesh/{self.name}", f"labmesh-pub/{self.name}")
            authenticate(
                self._ctx,
                {self._domains[0]: policy.may_connect, self._domains[1]: policy.may_subscribe},
            )
        wake_address = f"inproc://labmesh-wake-{id(self):x}-{secrets.token_hex(4)}"
        try:
            self._sock = router_socket(
                self._ctx,
                address,
                limits.max_message_bytes,
                limits.max_replies_queued_per_peer,
                curve=curve,
                domain=self._domains[0] if curve else "",
                wake_address=wake_address,
            )
        except OSError:
            self._end_context()
            raise
        self.address = bound_address(self._sock)
        # the wake-up line into a receive that blocks while the server is idle (see _wake)
        self._wake_id = b"wake-" + secrets.token_bytes(8)
        self._waker = self._ctx.socket(zmq.DEALER)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.setsockopt(zmq.IDENTITY, self._wake_id)
        self._waker.connect(wake_address)
        self._waker_lock = threading.Lock()
        #: the thread waiting in a blocking receive (None: none), for _wake
        self._blocking: threading.Thread | None = None
        self._rcvtimeo = _IDLE_RECV_MS
        try:
            self._pub = pub_socket(
                self._ctx,
                pub_address or _pub_address_for(address),
                limits.max_updates_queued_per_subscriber,
                curve=curve,
                domain=self._domains[1] if curve else "",
            )
        except OSError:
            self._sock.close(linger=0)
            self._end_context()
            raise
        #: where value updates are published (subscribe replies tell clients)
        self.pub_address = self.core.pub_endpoint = bound_address(self._pub)
        #: a secured server's plaintext listener (None: none)
        self.plaintext_address: str | None = None
        try:
            if plaintext is not None:
                self.plaintext_address = bind_plaintext(self._sock, plaintext)
            if plaintext_pub is not None:
                self.core.plaintext_pub_endpoint = bind_plaintext(self._pub, plaintext_pub)
        except OSError:
            self._sock.close(linger=0)
            self._pub.close(linger=0)
            self._end_context()
            raise
        self.core.wall_offset = time.time() - self.clock()
        self._published: collections.deque[tuple[str, Any]] = collections.deque(
            maxlen=_MAX_PUBLISHED_PENDING
        )
        with contextlib.suppress(AttributeError, TypeError):
            device._labmesh_publish = self._publish_from_device
        self._monitor = connection_monitor(self._sock)
        self._conn_of_fd: dict[int, int] = {}
        self._conn_ids = 0
        self._gone: list[int] = []
        self._next_monitor_check = 0.0
        self._head: zmq.Frame | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sock.setsockopt(zmq.RCVTIMEO, _IDLE_RECV_MS)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
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
        self._starting = threading.Lock()
        self._lock_rows: list[dict[str, Any]] = []
        self._watchdog: Watchdog | None = None
        self.connected = False
        #: Why the server stopped when it stopped on its own (e.g. "a LAPLACE STOP from X").
        self.stop_reason: str | None = None

    # ---- what compatibility code may use (docs/server.md) ---------------------------------
    # `name`, `device`, `address`, `running`, `stop()`, and these; nothing private.
    @property
    def description(self) -> dict[str, Any]:
        """The device's description as `describe` serves it (re-read after connect)."""
        return self.core.description

    def touches(
        self, request_type: str, name: str, args: tuple = (), kwargs: dict | None = None
    ) -> tuple[str, ...]:
        """The lock leaves a write or call would touch (every leaf unless it is declared)."""
        return self.core.touches(request_type, name, args, kwargs or {})

    def check_unlocked(self, touches: tuple[str, ...]) -> None:
        """Raise ResourceLockedError if any of `touches` is held by a session (for a message
        that carries no session, such as LAPLACE's)."""
        if touches:
            self.core.locks.check(None, touches, self.clock())

    def cancel_task(self, why: str) -> str | None:
        """Stop the running task (e.g. a move) at its next step; its id, or None if none runs.
        Called from the server's own thread (an envelope handler), like the rest of this
        interface."""
        return self.core.cancel_running_task(why)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until the server has stopped (or `timeout` seconds); True if it has."""
        return self._stopped.wait(timeout)

    @property
    def locks(self) -> LeaseTable:
        """The lease table (for tools and tests that inspect it; not for compat code)."""
        return self.core.locks

    @property
    def epoch(self) -> str:
        return self.core.epoch

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> DeviceServer:
        """Connect the device (on its own thread) and serve in the background.

        Raises whatever the device's connect raised, after closing the socket.
        """
        with self._starting:  # (a stop() meanwhile waits until both threads have started)
            if self._threads:
                return self
            self.core.started_at = self.clock()
            threads = [
                threading.Thread(target=self._thread_main, name=f"{role}:{self.name}", daemon=True)
                for role in ("device", "standby")
            ]
            self._device_thread = threads[0]
            self._threads = threads
            for thread in threads:
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
        # a stop racing start() (SIGTERM while the device thread already serves and the
        # standby is not started yet) waits until start() has started both; a thread that is
        # still not started (stop called inside start, e.g. by a signal handler) is not
        # joined: it cannot be before it starts, and it ends at once when it does
        if self._starting.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._starting.release()
        for thread in self._threads:
            if thread is not me and thread.ident is not None:
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
        signals = install_stop_signals(loop, lambda: loop.run_in_executor(None, self.stop))
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
    # Exactly one thread owns the socket (and calls the core) at a time (`_owner`, changed
    # under `_cond`). The owner runs device calls inline when it may (fixed_threading: only
    # the device thread). When a call runs long the watchdog moves ownership to the other
    # thread, which keeps answering while the call runs; the caller posts its finished job to
    # `_results` and waits.
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
                self.core.healthy = False
                self.core.executor_alive = not (self.fixed_threading and me is self._device_thread)
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

    def _new_metrics(self) -> None:
        self.metrics = metrics.DeviceMetrics(self.name, frozenset(self.core.budgets))

    def _connect_device(self, me: threading.Thread) -> None:
        job = Job(_enter_device, (self.device,), label="connect")
        job.run()
        if job.ok:
            self.core.describe()
            self._new_metrics()
            self.connected = self.core.connected = True
            self._watchdog = Watchdog.shared()
            self._watchdog.add(self)
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
        for run in self.core.abandoned:  # a move left running: bring the hardware to rest
            Job(run.step, ("the server is shutting down",), label="stop task").run()
        self.core.abandoned.clear()
        if self.connected:
            job = Job(_exit_device, (self.device,), label="disconnect")
            job.run()
            self.connected = self.core.connected = False
            if not job.ok:
                log.error("%s: disconnect failed: %r", self.name, job.error)

    def metrics_snapshot(self) -> dict[str, Any]:
        """Scrape-time state for metrics (read from another thread: plain attribute reads)."""
        return {
            "device": self.name,
            "up": self.connected and self.healthy,
            "busy": self._running is not None or self.core.tasks.active is not None,
            "queue_depth": self.core.queue_depth,
            "in_flight": self.core.in_flight,
            "waiters": self.core.locks.waiting,
            "locks": self._lock_rows,
            "values": self.core.exported_values(),
        }

    def check_long_call(self, now: float) -> bool:
        """Called by the watchdog: hand the socket to the other thread if a call runs long."""
        job = self._running
        if job is None:
            return False
        thread = job.thread
        if thread is None or job.state != RUNNING or now - job.started_at < TAKEOVER_AFTER_S:
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
        if self._blocking is not None:  # the owner waits in a plain receive: reach it there
            with self._waker_lock, contextlib.suppress(zmq.ZMQError):
                self._waker.send(b"", _NOBLOCK)

    # ---- the owner's loop -------------------------------------------------------------------
    def _serve_as_owner(self, me: threading.Thread) -> None:
        """Serve the socket until ownership moves elsewhere or the server stops."""
        core = self.core
        poller = self._poller
        sock = self._sock
        monitor = self._monitor
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
                    self._execute(core.job_done(job, self.clock()))
            if self._published:
                self._drain_published()
            if core.running is None and core.has_work:
                if not may_run and self._device_thread_alive():
                    self._hand_over(self._device_thread)  # queued calls run there
                    return
                if may_run and not self._run_next(me):
                    return
            now = self.clock()
            if now >= core.next_wakeup():
                core.wall_offset = time.time() - now
                self._execute(core.tick(now))
            if (
                core.running is None
                and not core.has_work
                and not self._results
                # a task's next step or a subscriber's update needs better than _IDLE_RECV_MS
                and core.tasks.active is None
                and not core.subs.streams
            ):
                # idle: only the socket needs watching, so wait in a plain receive, which is
                # cheaper than a poll; stop() and published values reach it through the wake
                # line. With no session it sleeps until the core's next duty (an idle host
                # costs no wake-ups); with sessions it looks at closed connections (PLESTY
                # locks, waiters) every _IDLE_RECV_MS.
                wait_ms = _IDLE_RECV_MS
                if not core.locks.session_count and not core.locks.waiting:
                    wait_ms = max(1, min(_LONG_IDLE_MS, int((core.next_wakeup() - now) * 1000)))
                if wait_ms != self._rcvtimeo:
                    self._sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                    self._rcvtimeo = wait_ms
                self._blocking = me
                if self._stop_requested or self._published or self._results:
                    self._blocking = None
                    continue
                try:
                    if not self._receive(me, may_run, block=True):
                        return
                finally:
                    if self._blocking is me:  # not the other thread's wait (after a handover)
                        self._blocking = None
                continue
            if core.has_work or self._results:
                timeout = 0
            else:
                timeout = min(_MAX_POLL_MS, max(0, int((core.next_wakeup() - now) * 1000) + 1))
            try:
                events = dict(poller.poll(timeout))
            except zmq.ZMQError as exc:
                log.error("%s: poll failed: %s", self.name, exc)
                continue
            if monitor in events:
                self._check_monitor()
            if sock in events and not self._receive(me, may_run, block=False):
                return
            if wake_fd in events:
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_r.recv(65536)

    def _receive(self, me: threading.Thread, may_run: bool, block: bool) -> bool:
        """Read what the socket has (waiting up to _IDLE_RECV_MS if `block`); a call that can
        start now runs right away. False if the socket was handed over meanwhile."""
        sock = self._sock
        core = self.core
        secured = self.security is not None
        flags = 0 if block else _NOBLOCK
        now = self.clock()
        if now >= self._next_monitor_check:  # under steady load there is never an idle moment
            self._next_monitor_check = now + _MONITOR_CHECK_S
            self._check_monitor()
        for _ in range(_BATCH):
            try:
                head = sock.recv(flags, copy=False)
            except zmq.Again:
                if block:
                    self._check_monitor()
                return True
            flags = _NOBLOCK
            if head.more:  # the usual [identity, body]: two plain receives, no RCVMORE query
                part = sock.recv(_NOBLOCK, copy=False)
                frames = [part.bytes]
                while part.more:
                    part = sock.recv(_NOBLOCK, copy=False)
                    frames.append(part.bytes)
            else:
                frames = []
            self._head = head
            if len(frames) == 1 and head.bytes == self._wake_id:
                if not sock.get(_EVENTS) & _POLLIN:
                    return True
                continue  # a wake-up, not a request
            if secured:
                actions = core.receive(
                    head.bytes,
                    frames,
                    self.clock(),
                    self._conn_of_message,
                    head.get(_USER_ID),
                    self._peer_of_message,
                )
            else:
                actions = core.receive(
                    head.bytes,
                    frames,
                    self.clock(),
                    self._conn_of_message,
                    None,
                    self._peer_of_message,
                )
            if actions:
                self._execute(actions)
            if self._gone:
                self._flush_gone()
            if core.has_work and may_run and not self._run_next(me):
                return False
            if not sock.get(_EVENTS) & _POLLIN:
                return True
        return True

    def _peer_of_message(self) -> str | None:
        """The network address of the peer whose message is being handled (for the audit
        trail; None where the transport has none, e.g. inproc)."""
        try:
            return self._head.get(_PEER_ADDRESS)
        except zmq.ZMQError:
            return None

    def _conn_of_message(self) -> int | None:
        """The connection the message being handled came on (the core asks only when a rule
        needs it). A connection's ACCEPTED event is queued before its first message can be
        read, so with the monitor drained first, the descriptor's connection id is current.

        A message whose descriptor has no live connection comes from a peer that is gone: it
        gets a connection of its own that is reported gone right after it, so nothing the core
        binds to it outlives the message. Connections that closed meanwhile are reported to the
        core after this message."""
        try:
            fd = self._head.get(_SRCFD)
        except zmq.ZMQError:
            return None  # inproc: no descriptor
        self._drain_monitor()
        conn = self._conn_of_fd.get(fd)
        if conn is None:
            self._conn_ids += 1
            conn = self._conn_ids
            self._gone.append(conn)
        return conn

    def _check_monitor(self) -> None:
        if self._monitor.get(_EVENTS) & _POLLIN:
            self._drain_monitor()
        if self._gone:
            self._flush_gone()

    def _drain_monitor(self) -> None:
        """Read the connection events: keep the descriptor -> connection map current, and
        remember the connections that closed (`_flush_gone` tells the core)."""
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(_NOBLOCK))
            except zmq.ZMQError:  # Again: nothing more; otherwise closing
                return
            fd = int(event["value"])
            if event["event"] == _ACCEPTED:
                old = self._conn_of_fd.get(fd)
                if old is not None:  # its close was not reported: it is gone all the same
                    self._gone.append(old)
                self._conn_ids += 1
                self._conn_of_fd[fd] = self._conn_ids
            elif event["event"] == _DISCONNECTED:
                conn = self._conn_of_fd.pop(fd, None)
                if conn is not None:
                    self._gone.append(conn)

    def _flush_gone(self) -> None:
        gone, self._gone = self._gone, []
        for conn in gone:
            self._execute(self.core.peer_gone(conn, self.clock()))

    def _run_next(self, me: threading.Thread) -> bool:
        """Run the next queued call on this thread; False if the socket was handed over."""
        actions = self.core.start_next(self.clock())
        if len(actions) == 1 and type(actions[0]) is Run:  # the usual case, without the loop
            job = actions[0].job
        else:
            job = self._execute(actions)
            if job is None:
                return True
        job.thread = me
        with self._state:
            self._running = job
        watchdog = self._watchdog
        if watchdog is not None and watchdog.dormant:
            watchdog.wake()  # the first call after a quiet spell: have it watched again
        job.run()
        with self._state:
            self._running = None
            still_owner = self._owner is me
            if not still_owner:
                self._results.append(job)
        if still_owner:
            actions = self.core.job_done(job, self.clock())
            if len(actions) == 1 and type(actions[0]) is Send:
                failed = self._send(actions[0])
                if failed is not None:
                    self._execute(self.core.undeliverable(actions[0], failed, self.clock()))
            else:
                self._execute(actions)
            return True
        self._wake()
        return False

    def _publish_from_device(self, name: str, value: Any) -> None:
        """Device.publish lands here, from whichever thread runs device code."""
        self._published.append((name, value))
        self._wake()

    def _drain_published(self) -> None:
        published = self._published
        while published:
            name, value = published.popleft()
            self._execute(self.core.published(name, value, self.clock()))

    def _execute(self, actions: list) -> Job | None:
        """Carry out the core's actions; returns the job a Run asks for (the caller runs it).

        A reply that cannot be delivered yields more actions (a lock passed to the next waiter,
        whose peer may be gone too): they join the same work list, never a deeper call."""
        run = None
        for action in actions:  # a list iterator also visits what is appended meanwhile
            kind = type(action)
            if kind is Send:
                failed = self._send(action)
                if failed is not None:
                    actions.extend(self.core.undeliverable(action, failed, self.clock()))
            elif kind is Run:
                run = action.job
            elif kind is Count:
                getattr(self.metrics, action.event)(*action.args)
            elif kind is Log:
                log.log(action.level, "%s", action.message)
            elif kind is Publish:
                with contextlib.suppress(zmq.ZMQError):  # PUB drops, never blocks
                    self._pub.send_multipart((action.topic, action.body), _NOBLOCK)
            elif kind is Audit:
                self.metrics.audited(action.event, action.outcome)
                if self.audit is not None:
                    self.audit.write(self.name, action, action.at + self.core.wall_offset)
            elif kind is LocksChanged:
                # a fresh list, so a scrape never sees one half-built; wall-clock `since`
                offset = time.time() - self.clock()
                self._lock_rows = [{**row, "since": row["since"] + offset} for row in action.rows]
        return run

    def _send(self, send: Send) -> str | None:
        """Send a reply and record its latency; the reason it could not be queued, if so."""
        sock = self._sock
        failed = None
        try:
            for frame in send.route:
                sock.send(frame, _SNDMORE_NOBLOCK)
            sock.send(send.body, _NOBLOCK, copy=False)
        except zmq.Again:
            failed = "peer_not_reading"
        except zmq.ZMQError:  # EHOSTUNREACH (ROUTER_MANDATORY): that peer disconnected
            failed = "peer_gone"
        observe = send.observe
        if observe is not None:
            self.metrics.observe(
                observe.rtype, observe.operation, observe.status, self.clock() - observe.received
            )
            if observe.error_type is not None:
                self.metrics.error(observe.rtype, observe.error_type)
        return failed

    def _shutdown_as_owner(self) -> None:
        self._execute(self.core.shutdown(self.clock()))
        self._close_socket()
        with self._cond:
            self._owner = None
            self._cond.notify_all()

    def _close_socket(self) -> None:
        with self._waker_lock:
            self._waker.close(linger=0)
        close_monitored(self._sock, self._monitor)
        self._pub.close(linger=0)
        self._end_context()

    def _end_context(self) -> None:
        waker = getattr(self, "_waker", None)
        if waker is not None and not waker.closed:  # every socket must close before term()
            with self._waker_lock:
                waker.close(linger=0)
        if self._domains:
            stop_authenticating(self._ctx, self._domains)
            self._domains = ()
        if self._own_ctx:
            self._ctx.term()


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


def build_server(
    device: Any,
    fixed_threading: bool = DEFAULT_FIXED_THREADING,
    address: str = "tcp://*:5555",
    **options: Any,
) -> DeviceServer:
    """Serve `device` at `address` (PLESTY's signature). Then `await server.run()`, or
    `server.start()` ... `server.stop()` from synchronous code. `options` go to DeviceServer.
    """
    return DeviceServer(device, fixed_threading=fixed_threading, address=address, **options)
