"""The device server's decisions, with no I/O: what to answer, what to run, what to refuse.

`ServerCore` follows caproto's `_circuit.py` and h11's `Connection`: the socket loop feeds it
events and executes the actions it returns.

- `receive(identity, frames, now, conn)`: one ROUTER message (the routing identity, the frames
  after it) from the connection `conn` (an id the loop gives each accepted connection).
- `start_next(now)`: the loop may run a device call now; the core picks it (or none).
- `job_done(job, now)`: a device call finished.
- `tick(now)`: time passed (leases, waiters, budgets, log summaries).
- `peer_gone(conn, now)`: a connection closed.
- `undeliverable(send, reason, now)`: a reply could not be queued to its peer.
- `shutdown(now)`: the server stops; every unanswered request gets its reply.

Actions are `Send` (a reply to a route, with the latency observation it closes), `Run` (run this
job on the device now), `Count` (a metric event), `Log` and `LocksChanged`. No sockets, threads or
clock reads here: every rule (sessions, PLESTY sessions bound to their connection, leases,
waiters, budgets, the call queue, every bound a peer can hit, LAPLACE dispatch) is unit-tested
with plain data.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import labmesh.server.tasks as task_states
from labmesh import access
from labmesh.compat.plesty import PlestySessions
from labmesh.device.base import describe_device, task_function, touched_resources
from labmesh.device.executor import RUNNING, Job
from labmesh.device.tasks import Step, TaskRun
from labmesh.hints import did_you_mean
from labmesh.locks import DEFAULT_IDLE_LIMIT_S, Grant, LeaseTable, Waiter, quote_names
from labmesh.logbudget import DEFAULT_BURST, DEFAULT_INTERVAL_S, LogBudget
from labmesh.protocol import native
from labmesh.protocol.errors import (
    BudgetExpiredError,
    BusyError,
    ExecutorDeadError,
    InternalError,
    LabmeshError,
    LeaseExpiredError,
    ProtocolError,
    ResourceAllocationError,
    ResourceLockedError,
    ShutdownError,
    TaskCancelledError,
    UnknownOperationError,
    UnknownParameterError,
    UnknownTaskError,
    wire_type_of,
)
from labmesh.protocol.topics import Filter
from labmesh.server.subscriptions import Subscriptions
from labmesh.server.tasks import Task, TaskTable

CAPABILITIES = [
    "budgets",
    "still_running",
    "sessions",
    "leases",
    "ping",
    "heartbeat",
    "locks",
    "bounds",
    "tasks",
    "subscriptions",
]
#: The operation label of a request naming something the device does not declare (so a peer
#: cannot grow the metric series).
UNDECLARED = "(undeclared)"
#: How often leases and waiters are looked at when nothing else is due (s).
LOCK_CHECK_S = 0.25
#: How often a server without any session or waiter looks at its locks anyway (s).
IDLE_LOCK_CHECK_S = 60.0

_UNRESOLVED = object()
_INFO = logging.INFO
_WARNING = logging.WARNING
_ERROR = logging.ERROR


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Everything a peer can make a device server hold is bounded by one of these.

    Hitting a bound is an error reply to that peer plus a count in
    `labmesh_bound_refusals_total{bound=<field name>}` (or, for replies a peer does not read,
    `labmesh_replies_dropped_total`), never a log line each.

    Attributes:
        max_message_bytes: largest request body; larger ones get a ProtocolError. ZeroMQ itself
            drops the connection of a peer sending a frame over `native.ZMQ_CUT_FACTOR` (4)
            times this (nothing can be answered then).
        max_replies_queued_per_peer: replies ZeroMQ holds for one peer that does not read them
            (its send high-water mark); further replies to it are dropped and counted.
        max_updates_queued_per_subscriber: subscription updates ZeroMQ holds for one
            subscriber that does not read them (the PUB high-water mark); further updates to it
            are dropped, and its sequence numbers show the gap.
        max_streams: subscription streams (one per name and filter) at once; more BusyError.
        max_streams_per_session: streams one session may subscribe to; more get BusyError.
        max_status_waiters: `task_status` requests waiting on one task; more get BusyError.
        max_queue_per_device: device calls waiting for the device; more get BusyError.
        max_queue_per_session: calls one session (or one connection without a session) may
            have waiting; more get BusyError.
        max_queue_bytes: request bytes of the calls waiting for the device, together (a
            write of a large array waits with its value); more get BusyError.
        max_sessions: sessions (connects) kept at once. A new connect beyond it ends the oldest
            session that holds no lock (its client, if still there, reconnects silently);
            when every session holds a lock it gets BusyError.
        max_waiters: connects waiting (`wait`) for busy resources; more get BusyError.
        max_wait_s: longest `wait` honoured; longer requests wait this long.
        max_connect_paths: resource paths one connect may name (use a prefix for more).
        max_metadata_bytes: size of a connect's metadata (the experiment name, ...) as JSON.
        log_burst, log_interval_s: log lines written per cause per interval; the rest are
            counted in one summary line.
    """

    max_message_bytes: int = native.DEFAULT_MAX_MESSAGE_BYTES
    max_replies_queued_per_peer: int = 512
    max_updates_queued_per_subscriber: int = 1000
    max_streams: int = 10_000
    max_streams_per_session: int = 1_000
    max_status_waiters: int = 100
    max_queue_per_device: int = 1000
    max_queue_per_session: int = 100
    max_queue_bytes: int = 64 * 1024 * 1024
    max_sessions: int = 4096
    max_waiters: int = 1000
    max_wait_s: float = 300.0
    max_connect_paths: int = 4096
    max_metadata_bytes: int = 4096
    log_burst: int = DEFAULT_BURST
    log_interval_s: float = DEFAULT_INTERVAL_S


# ---- actions ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Observation:
    """The latency sample a reply closes: request type, operation label, outcome, arrival."""

    rtype: str
    operation: str
    status: str  # ok | error | timeout
    error_type: str | None
    received: float


@dataclass(slots=True)
class Send:
    """Send `body` to `route`. `grant`: the session this reply hands a lock to (if the peer
    cannot be reached, the loop reports it with `undeliverable` and the grant is taken back)."""

    route: list[bytes]
    body: bytes
    observe: Observation | None = None
    grant: str | None = None


@dataclass(slots=True)
class Run:
    """Run `job` on the device now (the core marked the device busy with it)."""

    job: Job


@dataclass(slots=True)
class Count:
    """A metric event: `DeviceMetrics.<event>(*args)`."""

    event: str
    args: tuple = ()


@dataclass(slots=True)
class Log:
    level: int
    message: str


@dataclass(slots=True)
class LocksChanged:
    """Who holds what now; `since` values are on the core's (monotonic) clock."""

    rows: list[dict[str, Any]]


@dataclass(slots=True)
class Publish:
    """Send one update on the PUB socket (libzmq fans it out to the topic's subscribers)."""

    topic: bytes
    body: bytes


@dataclass(slots=True)
class Audit:
    """One audit event (docs/security.md): a write or call and its outcome, a lock granted,
    released, expired or force-released, a refused permission. `value` is already bounded."""

    event: str
    client: str
    peer: str | None
    target: str
    value: Any
    outcome: str
    at: float


Action = Send | Run | Count | Log | LocksChanged | Publish | Audit

#: Longest text of a value or arguments an audit event carries.
AUDIT_VALUE_CHARS = 200


@dataclass(slots=True)
class _Pending:
    """A device call accepted and not yet answered (queued or running)."""

    route: list[bytes]
    request: native.Request
    received: float
    deadline: float | None
    session: str | None
    touches: tuple[str, ...]
    operation: str
    queue_key: Any
    observe: Observation
    size: int = 0
    answered: bool = False
    answer: EnvelopeAnswer | None = None
    task: Task | None = None
    #: may run between the steps of a running task (a read, or a preempting call)
    between_steps: bool = False
    #: a read the server makes itself (for subscribers): the names it reads
    reads: tuple[str, ...] = ()
    #: the subscribe request answered once those reads are done (their streams)
    streams: tuple[Any, ...] = ()
    #: who sent an audited request: (client, peer address) of a write or call, (client, peer,
    #: payload) of a state-changing envelope message
    audit: tuple[Any, ...] | None = None


#: Whether a device's calls all run on one dedicated thread, unless a server is told otherwise
#: (DeviceServer(fixed_threading=...), `fixed_threading:` in the host file). True, as PLESTY's
#: build_server since 2026-08: instrument drivers have thread affinity (an NI-DAQmx task, a
#: VISA session or a .NET callback bound to the thread that made it), not only thread-unsafety,
#: and moving them between threads fails in ways tests rarely show. It costs nothing on the hot
#: path: short calls run inline on that thread (docs/server.md).
DEFAULT_FIXED_THREADING = True


class EnvelopeAnswer:
    """How the server answers one message of a second protocol (LAPLACE-LHC's envelope).

    `now` is sent at once (None: nothing yet). `job`, when set, is queued on the device like a
    native call; when it ends, `reply(job)` gives the reply to send (None: nothing, because `now`
    already answered). `touches` are the lock leaves the job touches, checked when it starts.
    `as_task`: the job's function returns a generator, stepped as a task (a LAPLACE SET moving
    axes), so reads and preempting calls are served while it runs.
    """

    __slots__ = ("_done", "_fail", "as_task", "command", "job", "now", "touches")

    def __init__(
        self,
        command: str,
        *,
        now: dict[str, Any] | None = None,
        job: Job | None = None,
        done: Callable[[Job], dict[str, Any] | None] | None = None,
        fail: Callable[[str], dict[str, Any]] | None = None,
        touches: tuple[str, ...] = (),
        as_task: bool = False,
    ) -> None:
        self.command = command
        self.now = now
        self.job = job
        self.as_task = as_task
        self.touches = touches
        self._done = done
        self._fail = fail

    def reply(self, job: Job) -> dict[str, Any] | None:
        """The reply once `job` ended (ok or not), or None when nothing more is sent."""
        return self._done(job) if self._done is not None else None

    def failed(self, text: str) -> dict[str, Any] | None:
        """The reply when the job cannot run (server shutting down), or None if already answered."""
        if self.now is not None or self._fail is None:
            return None
        return self._fail(text)


class EnvelopeHandler(Protocol):
    """A second wire protocol served on the device server's socket, next to the native one
    (labmesh.compat.laplace.LaplaceAdapter). The core asks it these five things, nothing else."""

    #: the request type metrics count its messages under (`laplace`)
    metric_type: str

    def claims(self, obj: Any) -> bool:
        """Whether a decoded message is this protocol's (not a native request)."""

    def handle(self, obj: Any, busy: bool) -> EnvelopeAnswer:
        """Answer one message (never raises); `busy`: the device has calls running or queued."""

    def refuse(self, obj: Any, text: str) -> dict[str, Any]:
        """The reply refusing `obj` in this protocol's error shape (a bound was reached)."""

    def undecodable(self, text: str) -> dict[str, Any]:
        """Fields added to the native error reply to a body that is not JSON at all, so this
        protocol's clients can read it too."""

    def needed(self, obj: Any) -> int:
        """The role rank (labmesh.access) a message needs on a secured device."""

    def error_type(self, reply: dict[str, Any]) -> str | None:
        """The error type metrics count a reply in this protocol's shape under (None: ok)."""


class ServerCore:
    """All of one device server's decisions (see the module docstring).

    Parameters:
        device: the driver object (only described and wrapped in jobs here, never called).
        name: the device's name in the lab.
        limits: the bounds (ServerLimits).
        idle_limit_s: how long a grant without a lease survives silence.
        envelope: a second protocol answered on the same socket (EnvelopeHandler).
        access: the device's roles (labmesh.access.AccessPolicy); None: every peer may do
            everything (a server without CurveZMQ keys).
    """

    def __init__(
        self,
        device: Any,
        name: str,
        *,
        limits: ServerLimits | None = None,
        idle_limit_s: float = DEFAULT_IDLE_LIMIT_S,
        envelope: EnvelopeHandler | None = None,
        access: access.AccessPolicy | None = None,
    ) -> None:
        self.device = device
        self.access = access
        #: who sent the message being handled (a secured server), and where its address is read
        self._who: access.Principal | None = None
        self._peer_source: Any = None
        self.name = name
        self.limits = limits or ServerLimits()
        self.epoch = secrets.token_hex(6)
        self.locks = LeaseTable(idle_limit_s=idle_limit_s)
        self.envelope = envelope
        self.logs = LogBudget(self.limits.log_burst, self.limits.log_interval_s)
        #: set by the loop: the device is connected / every server thread is alive /
        #: the thread that runs this device's calls is alive
        self.connected = False
        self.healthy = True
        self.executor_alive = True
        self.started_at = 0.0
        self.running: Job | None = None
        self._queue: deque[Job] = deque()
        self._queued_by: dict[Any, int] = {}
        self._queued_bytes = 0
        self._body_size = 0
        self._pending: dict[Job, _Pending] = {}
        self._deadlines: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._plesty = PlestySessions()
        self._waiters_by_conn: dict[Any, set[str]] = {}
        self.tasks = TaskTable()
        #: tasks running when the server stopped: the loop throws the cancel into each on the
        #: device thread before disconnecting, so the hardware comes to rest
        self.abandoned: list[TaskRun] = []
        self.subs = Subscriptions(self.limits.max_streams, self.limits.max_streams_per_session)
        self.exported: dict[str, str] = {}
        #: set by the loop: where updates are published, and wall time minus the core's clock
        self.pub_endpoint: str | None = None
        #: a secured server's plaintext update feed (for peers of its plaintext listener)
        self.plaintext_pub_endpoint: str | None = None
        self.wall_offset = 0.0
        self._step_due = False
        self._between_steps_queued = 0
        #: reads the server makes itself (polls, subscribe reads) queued or running
        self._reads_in_flight = 0
        self._takes_resources: dict[str, bool] = {}
        self._conn_source: Any = None
        self._conn_value: Any = _UNRESOLVED
        self._next_lock_check = 0.0
        self._wakeup = 0.0
        self.describe()

    # ---- declarations ---------------------------------------------------------------------
    def describe(self) -> None:
        """(Re)read the device's declarations: at construction, and after connect, where a
        driver may have learned its limits or channels from the instrument."""
        description = describe_device(self.device)
        description["name"] = self.name
        self.locks.register(description["resources"])
        self.methods = frozenset(description["methods"])
        self.preempts = frozenset(description["preempt"])
        self.read_only_ops = frozenset(description["read_only"])
        self.budgets: dict[str, float] = description["budgets"]
        self.help_text = help_text(description)
        self.description = description
        params = description["doc"]["parameters"]["default"]
        declared = {p["name"] for p in params}
        self.declared = frozenset(declared | self.methods)
        self.readable = frozenset(p["name"] for p in params if not p["write_only"])
        for p in params:
            if p.get("poll_s") and not p["write_only"]:
                self.subs.pin(p["name"], float(p["poll_s"]), 0.0)

    def operation_label(self, name: Any) -> str:
        if not name:
            return ""
        return name if name in self.declared else UNDECLARED

    # ---- state the loop reads --------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """A call runs on the device, or a task is in progress (between its steps too)."""
        return self.running is not None or self.tasks.active is not None

    @property
    def has_work(self) -> bool:
        """The device is free and something can run on it now (the loop should call
        start_next): a queued call, or, while a task runs, a read or preempting call queued or
        the task's next step due."""
        if self.running is not None:
            return False
        if self.tasks.active is None:
            return bool(self._queue)
        return self._step_due or self._between_steps_queued > 0

    def next_wakeup(self) -> float:
        """When `tick` has something to do next (leases, waiters, budgets, log summaries)."""
        return self._wakeup

    def _plan_wakeup(self) -> None:
        due = self._next_lock_check
        if self._deadlines:
            due = min(due, self._deadlines[0][0])
        task = self.tasks.active
        if task is not None and not self._step_due and task.current is None:
            due = min(due, task.next_step_at)
        for live in self.tasks.live():
            for waiter in live.waiters:
                due = min(due, waiter[2])
        due = min(due, self.subs.next_due())
        summary = self.logs.next_summary_at()
        if summary is not None:
            due = min(due, summary)
        self._wakeup = due

    # ---- events ---------------------------------------------------------------------------
    def receive(
        self,
        identity: bytes,
        frames: list[bytes],
        now: float,
        conn: Any = None,
        user: str | None = None,
        peer: Any = None,
    ) -> list[Action]:
        """One message from a peer: `frames` are the frames after its routing identity.

        `conn` identifies the connection it came on: a value, or a function returning it, which
        is called only when a rule needs the connection (PLESTY sessions, connects, requests
        without a session token), so the hot path of token-carrying requests never pays for it.
        `user` is what the ZAP handler proved about the peer (a secured server: its public key,
        checked against `access`), `peer` a function returning its network address (read only
        for audited requests).
        """
        out: list[Action] = []
        self._conn_source = conn
        self._conn_value = _UNRESOLVED
        self._peer_source = peer
        policy = self.access
        if policy is not None:
            self._who = policy.principal(user)
        if frames and frames[0] == b"" and len(frames) >= 2:
            route = [identity, b""]
            body = frames[1:]
        else:
            route = [identity]
            body = frames
        request = None
        obj = None
        observe = Observation("invalid", "", "ok", None, now)
        try:
            self._body_size = len(body[0]) if body else 0
            obj = native.decode_body(native.Frames(route, body), self.limits.max_message_bytes)
            if self.envelope is not None and self.envelope.claims(obj):
                observe.rtype = self.envelope.metric_type
                if policy is not None:
                    need = self.envelope.needed(obj)
                    if self._who.rank < need:
                        try:
                            self._authorize(
                                need,
                                self.envelope.metric_type,
                                _short(str(obj.get("cmd")), 60),
                                now,
                                out,
                            )
                        except access.PermissionDeniedError as exc:
                            self._reply(out, route, self.envelope.refuse(obj, str(exc)), observe)
                            return out
                self._on_envelope(route, obj, now, observe, out)
                return out
            request = native.parse_request(obj)
            observe.rtype = request.type
            if policy is not None:
                need = access.needed(request.type, request.fields)
                if request.type == "call" and request.get("func") in self.read_only_ops:
                    need = access.OBSERVER  # a call of an operation that only reads
                if self._who.rank < need:
                    self._authorize(need, request.type, _target(request), now, out, request)
            handler = self._handlers[request.type]
            handler(self, route, request, now, observe, out)
        except ProtocolError as exc:
            client = native.client_id_of(identity)
            self._log(
                out,
                "malformed request",
                now,
                _WARNING,
                f"malformed request from {_short(client)}: {_short(str(exc), 300)}",
            )
            reply = native.error_reply(
                str(exc),
                exc.wire_type,
                exc.details.get("request_id"),
                exc.details.get("has_id", False),
            )
            if obj is None and self.envelope is not None:
                # no envelope to read: answer in both shapes, so either client can read it
                reply.update(self.envelope.undecodable(str(exc)))
            self._reply(out, route, reply, observe)
        except LabmeshError as exc:
            if isinstance(exc, BusyError):
                out.append(Count("refused", (exc.details.get("bound", ""),)))
            if (
                request is not None
                and request.type in _AUDITED
                and exc.wire_type != (access.PermissionDeniedError.wire_type)
            ):
                # refused before it ran (locked, busy, ...): the audit trail shows it too
                who, peer = self._audit_who(identity)
                self._audit(out, request.type, who, peer, request, exc.wire_type, now)
            self._reply(
                out, route, _error(request, str(exc), exc.wire_type, **_details(exc)), observe
            )
        except Exception as exc:  # a bug of ours must cost one request, never the server
            self._log(out, "internal error", now, _ERROR, f"failed to handle a request: {exc!r}")
            self._reply(
                out,
                route,
                _error(request, f"internal server error: {exc!r}", InternalError.wire_type),
                observe,
            )
        return out

    def start_next(self, now: float) -> list[Action]:
        """The loop may start a device call: return a Run for the next one whose resources are
        free (calls refused by a lock taken since they arrived are answered on the way)."""
        out: list[Action] = []
        while self.running is None:
            task = self.tasks.active
            if task is not None:
                job = self._pop_between_steps()
                if job is None:
                    if self._step_due:
                        self._step_due = False
                        job = task.current = Job(
                            task.run.step, (task.cancel,), label=f"{task.label} (step)"
                        )
                        self.running = job
                        out.append(Run(job))
                    break
            elif self._queue:
                job = self._queue.popleft()
            else:
                break
            pending = self._pending.get(job)
            if pending is not None:
                self._dequeued(pending)
                if pending.touches:
                    # checked when the call starts, not when it arrived
                    try:
                        self.locks.check(pending.session, pending.touches, now)
                    except ResourceLockedError as exc:
                        job.error = self._explain_locked(pending.request, exc)
                        if pending.task is not None:
                            self._task_ended(pending.task, job, now, out)
                        else:
                            self._deliver(job, now, out)
                        continue
                if pending.task is not None:  # a task's first step
                    if pending.task.cancel is not None:  # stopped while queued: never runs
                        job.args = (pending.task.cancel,)
                    pending.task.state = task_states.RUNNING
                    pending.task.started = now
                    pending.task.current = job
                    self.tasks.active = pending.task
            self.running = job
            out.append(Run(job))
        return out

    def _pop_between_steps(self) -> Job | None:
        """The first queued read or preempting call (they run between a task's steps)."""
        if not self._between_steps_queued:
            return None
        for i, job in enumerate(self._queue):
            pending = self._pending.get(job)
            if pending is not None and pending.between_steps:
                del self._queue[i]
                return job
        return None

    def job_done(self, job: Job, now: float) -> list[Action]:
        """A device call finished (its outcome is on the job): answer it."""
        out: list[Action] = []
        if self.running is job:
            self.running = None
        task = self.tasks.active
        if task is None and not self._reads_in_flight and not self.subs.streams:
            self._deliver(job, now, out)  # the usual case: a plain call, nobody subscribed
            return out
        if task is not None and job is task.current:
            self._task_stepped(task, job, now, out)
            return out
        pending = self._pending.get(job)
        if pending is not None and pending.reads:
            self._reads_done(job, pending, now, out)
            return out
        preempting = (
            pending is not None and pending.between_steps and pending.request.type == "call"
        )
        if pending is not None and job.ok and pending.request.type != "call" and self.subs.streams:
            self._device_value(pending.request, job, now, out)
        self._deliver(job, now, out)
        if preempting and task is not None and job.ok:
            self._preempted(task, pending, now)
        return out

    def tick(self, now: float) -> list[Action]:
        """Expire leases (never of a session with a call in flight), serve waiters, expire
        budgets, write log summaries."""
        out: list[Action] = []
        if now >= self._next_lock_check:
            self._lock_tick(now, out)
        if self._deadlines and self._deadlines[0][0] <= now:
            self._expire_budgets(now, out)
        task = self.tasks.active
        if task is not None and task.current is None and now >= task.next_step_at:
            self._step_due = True
        self._status_waits_expired(now, out)
        self._subscription_tick(now, out)
        for line in self.logs.summaries(now):
            out.append(Log(_WARNING, line))
        self._plan_wakeup()
        return out

    def peer_gone(self, conn: Any, now: float) -> list[Action]:
        """A connection closed: its PLESTY grants end (held until disconnect) and its waits
        are dropped, so a vanished peer never inherits a lock."""
        out: list[Action] = []
        for session in self._waiters_by_conn.pop(conn, ()):
            self.locks.drop_waiter(session)  # nobody is there to answer
        for session in self._plesty.connection_closed(conn):
            self._end_session(session, now, out, "disconnected")
        return out

    def undeliverable(self, send: Send, reason: str, now: float) -> list[Action]:
        """The loop could not queue `send` (`reason`: peer_gone or peer_not_reading). A lock
        that reply was handing over is taken back and offered to the next waiter."""
        out: list[Action] = [Count("reply_dropped", (reason,))]
        what = "client gone" if reason == "peer_gone" else "client not reading its replies"
        self._log(
            out,
            f"reply dropped ({reason})",
            now,
            _INFO,
            f"reply to {_short(native.client_id_of(send.route[0]))} dropped: {what}",
        )
        if send.grant is not None:
            self._end_session(send.grant, now, out, "is gone before its grant reached it")
        return out

    def shutdown(self, now: float) -> list[Action]:
        """The server stops: every unanswered call gets a ShutdownError (in the envelope's shape
        for an envelope message)."""
        out: list[Action] = []
        for job, pending in self._pending.items():
            if pending.answered:
                continue
            pending.answered = True
            message = f"server is shutting down; {job.label} was " + (
                "interrupted" if job.state == RUNNING else "not started"
            )
            if pending.answer is None:
                reply = _error(pending.request, message, ShutdownError.wire_type)
            else:
                reply = pending.answer.failed(message)
            if reply is not None:
                out.append(Send(pending.route, native.encode_reply(reply)))
        for waiter in self.locks.waiters:
            route, request, _, _, _ = waiter.token
            self.locks.drop_waiter(waiter.session)
            reply = _error(
                request, "server is shutting down; the wait ended", ShutdownError.wire_type
            )
            out.append(Send(route, native.encode_reply(reply)))
        self._waiters_by_conn.clear()
        self._queue.clear()
        self._queued_by.clear()
        self._queued_bytes = 0
        self._between_steps_queued = 0
        for task in self.tasks.live():
            if task.state == task_states.RUNNING:
                self.abandoned.append(task.run)  # the loop stops it on the device thread
            error = {"type": ShutdownError.wire_type, "error": "the server shut down"}
            self._finish_task(task, task_states.FAILED, now, out, error)
        return out

    # ---- replies and logs -------------------------------------------------------------------
    def _reply(
        self,
        out: list[Action],
        route: list[bytes],
        reply: dict[str, Any],
        observe: Observation | None,
        grant: str | None = None,
    ) -> None:
        if observe is not None:
            if "status" in reply:
                error = None if reply["status"] == "ok" else str(reply.get("type"))
            else:  # an envelope reply, in its own shape
                error = self.envelope.error_type(reply) if self.envelope is not None else None
            if error is not None:
                observe.status = "error"
                observe.error_type = error
                if error == BudgetExpiredError.wire_type and "started" in reply:
                    observe.status = "timeout"
        out.append(Send(route, native.encode_reply(reply), observe, grant))

    def _log(self, out: list[Action], cause: str, now: float, level: int, message: str) -> None:
        if self.logs.allow(cause, now):
            out.append(Log(level, f"{self.name}: {message}"))
        elif self._wakeup > now + self.limits.log_interval_s:
            self._plan_wakeup()  # a summary is now due

    # ---- control requests ------------------------------------------------------------------
    # ---- roles and the audit trail -----------------------------------------------------------
    def _authorize(self, need, rtype, target, now, out, request=None) -> None:
        """Raise PermissionDeniedError (counted, audited) unless the sender has rank `need`."""
        who = self._who
        assert who is not None
        if who.rank >= need:
            return
        peer = self._peer_address()
        value = (
            _bounded(request.fields.get("value", request.fields.get("args"))) if request else None
        )
        out.append(Audit(rtype, who.name, peer, target, value, "denied", now))
        self._log(
            out,
            "permission denied",
            now,
            _WARNING,
            f"{_short(who.name)} ({who.role}) from {peer or '?'} refused: "
            f"{f'{rtype} {_short(target, 80)}'.strip()} needs {access.ROLES[need]}",
        )
        access.check(who, need, self.name, f"{rtype} {target}".strip())

    def _pub_for(self, grant: Grant | None) -> str | None:
        """The update feed a session can use: on a secured server a session opened on the
        plaintext listener (its grant carries no proven key) gets the plaintext one (None if
        there is none). Decided from the session, not from the latest message, so a reply
        sent later (a waiter served, a subscribe answered after its reads) is right too."""
        if self.access is None or grant is None or grant.metadata.get("key"):
            return self.pub_endpoint
        return self.plaintext_pub_endpoint

    def _peer_address(self) -> str | None:
        source = self._peer_source
        try:
            return source() if callable(source) else source
        except Exception:  # an address is for the record only; never fail a request over it
            return None

    def _audit_who(self, identity: bytes) -> tuple[str, str | None]:
        """(client, peer address) of the message being handled, for the audit trail: the key's
        name on a secured server, else the client id."""
        who = self._who
        name = (
            who.name if who is not None and who.key is not None else native.client_id_of(identity)
        )
        return name, self._peer_address()

    def _audit(self, out, event, who, peer, request, outcome, now) -> None:
        fields = request.fields
        value = (
            fields.get("value")
            if event == "write"
            else [fields.get("args", []), fields.get("kwargs", {})]
        )
        out.append(Audit(event, who, peer, _target(request), _bounded(value), outcome, now))

    def _audit_envelope(self, out, audit: tuple, command: str, reply, now) -> None:
        """An audit line for a state-changing LAPLACE command; `audit` is (client, peer,
        payload), the outcome is read from the reply."""
        envelope = self.envelope
        assert envelope is not None
        client, peer, payload = audit
        failed = envelope.error_type(reply)
        outcome = "ok" if failed is None else failed
        event = envelope.metric_type
        out.append(Audit(event, client, peer, _short(command, 60), payload, outcome, now))

    def _audit_lock(self, out, event, grant: Grant, leaves, now, by: str | None = None) -> None:
        client = by or grant.metadata.get("key") or grant.client_id
        where = _short(",".join(leaves), AUDIT_VALUE_CHARS)
        out.append(Audit(event, str(client), None, where, grant.describe_holder(), "ok", now))

    def _conn(self) -> Any:
        """The connection of the message being handled (resolved once, on first need)."""
        value = self._conn_value
        if value is _UNRESOLVED:
            source = self._conn_source
            value = self._conn_value = source() if callable(source) else source
        return value

    def _session_of(self, identity: bytes, request: native.Request) -> str | None:
        """The session a request speaks for: its token, or the PLESTY grant of its own
        connection (never of another peer that claims the same client id)."""
        if request.session is not None:
            self._plesty.token_sent(request.session)
            return request.session
        return self._plesty.session_of(identity, self._conn)

    def _on_connect(self, route, request, now, observe, out) -> None:
        identity = route[0]
        conn = self._conn()
        client_id = native.client_id_of(identity)
        metadata = {
            k: v for k, v in request.fields.items() if k not in native.CONNECT_PROTOCOL_KEYS
        }
        if metadata:
            size = len(native.encode(metadata))
            if size > self.limits.max_metadata_bytes:
                out.append(Count("refused", ("max_metadata_bytes",)))
                raise ProtocolError(
                    f"connect metadata is {size} bytes of JSON; the limit is "
                    f"{self.limits.max_metadata_bytes} (max_metadata_bytes): send a short "
                    "experiment name, not data"
                )
        who = self._who
        if who is not None:  # a secured server: the key is its word, never the client's
            metadata.pop("key", None)
            if who.key is not None:
                metadata["key"] = who.name  # shown in `locks` and the audit trail
        lease = request.get("lease")
        if lease is not None:
            # no lease outlives the idle limit: a client cannot hold a lock "forever"
            lease = min(float(lease), self.locks.idle_limit_s)
        known = self._session_of(identity, request)
        if known is not None and self.locks.grant(known) is None:
            known = None  # a stale token (lease ran out, server restarted): start afresh
        if known is None:
            self._make_room_for_a_session()
        session = known or secrets.token_urlsafe(16)
        leaves: tuple[str, ...] = ()
        try:
            leaves = self.locks.expand(request.get("resources"), self.limits.max_connect_paths)
            grant = self.locks.acquire(
                session, client_id, leaves, now, lease_s=lease, metadata=metadata
            )
        except ResourceAllocationError as exc:
            if exc.details.get("too_many"):
                out.append(Count("refused", ("max_connect_paths",)))
                raise ProtocolError(str(exc)) from None
            wait = request.get("wait")
            if wait and "unknown" not in exc.details:
                replaced = self._enqueue_waiter(
                    route, conn, request, session, client_id, leaves, metadata, lease, wait, now
                )
                if replaced is not None:
                    self._refuse_waiter(
                        replaced,
                        "this wait was replaced by a newer connect of the same session",
                        now,
                        out,
                    )
                return
            self._refuse_connect(out, route, request, client_id, metadata, exc, observe, now)
            return
        self._granted(out, route, conn, request, grant, observe, now)

    def _make_room_for_a_session(self) -> None:
        """Keep at most max_sessions: end the oldest session that holds nothing, or refuse."""
        if self.locks.session_count < self.limits.max_sessions:
            return
        idle = self.locks.oldest_idle_session()
        if idle is None:
            raise BusyError(
                f"{self.name}: {self.locks.session_count} sessions hold locks here "
                f"(max_sessions={self.limits.max_sessions}); try again when one is released",
                bound="max_sessions",
                limit=self.limits.max_sessions,
                depth=self.locks.session_count,
            )
        self._end_session(idle.session, 0.0, [], "ended to make room")

    def _enqueue_waiter(
        self, route, conn, request, session, client_id, leaves, metadata, lease, wait, now
    ) -> Waiter | None:
        waiting = self.locks.waiting
        if waiting >= self.limits.max_waiters and not self.locks.is_waiting(session):
            raise BusyError(
                f"{self.name}: {waiting} connects are already waiting for resources "
                f"(max_waiters={self.limits.max_waiters}); try again later, or connect without "
                "wait to see who holds them",
                bound="max_waiters",
                limit=self.limits.max_waiters,
                depth=waiting,
            )
        wait = min(float(wait), self.limits.max_wait_s)
        self._lock_check_soon(now)
        replaced = self.locks.enqueue(
            Waiter(
                session,
                client_id,
                leaves,
                now + wait,
                metadata,
                lease,
                (route, _reply_key(request), now, conn, wait),
            )
        )
        if replaced is not None:
            self._unindex_waiter(replaced.token[3], session)
        self._waiters_by_conn.setdefault(conn, set()).add(session)
        return replaced

    def _granted(self, out, route, conn, request, grant: Grant, observe, now) -> None:
        self._lock_check_soon(now)
        if grant.lease_s is None and request.session is None:
            # a PLESTY client: it never sends the token, its grant lives with its connection
            replaced = self._plesty.bind(route[0], conn, grant.session)
            if replaced is not None:
                self._end_session(replaced, now, out, "connected again")
        if grant.leaves:
            self._audit_lock(out, "lock_grant", grant, grant.leaves, now)
            self._log(
                out,
                "lock granted",
                now,
                _INFO,
                f"{_short(grant.describe_holder())} holds {_quote(grant.leaves)}",
            )
            self._locks_changed(now, out)
        result = {
            "client_id": grant.client_id,
            "resources": list(grant.leaves),
            "metadata": grant.metadata,
            "session": grant.session,
            "lease": grant.lease_s,
            "epoch": self.epoch,
            "pub": self._pub_for(grant),
        }
        self._reply(
            out,
            route,
            native.ok_reply(result, request),
            observe,
            grant.session if grant.leaves else None,
        )

    def _end_session(
        self, session: str, now: float, out: list[Action], why: str, by: str | None = None
    ) -> None:
        """End a session: its wait is refused, its grant released (the next waiter served);
        `by`: the admin who force-released it."""
        waiter = self.locks.drop_waiter(session)
        if waiter is not None:
            self._unindex_waiter(waiter.token[3], session)
            self._refuse_waiter(waiter, f"the wait ended: its session {why}", now, out)
        self._plesty.forget(session)
        self.subs.unsubscribe(session)
        held = self.locks.grant(session)
        if held is not None and held.leaves:
            # a task must not go on moving what its session no longer holds
            self._cancel_tasks_of(session, f"its session {why}")
        grant = self.locks.release(session)
        if grant is not None and grant.leaves:
            event = "force_release" if by is not None else "lock_release"
            self._audit_lock(out, event, grant, grant.leaves, now, by)
            self._log(
                out,
                "lock released",
                now,
                _INFO,
                f"{_short(grant.describe_holder())} {why}; freed {_quote(grant.leaves)}",
            )
            self._serve_waiters(now, out)
            self._locks_changed(now, out)

    def _refuse_connect(self, out, route, request, client_id, metadata, exc, observe, now):
        self._log(
            out,
            "connect refused",
            now,
            _INFO,
            f"connect of {_short(client_id)} refused: {_short(str(exc), 300)}",
        )
        self._reply(
            out,
            route,
            _error(
                request,
                str(exc),
                exc.wire_type,
                result={"client_id": client_id, "resources": [], "metadata": metadata},
                **_details(exc),
            ),
            observe,
        )

    def _serve_waiters(self, now: float, out: list[Action]) -> None:
        granted, expired = self.locks.serve_waiters(now)
        for waiter, grant in granted:
            route, request, since, conn, _ = waiter.token
            self._unindex_waiter(conn, waiter.session)
            out.append(Count("lock_waited", ("granted", now - since)))
            self._granted(
                out, route, conn, request, grant, Observation("connect", "", "ok", None, since), now
            )
        for waiter in expired:
            _, _, since, conn, wait = waiter.token
            self._unindex_waiter(conn, waiter.session)
            out.append(Count("lock_waited", ("timeout", now - since)))
            busy = self.locks.busy_message(waiter.leaves, now)
            self._refuse_waiter(
                waiter,
                f"waited {wait:g} s; requested resources are still not available: " + busy,
                now,
                out,
            )

    def _refuse_waiter(self, waiter: Waiter, message: str, now: float, out: list[Action]) -> None:
        """Answer a wait that ends without a grant (ResourceAllocationError, as PLESTY's)."""
        route, request, since, _, _ = waiter.token
        self._refuse_connect(
            out,
            route,
            request,
            waiter.client_id,
            waiter.metadata,
            ResourceAllocationError(message),
            Observation("connect", "", "ok", None, since),
            now,
        )

    def _unindex_waiter(self, conn: Any, session: str) -> None:
        sessions = self._waiters_by_conn.get(conn)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._waiters_by_conn[conn]

    def _on_disconnect(self, route, request, now, observe, out) -> None:
        identity = route[0]
        session = self._session_of(identity, request)
        if session is not None:
            self._end_session(session, now, out, "released")
            self._locks_changed(now, out)
        self._reply(
            out,
            route,
            native.ok_reply({"client_id": native.client_id_of(identity)}, request),
            observe,
        )
        self._serve_waiters(now, out)

    def _on_force_release(self, route, request, now, observe, out) -> None:
        """An admin frees locks another session holds (that session ends: its waits are
        refused, its task stopped, its next request gets LeaseExpiredError)."""
        if self.access is None:
            # without keys nobody is known to be an admin: no stranger may end a session
            raise access.PermissionDeniedError(
                f"force_release on {self.name!r} needs a secured device (an admin's CurveZMQ "
                "key, docs/security.md); here, ask the holder (`labmesh locks`) or wait for "
                "its lease to run out",
                needed="admin",
            )
        leaves = self.locks.expand(request.get("resources"), self.limits.max_connect_paths)
        sessions: dict[str, Grant] = {}
        for leaf in leaves:
            grant = self.locks.holder(leaf)
            if grant is not None:
                sessions[grant.session] = grant
        who, _peer = self._audit_who(route[0])
        released = []
        for session, grant in sessions.items():
            released.append({"holder": grant.describe_holder(), "resources": list(grant.leaves)})
            self._end_session(session, now, out, f"was force-released by {who}", by=who)
        if released:
            self._locks_changed(now, out)
        self._reply(out, route, native.ok_reply({"released": released}, request), observe)

    def _on_describe(self, route, request, now, observe, out) -> None:
        result = {
            **self.description,
            "protocol": native.PROTOCOL_NAME,
            "capabilities": CAPABILITIES,
            "healthy": self.healthy,
            "epoch": self.epoch,
        }
        self._reply(out, route, native.ok_reply(result, request), observe)

    def _on_help(self, route, request, now, observe, out) -> None:
        self._reply(out, route, native.ok_reply({"help": self.help_text}, request), observe)

    def _on_ping(self, route, request, now, observe, out) -> None:
        current = self.running
        result = {
            "pong": True,
            "name": self.name,
            "healthy": self.healthy,
            "connected": self.connected,
            "busy": self.busy,
            "running": {"label": current.label, "for_s": round(now - current.started_at, 3)}
            if current is not None
            else None,
            "queue_depth": len(self._queue),
            "task": self.tasks.active.status(now) if self.tasks.active is not None else None,
            "epoch": self.epoch,
            "uptime_s": round(now - self.started_at, 3),
        }
        self._reply(out, route, native.ok_reply(result, request), observe)

    def _on_heartbeat(self, route, request, now, observe, out) -> None:
        grant = self.locks.renew(self._session_of(route[0], request) or "", now)
        result = {"lease_remaining": self.locks.remaining(grant, now), "epoch": self.epoch}
        self._reply(out, route, native.ok_reply(result, request), observe)

    def _on_locks(self, route, request, now, observe, out) -> None:
        result = {"resources": sorted(self.locks.leaves), "holders": self.locks.holders(now)}
        self._reply(out, route, native.ok_reply(result, request), observe)

    def _lock_tick(self, now: float, out: list[Action]) -> None:
        alive = [p.session for p in self._pending.values() if p.session and not p.answered]
        expired = self.locks.expire(now, alive)
        for grant in expired:
            out.append(Count("lease_expired"))
            if grant.leaves:
                self._audit_lock(out, "lock_expiry", grant, grant.leaves, now)
            self._plesty.forget(grant.session)
            self.subs.unsubscribe(grant.session)
            if grant.leaves:
                self._cancel_tasks_of(grant.session, "its session's lease expired")
        if expired:
            first = expired[0]
            more = f" (and {len(expired) - 1} more sessions)" if len(expired) > 1 else ""
            self._log(
                out,
                "lease expired",
                now,
                _WARNING,
                f"lease of {_short(first.describe_holder())} expired after "
                f"{now - first.last_seen:.1f} s without a request; freed "
                f"{_quote(first.leaves)}{more}",
            )
        self._serve_waiters(now, out)
        if expired:
            self._locks_changed(now, out)
        following = self.locks.next_event()
        if following is None and not self.locks.session_count and not self.locks.waiting:
            # nothing can expire: an idle server does not wake for locks (a grant or a waiter
            # brings the next check forward, see _lock_check_soon)
            self._next_lock_check = now + IDLE_LOCK_CHECK_S
            return
        # a past event is a lease kept alive by a call in flight: look again in LOCK_CHECK_S
        self._next_lock_check = (
            now + LOCK_CHECK_S
            if following is None or following <= now
            else min(now + LOCK_CHECK_S, following)
        )

    def _lock_check_soon(self, now: float) -> None:
        """A grant or a waiter exists now: leases and waits are checked from LOCK_CHECK_S on."""
        due = now + LOCK_CHECK_S
        if due < self._next_lock_check:
            self._next_lock_check = due
            if due < self._wakeup:
                self._wakeup = due

    def _locks_changed(self, now: float, out: list[Action]) -> None:
        rows = [
            {
                "resource": row["resource"],
                "holder": row["client_id"],
                "holder_name": str(
                    row["metadata"].get("name") or row["metadata"].get("experiment") or ""
                ),
                "since": now - row["since_s"],
            }
            for row in self.locks.holders(now)
        ]
        out.append(LocksChanged(rows))

    # ---- device requests ------------------------------------------------------------------
    def _on_device_request(self, route, request, now, observe, out) -> None:
        if not self.executor_alive:
            raise ExecutorDeadError(
                f"{self.name}: the thread that runs this device's calls is not running; "
                "restart the server"
            )
        identity = route[0]
        session = self._session_of(identity, request)
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
        queue_key = session if session is not None else (identity, self._conn())
        limits = self.limits
        size = self._body_size
        if (
            len(self._queue) >= limits.max_queue_per_device
            or self._queued_by.get(queue_key, 0) >= limits.max_queue_per_session
            or self._queued_bytes + size > limits.max_queue_bytes
        ):
            self._check_queue_bounds(queue_key, size)
        fn, args, kwargs, label = self._device_call(request)
        touches: tuple[str, ...] = ()
        if request.type != "query" and self.locks.leaves:
            name = request.fields.get("param") or request.fields.get("func")
            touches = self.touches(request.type, name, args, kwargs)
        if resources and self._accepts_resources(label, fn):
            kwargs["resources"] = resources
        budget = request.timeout
        task = None
        func = request.fields.get("func")
        if request.type == "call":
            if budget is None:
                budget = self.budgets.get(func)
            if request.fields.get("task") or task_function(self.device, func) is not None:
                task = self._new_task(request, route[0], session, touches, fn, args, kwargs, now)
                if task.detached:
                    budget = request.timeout  # a started task has no default budget
        job = task.first_job if task is not None else Job(fn, args, kwargs, label)
        deadline = now + budget if budget is not None else None
        operation = self.operation_label(request.fields.get("param") or func)
        observe.operation = operation
        self._pending[job] = pending = _Pending(
            route,
            request,
            now,
            deadline,
            session,
            touches,
            operation,
            queue_key,
            observe,
            size,
            task=task,
            # a preempting call started as a task is a task: it waits like any other
            between_steps=task is None and (request.type == "query" or func in self.preempts),
        )
        if request.type in _AUDITED:
            pending.audit = self._audit_who(identity)
        if deadline is not None:
            deadlines = self._deadlines
            if len(deadlines) > 2 * len(self._pending) + 64:
                # entries of calls answered long before their deadline: drop them, so a peer's
                # huge timeouts cannot keep every finished call
                deadlines[:] = [d for d in deadlines if d[2] in self._pending]
                heapq.heapify(deadlines)
            heapq.heappush(deadlines, (deadline, next(self._seq), job))
            if deadline < self._wakeup:
                self._wakeup = deadline
        self._enqueue(job, queue_key, size)
        if task is not None and task.detached:
            pending.answered = True  # answered now; task_status tells the rest
            who, peer = pending.audit or ("?", None)
            self._audit(out, "call", who, peer, request, "started", now)
            result = {"task": task.id, "operation": task.operation, "state": task.state}
            self._reply(out, route, native.ok_reply(result, request), observe)

    def _check_queue_bounds(self, queue_key: Any, size: int) -> None:
        """Raise BusyError if one more call from `queue_key` would pass a queue bound."""
        queued = self._queued_bytes
        if queued + size > self.limits.max_queue_bytes:
            raise BusyError(
                f"{self.name}: the calls queued for this device already hold {queued} bytes of "
                f"requests (max_queue_bytes={self.limits.max_queue_bytes}); nothing was "
                "queued: retry later",
                bound="max_queue_bytes",
                limit=self.limits.max_queue_bytes,
                depth=queued,
            )
        depth = len(self._queue)
        if depth >= self.limits.max_queue_per_device:
            raise BusyError(
                f"{self.name}: {depth} calls are already queued for this device "
                f"(max_queue_per_device={self.limits.max_queue_per_device}); nothing was "
                "queued: retry later, or wait for replies before sending more",
                bound="max_queue_per_device",
                limit=self.limits.max_queue_per_device,
                depth=depth,
            )
        mine = self._queued_by.get(queue_key, 0)
        if mine >= self.limits.max_queue_per_session:
            raise BusyError(
                f"{self.name}: this client already has {mine} calls queued "
                f"(max_queue_per_session={self.limits.max_queue_per_session}); nothing was "
                "queued: wait for replies before sending more",
                bound="max_queue_per_session",
                limit=self.limits.max_queue_per_session,
                depth=mine,
            )

    def _enqueue(self, job: Job, queue_key: Any, size: int) -> None:
        pending = self._pending.get(job)
        if pending is not None and pending.between_steps:
            self._between_steps_queued += 1
        self._queue.append(job)
        self._queued_by[queue_key] = self._queued_by.get(queue_key, 0) + 1
        self._queued_bytes += size

    def _dequeued(self, pending: _Pending) -> None:
        if pending.between_steps:
            self._between_steps_queued -= 1
        self._queued_bytes -= pending.size
        key = pending.queue_key
        left = self._queued_by.get(key, 0) - 1
        if left > 0:
            self._queued_by[key] = left
        else:
            self._queued_by.pop(key, None)

    def _explain_locked(
        self, request: native.Request, exc: ResourceLockedError
    ) -> ResourceLockedError:
        """A call naming resources the device does not have (a typo such as `move_abs("w")`)
        is lock-checked as the whole device; say so, or the refusal names a lock that has
        nothing to do with what the caller meant."""
        fields = request.fields
        if request.type != "call" or not isinstance(fields.get("func"), str):
            return exc
        args = tuple(fields.get("args") or ())
        kwargs = dict(fields.get("kwargs") or {})
        declared = touched_resources(self.device, "call", fields["func"], args, kwargs) or ()
        unknown = []
        for name in declared:
            try:
                self.locks.expand((name,))
            except ResourceAllocationError:
                unknown.append(name)
        if not unknown:
            return exc
        return ResourceLockedError(
            f"{exc} ({fields['func']} names {quote_names(unknown)}, not a resource of "
            f"{self.name}: {quote_names(sorted(self.locks.leaves))}; so it was checked as the "
            "whole device)",
            **exc.details,
        )

    def touches(self, request_type: str, name: str, args: tuple, kwargs: dict) -> tuple[str, ...]:
        """The registered leaves a write or call touches (all of them unless declared)."""
        declared = touched_resources(self.device, request_type, name, args, kwargs)
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
        if func not in self.methods:
            hint = did_you_mean(func, self.methods, "operation names")
            raise UnknownOperationError(
                f"{self.name} has no operation {_short(repr(func), 80)}{hint}; operations: "
                f"{sorted(self.methods)}"
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

    def _deliver(self, job: Job, now: float, out: list[Action]) -> None:
        pending = self._pending.pop(job, None)
        if pending is None:
            return
        if pending.answered:
            if pending.task is not None and (pending.task.detached or pending.task.cancel):
                return  # answered when it started (or its budget ran out); task_status tells
            if pending.audit is not None and pending.answer is None:
                late = "ok" if job.ok else wire_type_of(job.error)
                request = pending.request
                self._audit(out, request.type, *pending.audit, request, f"{late} (late)", now)
            self._log(
                out,
                "late result",
                now,
                _WARNING,
                f"{job.label} finished {job.finished_at - job.started_at:.3f} s after it "
                "started, past its budget; result discarded",
            )
            return
        pending.answered = True
        request = pending.request
        if pending.session is not None:
            grant = self.locks.grant(pending.session)
            if grant is not None:
                grant.last_seen = now
        observe = pending.observe
        if pending.answer is not None:
            reply = pending.answer.reply(job)
            if reply is not None:
                self._reply(out, pending.route, reply, observe)
                if pending.audit is not None and pending.task is None:
                    self._audit_envelope(out, pending.audit, pending.answer.command, reply, now)
            return
        if job.ok:
            out.append(
                Send(
                    pending.route, native.encode_reply(native.ok_reply(job.value, request)), observe
                )
            )
            if pending.audit is not None:  # after the reply: the trail never delays it
                self._audit(out, request.type, *pending.audit, request, "ok", now)
            return
        exc = job.error
        assert exc is not None
        if isinstance(exc, (SystemExit, KeyboardInterrupt, GeneratorExit)):
            message = (
                f"{type(exc).__name__}({', '.join(map(repr, exc.args))}) raised inside "
                f"{job.label}; the call failed, the server carries on"
            )
            self._log(out, "call raised SystemExit", now, _ERROR, message)
        else:
            message = str(exc) or type(exc).__name__
            self._log(
                out,
                "call failed",
                now,
                _INFO,
                f"{job.label} failed: {wire_type_of(exc)}: {_short(message, 300)}",
            )
        self._reply(
            out,
            pending.route,
            _error(request, message, wire_type_of(exc), **_details(exc)),
            observe,
        )
        if pending.audit is not None:
            self._audit(out, request.type, *pending.audit, request, wire_type_of(exc), now)

    def _expire_budgets(self, now: float, out: list[Action]) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self._deadlines)
            pending = self._pending.get(job)
            if pending is None or pending.answered:
                continue
            pending.answered = True
            observe = pending.observe
            task = pending.task
            if task is not None and task.state == task_states.RUNNING:
                reply = _error(
                    pending.request,
                    "Operation timed out",
                    BudgetExpiredError.wire_type,
                    still_running=True,
                    started=True,
                    task=task.id,
                    detail=f"{task.label} ran past its budget of "
                    f"{(pending.deadline or now) - pending.received:.3f} s and is still "
                    f"running as task {task.id}: follow it with task_status, or stop it "
                    "(task_cancel, or the device's stop)",
                )
                self._reply(out, pending.route, reply, observe)
                out.append(Count("budget_expired", (pending.operation, True)))
                continue
            started = job is self.running or job.state == RUNNING
            if started:
                still_running = job.state == RUNNING
                detail = (
                    f"{job.label} ran past its budget of "
                    f"{(pending.deadline or now) - pending.received:.3f} s; the device stays "
                    "busy until it ends"
                )
            else:
                self._queue.remove(job)
                self._dequeued(pending)
                del self._pending[job]
                still_running = False
                if task is not None:
                    error = {"type": BudgetExpiredError.wire_type, "error": "not started in time"}
                    self._finish_task(task, task_states.FAILED, now, out, error)
                current = self.running
                detail = (
                    f"not started: the device was busy with {current.label} for "
                    f"{now - current.started_at:.1f} s"
                    if current
                    else "not started"
                )
            reply = _error(
                pending.request,
                "Operation timed out",
                BudgetExpiredError.wire_type,
                still_running=still_running,
                started=started,
                detail=detail,
            )
            self._reply(out, pending.route, reply, observe)
            out.append(Count("budget_expired", (pending.operation, still_running)))
            if pending.audit is not None and pending.answer is None:
                # a write that runs on past its budget may still change the hardware: the
                # trail says so now, and again with the outcome when it ends (_deliver)
                outcome = "TimeoutError (still running)" if started else "TimeoutError (not run)"
                self._audit(
                    out, pending.request.type, *pending.audit, pending.request, outcome, now
                )

    # ---- tasks ----------------------------------------------------------------------------------
    def _new_task(self, request, identity, session, touches, fn, args, kwargs, now) -> Task:
        """A call of a task operation (a generator), or any call started with `task: true`."""
        func = request.fields["func"]
        raw = task_function(self.device, func)
        device = self.device
        if raw is not None:
            run = TaskRun(lambda: raw(device, *args, **kwargs))
        else:
            run = TaskRun(lambda: fn(*args, **kwargs))
        shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        task = Task(
            id=self.tasks.new_id(),
            operation=func,
            label=_short(f"{func}({shown})", 120),
            client_id=native.client_id_of(identity),
            session=session,
            touches=touches,
            run=run,
            first_job=Job(run.step, (None,), label=func),
            created=now,
            detached=bool(request.fields.get("task")),
        )
        self.tasks.add(task)
        return task

    def _task_stepped(self, task: Task, job: Job, now: float, out: list[Action]) -> None:
        task.current = None
        task.steps += 1
        step: Step | None = job.value if job.ok else None
        if step is None or step.done:
            self._task_ended(task, job, now, out)
            return
        if step.progress is not None:
            task.progress = step.progress
            if self.subs.subscribed(f"task/{task.id}"):
                self._observe(f"task/{task.id}", step.progress, now, out)
        task.next_step_at = now + step.seconds
        if task.cancel is not None or step.seconds <= 0:
            self._step_due = True
        self._plan_wakeup()

    def _task_ended(self, task: Task, job: Job, now: float, out: list[Action]) -> None:
        """The task's last step ended (or it never started): record it, answer its caller."""
        first = task.first_job
        if job.ok:
            first.ok, first.value, first.error = True, job.value.value, None
            state, error = task_states.DONE, None
        else:
            exc = job.error
            assert exc is not None
            first.ok, first.error = False, exc
            cancelled = isinstance(exc, TaskCancelledError)
            state = task_states.CANCELLED if cancelled else task_states.FAILED
            error = {"type": wire_type_of(exc), "error": str(exc) or type(exc).__name__}
        first.started_at = first.started_at or job.started_at
        first.finished_at = job.finished_at or first.started_at
        self._finish_task(task, state, now, out, error)
        self._deliver(first, now, out)

    def _finish_task(self, task, state: str, now: float, out, error: dict | None) -> None:
        task.state = state
        task.ended = now
        task.current = None
        if state == task_states.DONE:
            task.result = task.first_job.value
        task.error = error
        status = task.status(now)
        for route, request, _deadline, observe in task.waiters:
            self._reply(out, route, native.ok_reply(status, request), observe)
        task.waiters.clear()
        if self.subs.subscribed(f"task/{task.id}"):
            self._observe(f"task/{task.id}", status, now, out)
        if self.tasks.active is task:
            self._step_due = False
        self.tasks.finish(task, now)
        self._plan_wakeup()

    def _preempted(self, task: Task, pending: _Pending, now: float) -> None:
        """A preempting call ran during `task`: the task ends early if they share resources."""
        if task.touches and pending.touches and not set(task.touches) & set(pending.touches):
            return
        if task.cancel is None:
            task.cancel = f"{pending.operation} from {native.client_id_of(pending.route[0])}"
        if task.current is None:
            self._step_due = True

    def _task_of(self, request: native.Request) -> Task | None:
        task_id = request.fields.get("task")
        task = self.tasks.get(task_id)
        if task is None and task_id is not None:
            raise UnknownTaskError(
                f"{self.name} has no task {_short(repr(task_id), 80)} (finished tasks are kept "
                f"{task_states.FINISHED_KEEP_S:g} s, the last {task_states.MAX_FINISHED})"
            )
        return task

    def _on_task_status(self, route, request, now, observe, out) -> None:
        task = self._task_of(request)
        if task is None:
            self._reply(
                out, route, native.ok_reply({"task": None, "state": "idle"}, request), observe
            )
            return
        wait = request.fields.get("wait")
        if wait and not task.finished:
            limit = self.limits.max_status_waiters
            if len(task.waiters) >= limit:
                raise BusyError(
                    f"{self.name}: {len(task.waiters)} clients already wait on task {task.id} "
                    f"(max_status_waiters={limit}); ask again without wait",
                    bound="max_status_waiters",
                    limit=limit,
                    depth=len(task.waiters),
                )
            deadline = now + min(float(wait), self.limits.max_wait_s)
            task.waiters.append((route, _reply_key(request), deadline, observe))
            self._wakeup = min(self._wakeup, deadline)
            return
        self._reply(out, route, native.ok_reply(task.status(now), request), observe)

    def _status_waits_expired(self, now: float, out: list[Action]) -> None:
        for task in self.tasks.live():
            due = [w for w in task.waiters if w[2] <= now]
            if not due:
                continue
            task.waiters = [w for w in task.waiters if w[2] > now]
            status = task.status(now)
            for route, request, _deadline, observe in due:
                self._reply(out, route, native.ok_reply(status, request), observe)

    def _cancel_tasks_of(self, session: str, why: str) -> None:
        """Stop the tasks of a session that held locks and ends (queued ones never start)."""
        for task in self.tasks.live():
            if task.session != session or task.cancel is not None:
                continue
            task.cancel = why
            if task is self.tasks.active and task.current is None:
                self._step_due = True

    def cancel_running_task(self, why: str) -> str | None:
        """Stop the running task at its next step (a LAPLACE STOP); its id, or None."""
        task = self.tasks.active
        if task is None or task.finished:
            return None
        if task.cancel is None:
            task.cancel = why
        if task.current is None:
            self._step_due = True
        return task.id

    def _on_task_cancel(self, route, request, now, observe, out) -> None:
        task = self._task_of(request)
        if task is None:
            self._reply(
                out, route, native.ok_reply({"task": None, "state": "idle"}, request), observe
            )
            return
        if not task.finished:
            session = self._session_of(route[0], request)
            if task.touches:
                self.locks.check(session, task.touches, now)
            who = f"task_cancel from {native.client_id_of(route[0])}"
            if task.state == task_states.QUEUED:
                job = task.first_job
                pending = self._pending.get(job)
                if job in self._queue:
                    self._queue.remove(job)
                    if pending is not None:
                        self._dequeued(pending)
                task.cancel = who
                job.error = TaskCancelledError(f"{task.label} was cancelled before it ran ({who})")
                self._task_ended(task, job, now, out)
            elif task.cancel is None:
                task.cancel = who
                if task.current is None:
                    self._step_due = True
        self._reply(out, route, native.ok_reply(task.status(now), request), observe)

    # ---- subscriptions -------------------------------------------------------------------------
    def export(self, names: dict[str, float], now: float) -> None:
        """Read these parameters every period (s) for Prometheus (labmesh_parameter_value).
        Raises ValueError naming the readable parameters if one is not."""
        unknown = sorted(set(names) - self.readable)
        if unknown:
            raise ValueError(
                f"{self.name}: metrics names {quote_names(unknown)}, which are not readable "
                f"parameters; readable: {quote_names(sorted(self.readable))}"
            )
        units = {
            p["name"]: p.get("unit") or "" for p in self.description["doc"]["parameters"]["default"]
        }
        self.exported = {name: units.get(name, "") for name in names}
        for name, period in names.items():
            self.subs.pin(name, period, now)

    def exported_values(self) -> list[tuple[str, str, float]]:
        """(parameter, unit, value) of the exported parameters with a numeric value cached
        (read from the cache: a scrape never reads the device)."""
        out = []
        cache = self.subs.cache
        for name, unit in self.exported.items():
            cached = cache.get(name)
            if cached is None:
                continue
            value = cached.value
            if isinstance(value, (int, float)):  # bool too: 0 or 1
                out.append((name, unit, float(value)))
        return out

    def published(self, name: str, value: Any, now: float) -> list[Action]:
        """The driver published a value (`Device.publish`, from any device code)."""
        out: list[Action] = []
        if isinstance(name, str) and 0 < len(name) <= 256:
            self._observe(name, value, now, out)
        return out

    def _observe(self, name: str, value: Any, now: float, out: list[Action]) -> None:
        subs = self.subs
        for topic, body in subs.observe(name, value, now, now + self.wall_offset):
            out.append(Publish(topic, body))
        if subs.earliest_flush < self._wakeup:
            self._wakeup = subs.earliest_flush

    def _device_value(self, request: native.Request, job: Job, now: float, out) -> None:
        """A client's read told us a value; a client's write changed one (read it back)."""
        param = request.fields.get("param")
        if not isinstance(param, str) or not self.subs.subscribed(param):
            return
        if request.type == "query":
            self._observe(param, job.value, now, out)
        elif request.type == "write":
            self.subs.read_now(param, now)
            self._wakeup = min(self._wakeup, now)

    def _subscribable(self, name: str) -> bool:
        if name in self.readable or name in self.subs.cache:
            return True
        return name.startswith("task/") and self.tasks.get(name[5:]) is not None

    def _on_subscribe(self, route, request, now, observe, out) -> None:
        fields = request.fields
        session = self._session_of(route[0], request)
        if session is None or self.locks.grant(session) is None:
            raise LeaseExpiredError(
                f"{self.name}: this session is unknown here (its lease ran out, or the server "
                "restarted): connect again, then subscribe"
            )
        names = fields["params"] if isinstance(fields["params"], list) else [fields["params"]]
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if not self._subscribable(n)]
        if unknown:
            hint = did_you_mean(unknown[0], self.readable, "parameter names")
            raise UnknownParameterError(
                f"{self.name} has nothing to subscribe to named {quote_names(unknown)}{hint}; "
                f"readable parameters: {quote_names(sorted(self.readable))}"
            )
        flt = Filter(fields.get("every_s"), fields.get("deadband"), fields.get("max_rate_hz"))
        streams = []
        had = self.subs.topics_of(session)
        try:
            for name in names:
                streams.append(self.subs.subscribe(session, name, flt, now))
        except OverflowError as exc:
            self.subs.unsubscribe(session, [s.topic for s in streams if s.topic not in had])
            in_all = exc.args[0] == "all"
            bound = "max_streams" if in_all else "max_streams_per_session"
            limit = self.limits.max_streams if in_all else self.limits.max_streams_per_session
            raise BusyError(
                f"{self.name}: too many subscriptions ({bound}={limit}"
                f"{' in all' if in_all else ' for this session'}); unsubscribe some first",
                bound=bound,
                limit=limit,
                depth=len(streams),
            ) from None
        missing = tuple(
            s.name for s in streams if s.name not in self.subs.cache and s.name in self.readable
        )
        if flt.every_s is not None:
            self._wakeup = min(self._wakeup, now)
        if not missing:
            self._reply(
                out, route, native.ok_reply(self._subscribed(streams, session), request), observe
            )
            return
        # the first update is the current value: read what nobody has read yet, then answer
        self._check_queue_bounds(("read", session), 0)
        self._reads_in_flight += 1
        job = Job(self._read_values, (missing,), label="subscribe read")
        self._pending[job] = _Pending(
            route,
            request,
            now,
            None,
            session,
            (),
            "subscribe",
            ("read", session),
            observe,
            0,
            between_steps=True,
            reads=missing,
            streams=tuple(streams),
        )
        self._enqueue(job, ("read", session), 0)

    def _subscribed(self, streams, session: str | None) -> dict[str, Any]:
        return {
            "pub": self._pub_for(self.locks.grant(session) if session else None),
            "topics": {s.name: s.topic for s in streams},
            "current": {s.name: self.subs.current(s) for s in streams},
        }

    def _on_unsubscribe(self, route, request, now, observe, out) -> None:
        session = self._session_of(route[0], request)
        left = self.subs.unsubscribe(session, request.fields.get("topics")) if session else 0
        self._reply(out, route, native.ok_reply({"unsubscribed": left}, request), observe)

    def _read_values(self, names: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
        """Device call: read `names` (one failing read does not stop the others)."""
        values, errors = {}, {}
        for name in names:
            try:
                values[name] = self.device.query(name)
            except Exception as exc:
                errors[name] = f"{wire_type_of(exc)}: {exc}"
        return values, errors

    def _reads_done(self, job: Job, pending: _Pending, now: float, out) -> None:
        self._pending.pop(job, None)
        self._reads_in_flight -= 1
        values, errors = job.value if job.ok else ({}, dict.fromkeys(pending.reads, str(job.error)))
        for name in pending.reads:
            self.subs.poll_ended(name, now)
        for name, value in values.items():
            self._observe(name, value, now, out)
        if errors:
            self._log(
                out,
                "subscription read failed",
                now,
                _INFO,
                f"{self.name}: reading for subscribers failed: {_short(str(errors), 300)}",
            )
        if pending.streams:
            result = self._subscribed(pending.streams, pending.session)
            if errors:
                result["errors"] = errors
            self._reply(
                out, pending.route, native.ok_reply(result, pending.request), pending.observe
            )
        self._plan_wakeup()

    def _subscription_tick(self, now: float, out: list[Action]) -> None:
        subs = self.subs
        if not subs.streams and not subs.pinned:
            return
        for topic, body in subs.flush_due(now):
            out.append(Publish(topic, body))
        due = subs.polls_due(now)
        readable = [name for name in due if name in self.readable]
        for name in due:
            if name not in self.readable:
                subs.poll_ended(name, now)
        if readable and len(self._queue) < self.limits.max_queue_per_device:
            names = tuple(readable)
            self._reads_in_flight += 1
            job = Job(self._read_values, (names,), label="poll")
            request = native.Request("query", {"param": names[0]})
            self._pending[job] = _Pending(
                [],
                request,
                now,
                None,
                None,
                (),
                "poll",
                ("poll",),
                None,
                0,
                answered=True,
                between_steps=True,
                reads=names,
            )
            self._enqueue(job, ("poll",), 0)
        elif readable:
            for name in readable:
                subs.poll_ended(name, now)

    # ---- a second protocol (LAPLACE) ----------------------------------------------------------
    def _on_envelope(self, route, obj, now, observe, out) -> None:
        """An envelope message: answered now, and/or queued on the device like a native call.

        The queue bounds are checked first (no callback runs for a refused message) and a
        refusal is answered in the envelope's own error shape."""
        envelope = self.envelope
        assert envelope is not None
        key = (route[0], envelope.metric_type)
        size = self._body_size
        try:
            self._check_queue_bounds(key, size)
        except BusyError as exc:
            out.append(Count("refused", (exc.details["bound"],)))
            observe.operation = "UNKNOWN"
            reply = envelope.refuse(obj, str(exc))
            self._reply(out, route, reply, observe)
            return
        busy = self.running is not None or bool(self._queue) or self.tasks.active is not None
        answer = envelope.handle(obj, busy)
        observe.operation = answer.command
        # a command that changes something leaves an audit line when it is answered
        audit = None
        if envelope.needed(obj) >= access.OPERATOR:
            audit = (*self._audit_who(route[0]), _bounded(obj.get("payload")))
        job = answer.job
        task = None
        if job is not None and answer.as_task:
            made = job
            run = TaskRun(lambda: made.fn(*made.args, **made.kwargs))
            task = Task(
                id=self.tasks.new_id(),
                operation=answer.command,
                label=_short(f"{envelope.metric_type} {job.label}", 120),
                client_id=native.client_id_of(route[0]),
                session=None,
                touches=answer.touches,
                run=run,
                first_job=Job(run.step, (None,), label=job.label),
                created=now,
                detached=True,
            )
            self.tasks.add(task)
            job = task.first_job
        if job is not None:
            request = native.Request(envelope.metric_type, {})
            self._pending[job] = _Pending(
                route,
                request,
                now,
                None,
                None,
                answer.touches,
                answer.command,
                key,
                Observation(envelope.metric_type, answer.command, "ok", None, now),
                size,
                answer=answer,
                task=task,
                audit=audit,
            )
            self._enqueue(job, key, size)
        if answer.now is not None:
            self._reply(out, route, answer.now, observe)
            if audit is not None:
                self._audit_envelope(out, audit, answer.command, answer.now, now)

    _handlers: dict[str, Callable[..., None]] = {
        "connect": _on_connect,
        "disconnect": _on_disconnect,
        "describe": _on_describe,
        "help": _on_help,
        "ping": _on_ping,
        "heartbeat": _on_heartbeat,
        "locks": _on_locks,
        "task_status": _on_task_status,
        "task_cancel": _on_task_cancel,
        "subscribe": _on_subscribe,
        "unsubscribe": _on_unsubscribe,
        "force_release": _on_force_release,
        "query": _on_device_request,
        "write": _on_device_request,
        "call": _on_device_request,
    }


#: Requests that leave a line in the audit trail.
_AUDITED = frozenset({"write", "call"})


def _target(request: native.Request) -> str:
    """The parameter or operation a request is about ('' for neither)."""
    fields = request.fields
    target = fields.get("param") or fields.get("func") or ""
    if not target and request.type == "force_release":
        target = str(fields.get("resources"))
    return _short(str(target), 120)


def _bounded(value: Any) -> Any:
    """A value as the audit trail keeps it: itself when its JSON is short, else that JSON cut
    to AUDIT_VALUE_CHARS (a peer's megabytes never reach the trail)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    try:
        text = native.encode(value).decode()
    except Exception:
        text = repr(value)
    if len(text) <= AUDIT_VALUE_CHARS:
        return value
    return text[:AUDIT_VALUE_CHARS] + f"... ({len(text)} chars)"


#: task_status / task_cancel without a task id while no task runs
_IDLE_TASK = {"task": None, "state": "idle"}


def _error(
    request: native.Request | None, message: str, error_type: str, **extra: Any
) -> dict[str, Any]:
    if request is None:
        return native.error_reply(message, error_type, **extra)
    return native.error_reply(message, error_type, request.id, request.has_id, **extra)


def _reply_key(request: native.Request) -> native.Request:
    """What a later reply to `request` needs (its type and id), without the request's body."""
    return native.Request(request.type, {}, request.id, request.has_id, None, request.session)


def _details(exc: BaseException) -> dict[str, Any]:
    """Extra reply fields an error carries (e.g. lock holders); never the protocol's own."""
    details = getattr(exc, "details", None)
    if not isinstance(details, dict):
        return {}
    return {
        k: v
        for k, v in details.items()
        if k not in ("status", "error", "type", "id", "too_many", "request_id", "has_id")
    }


def _short(text: str, limit: int = 120) -> str:
    """A peer-chosen string cut for a log line (a log line never carries a peer's megabytes)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _quote(leaves: tuple[str, ...] | list[str]) -> str:
    return quote_names(list(leaves))


def help_text(description: dict[str, Any]) -> str:
    """The `help` reply (what `labmesh describe` prints): the device's whole docstring, its
    parameters with type, unit, range or options and access, its operations with their full
    signatures (types and defaults) and docstrings, and its lockable resources as a tree."""
    lines = [f"{description['name']} ({description['kind']})"]
    doc = (description["doc"].get("description") or "").strip()
    if doc:
        lines += ["", *_indented(doc, "  ")]
    params = description["doc"]["parameters"]["default"]
    if params:
        lines += ["", "Parameters:"]
        for p in params:
            access = (
                " (read-only)" if p["read_only"] else " (write-only)" if p["write_only"] else ""
            )
            line = f"  {p['name']}: {p['dtype']}{_unit(p)}{_range(p)}{access}"
            lines.append(line)
            if p["description"]:
                lines += _indented(p["description"], "      ")
    functions = description["doc"]["functions"]
    if functions:
        lines += ["", "Operations:"]
        for f in functions:
            args = ", ".join(_argument(a) for a in f["iparams"])
            returns = f["oparams"][0]["dtype"] if f.get("oparams") else None
            if returns and returns.startswith("Generator[") and f["kind"].get("task"):
                returns = _last_type_argument(returns)  # what the task ends with
            notes = []
            if f["kind"].get("budget_s"):
                notes.append(f"budget {f['kind']['budget_s']:g} s")
            if f["kind"].get("task"):
                notes.append("a task: follow it, stop it")
            if f["kind"].get("read_only"):
                notes.append("read-only")
            tail = f"  [{'; '.join(notes)}]" if notes else ""
            lines.append(f"  {f['name']}({args})" + (f" -> {returns}" if returns else "") + tail)
            if f["description"]:
                lines += _indented(f["description"], "      ")
    resources = description.get("resources")
    if resources:
        lines += ["", "Lockable resources:"]
        lines += _tree(resources, "  ")
    return "\n".join(lines)


def _last_type_argument(annotation: str) -> str:
    """`Generator[Any, Any, dict[str, float]]` -> `dict[str, float]`."""
    inner = annotation[annotation.index("[") + 1 : -1]
    depth, start = 0, 0
    for i, char in enumerate(inner):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            start = i + 1
    return inner[start:].strip()


def _indented(text: str, prefix: str) -> list[str]:
    return [f"{prefix}{line}".rstrip() for line in text.strip().splitlines()]


def _unit(p: dict[str, Any]) -> str:
    return f" {p['unit']}" if p.get("unit") else ""


def _range(p: dict[str, Any]) -> str:
    """`, one of ['CW', 'PULSED']`, `, 400 to 1100`, `, >= 1`, `, <= 30` or ''."""
    if p.get("options") is not None:
        return f", one of {p['options']}"
    low, high = p.get("min_value"), p.get("max_value")
    if low is not None and high is not None:
        return f", {low:g} to {high:g}" if _numeric(low, high) else f", {low} to {high}"
    if low is not None:
        return f", >= {low}"
    if high is not None:
        return f", <= {high}"
    return ""


def _numeric(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _argument(a: dict[str, Any]) -> str:
    if a.get("kind") == "VAR_POSITIONAL":
        return f"*{a['name']}"
    if a.get("kind") == "VAR_KEYWORD":
        return f"**{a['name']}"
    text = a["name"]
    if a.get("dtype"):
        text += f": {a['dtype']}"
    if not a.get("required"):
        text += f" = {a.get('default')!r}"
    return text


def _tree(node: Any, prefix: str) -> list[str]:
    """A resource tree (nested dicts and lists of leaf names) drawn one name per line."""
    if isinstance(node, dict):
        lines = []
        for name, below in node.items():
            lines.append(f"{prefix}{name}/" if below else f"{prefix}{name}")
            lines += _tree(below, prefix + "  ")
        return lines
    if isinstance(node, (list, tuple)):
        lines = []
        for item in node:
            lines += (
                _tree(item, prefix)
                if isinstance(item, (dict, list, tuple))
                else [f"{prefix}{item}"]
            )
        return lines
    return [] if node is None else [f"{prefix}{node}"]
