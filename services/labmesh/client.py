"""Clients of a device server: `DeviceClient` (sync, thread-safe) and `AsyncDeviceClient`.

Both connect with a handshake, read `describe`, and bind the device's operations as methods,
so `client.move_to(3.0)` calls the remote `move_to`. Both drive the same exchange
(`labmesh.protocol.exchange`: ids, late replies, re-sends, timeouts, lease loss); they differ
only in how they wait on the socket (docs/client.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from labmesh.discovery.resolver import Resolver, default_resolver
from labmesh.protocol.errors import LabmeshError, LeaseExpiredError, RemoteError, remote_error
from labmesh.protocol.exchange import (
    Action,
    Channel,
    Done,
    Exchange,
    Reconnect,
    Send,
    Wait,
    attempts_for,
    result,
)
from labmesh.protocol.topics import Filter
from labmesh.security import ClientCurve, KeyPair, client_security
from labmesh.transport import (
    close_monitored,
    dealer_socket,
    handshake_failure,
    handshake_monitor,
)
from labmesh.updates import (
    AsyncReceiver,
    AsyncSubscription,
    Receiver,
    Subscription,
    pub_endpoint,
)

log = logging.getLogger("labmesh.client")

#: Extra wait beyond a server budget so the server's own TimeoutError reply can arrive (ms).
GRACE_MS = 1000
#: How long close() waits for the server to confirm the disconnect (ms).
CLOSE_TIMEOUT_MS = 1000
#: How long a heartbeat waits for its answer (ms); short, so close() is never held up long.
HEARTBEAT_WAIT_MS = 500
#: The lease a labmesh client asks for at connect (s); renewed every third of it.
DEFAULT_LEASE_S = 10.0


#: `host:port` given where an address is expected (device names never contain a colon).
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):[0-9]{1,5}")


def _is_async(context: Any) -> bool:
    return isinstance(context, zmq.asyncio.Context)


def resolver_for(discovery: Any) -> Resolver:
    """The Resolver a client uses: the one given, one for the endpoints given, or the shared
    process-wide one configured by LABMESH_DISCOVERY."""
    if isinstance(discovery, Resolver):
        return discovery
    if discovery is not None:
        return Resolver(discovery)
    return default_resolver()


class _ClientCore:
    """What the sync and async clients share: payloads, the request channel, the lease rules
    and the binding of remote operations (no I/O)."""

    def __init__(
        self,
        address: str,
        timeout: int,
        resources: Any,
        client_id: str | None,
        connect_kwargs: dict | None,
        retries: int,
        lease_s: float | None,
        wait_s: float | None,
        reacquire: bool,
        discovery: Any,
        key: KeyPair | str | None = None,
        server_key: str | bytes | None = None,
    ) -> None:
        if "://" not in address and _HOST_PORT.fullmatch(address):
            address = "tcp://" + address  # `10.0.0.5:5555`: no device name has a colon
        #: the device name when `address` had no scheme (resolved through discovery), else None
        self.device_name = None if "://" in address else address
        self._resolver = resolver_for(discovery) if self.device_name else None
        #: the server's address (for a device name: the last known one, None before connect)
        self.address: str | None = address if self._resolver is None else None
        if self._resolver is not None:
            self.address = self._resolver.cached(address)
        self.default_timeout = int(timeout)
        self.resources = resources if resources is not None else []
        self.client_id = client_id or f"client-{uuid.uuid4().hex}"
        self._sockets_made = 0
        self.connect_kwargs = dict(connect_kwargs or {})
        self.retries = retries
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.reacquire = reacquire
        self.session: str | None = None
        self.connection_info: dict[str, Any] | None = None
        #: why the locks were lost (a heartbeat was refused and they could not be re-acquired)
        self.lease_lost: str | None = None
        self.description: dict[str, Any] = {}
        self._idempotent: frozenset[str] = frozenset()
        self._budgets: dict[str, float] = {}
        self._channel = Channel(str(self.address or address), log)
        self._connected = False
        self._subscriptions: list[Any] = []
        self._receiver: Any = None
        self._key = key
        self._server_key = server_key
        #: the CurveZMQ settings of the connection (None: plaintext)
        self.curve: ClientCurve | None = None
        self._monitor: Any = None

    # ---- requests -------------------------------------------------------------------------
    def _exchange(
        self, payload: dict[str, Any], attempts: int | None, wait_ms: int | None
    ) -> Exchange:
        """The exchange for one request: its attempts (safe requests are re-sent after a
        timeout, others never), its wait, and whether a LeaseExpiredError may reconnect (if no
        locks were held, or `reacquire`)."""
        if attempts is None:
            attempts = attempts_for(payload, self.retries, self._idempotent)
        if wait_ms is None:
            wait_ms = self._recv_timeout_ms(payload.get("timeout"))
        held = bool((self.connection_info or {}).get("resources"))
        if attempts > 1 and self._keeps_route():
            # the kept socket's connection loses nothing: a re-send would only run the call
            # again and owe one more answer, so one attempt waits the whole budget
            wait_ms, attempts = wait_ms * attempts, 1
        return self._channel.exchange(
            payload,
            wait_ms=wait_ms,
            attempts=attempts,
            session=self.session,
            may_reconnect=self.reacquire or not held,
        )

    def _recv_timeout_ms(self, budget_s: float | None) -> int:
        if budget_s is None:
            return self.default_timeout
        budget_ms = math.ceil(budget_s * 1000)
        return max(self.default_timeout, budget_ms + max(GRACE_MS, budget_ms // 5))

    def _routing_id(self) -> bytes:
        """The routing id of the next socket: `client_id`, then `client_id~1`, `~2`, ...

        A labmesh server lets no connection take over the route of another live one (a
        stranger who read an id from `locks` could otherwise receive its replies), so a fresh
        socket after a timeout must not reuse the id the server may still see connected; the
        locks are unaffected, they belong to the session token. A server that gave no token
        (PLESTY's) echoes no request id either: a late reply sent to a reused id would be taken
        for the answer to the next request, so a fresh socket gets a new id there too (the
        late reply goes to the closed one). A client holding locks on such a server keeps its
        socket instead (see `_keeps_route`).
        """
        n = self._sockets_made
        self._sockets_made += 1
        if n == 0:
            return self.client_id.encode()
        self._channel.new_route()
        suffix = f"~{n}".encode()
        return self.client_id.encode()[: 255 - len(suffix)] + suffix  # ZeroMQ's limit: 255

    def _abandon(self, exchange: Exchange) -> None:
        """The caller stopped waiting (cancelled, Ctrl+C, a signal handler's exception): an
        answer an id-less peer still owes must not be taken for the next request's, so the
        socket is replaced unless kept (see `_keeps_route`; no re-resolving here). Interrupted
        while the socket was being replaced, a connected client gets its socket back."""
        if not self._connected:  # closing (or never connected): no socket to keep alive
            exchange.abandon()
        elif exchange.abandon() and self._socket is not None and not self._keeps_route():
            self._close_socket()
            self._socket = self._dealer()
        elif self._socket is None:
            self._socket = self._dealer()
        self._rcvtimeo = -1

    def _keeps_route(self) -> bool:
        """A client holding locks on a server that gave no session token (PLESTY, which knows
        locks only by the routing id and echoes no request id) keeps its socket after a
        timeout: a new socket would need the same id, and a ROUTER that still sees the old
        connection leaves the new one unrouted until it sends, so the late answer would be
        lost. On the kept socket the late answers arrive, and the exchange, which counts the
        answers still owed, drops them before the next request is sent."""
        return (
            self._socket is not None
            and self.session is None
            and not self._channel.peer_echoes_ids  # (a labmesh server between sessions does)
            and bool((self.connection_info or {}).get("resources"))
        )

    def _connect_payload(self) -> dict[str, Any]:
        payload = {"type": "connect", "resources": self.resources, **self.connect_kwargs}
        if self.lease_s is not None:
            payload["lease"] = self.lease_s
        if self.wait_s is not None:
            payload["wait"] = self.wait_s
        return payload

    def _lock_payload(self, resources: Any, wait_s: float | None) -> dict[str, Any]:
        """A connect under the current session (the exchange adds its token): the server
        replaces the session's grant with `resources`."""
        payload = {**self._connect_payload(), "resources": resources}
        payload.pop("wait", None)
        if wait_s is not None:
            payload["wait"] = wait_s
        return payload

    def _connect_wait_ms(self) -> int:
        return self.default_timeout + int((self.wait_s or 0) * 1000)

    def _secure(self) -> None:
        """Pick the CurveZMQ settings for the address now known: the server key given, or the
        one discovery published for the device name (a server that registered a key)."""
        server_key = self._server_key
        if server_key is None and self._resolver is not None and self.device_name is not None:
            server_key = self._resolver.server_key(self.device_name)
        self.curve = client_security(server_key, self._key, repr(self.device_name or self.address))

    def _dealer(self) -> Any:
        sock = dealer_socket(self._ctx, self.address, self._routing_id(), self.curve)
        if self.curve is not None and not _is_async(self._ctx):
            # (the asyncio client's timeouts stay plain: its monitor would need the loop)
            self._monitor = handshake_monitor(sock)
        return sock

    def _why_no_reply(self, error: BaseException) -> BaseException:
        """A timeout of a secured connection whose handshakes failed says why."""
        failure = handshake_failure(self._monitor)
        return failure if failure is not None else error

    def _re_resolve(self) -> None:
        """After a failed exchange: ask discovery again (the device may have moved). Blocking:
        the asyncio client runs it in a worker thread."""
        if self._resolver is None or self.device_name is None:
            return
        self._resolver.invalidate(self.device_name)
        try:
            address = self._resolver.resolve(self.device_name)
        except (LookupError, ConnectionError) as exc:
            log.info(
                "%s: re-resolving failed (%s); keeping %s", self.device_name, exc, self.address
            )
            return
        if address != self.address:
            if self.address is not None:
                log.warning("%s moved from %s to %s", self.device_name, self.address, address)
            self.address = self._channel.peer = address
        try:
            self._secure()
        except LabmeshError as exc:  # e.g. the device is secured now and we have no key:
            # keep a usable client (the next request says why it gets no answer)
            log.warning("%s: %s", self.device_name, exc)

    @property
    def heartbeat_interval_s(self) -> float | None:
        """How often the lease is renewed (None: no lease, e.g. against a PLESTY server)."""
        lease = (self.connection_info or {}).get("lease")
        if not self.session or not isinstance(lease, (int, float)):
            return None
        return max(0.05, lease / 3)

    def _heartbeat_refused(self, exc: RemoteError) -> bool:
        """A heartbeat got an error reply: True to connect again (the lease expired and no
        locks were held, or `reacquire`); else the locks are lost, recorded in `lease_lost`."""
        if exc.type == LeaseExpiredError.wire_type and (
            self.reacquire or not (self.connection_info or {}).get("resources")
        ):
            return True
        if self.lease_lost is None:
            self.lease_lost = str(exc)
            log.error("%s: lease lost, locks gone: %s", self.address, exc)
        return False

    def _pub_endpoint(self) -> str:
        pub = (self.connection_info or {}).get("pub")
        if not pub:
            raise ConnectionError(
                f"{self.address} publishes no updates (a PLESTY server, or a labmesh server "
                "older than subscriptions): poll with query() instead"
            )
        return pub_endpoint(pub, str(self.address))

    def _topics_left_by(self, leaving: Any) -> list[str]:
        """Topics of `leaving` that no other subscription of this client still uses."""
        others = {t for sub in self._subscriptions if sub is not leaving for t in sub.topics}
        return [t for t in leaving.topics if t not in others]

    def _call_payload(self, func: str, args: tuple, kwargs: dict, timeout: float | None) -> dict:
        if timeout is None:
            timeout = self._budgets.get(func)
        return {
            "type": "call",
            "func": func,
            "args": list(args),
            "kwargs": kwargs,
            "timeout": timeout,
        }

    # ---- after connect --------------------------------------------------------------------
    def _connected_with(self, info: dict[str, Any]) -> None:
        self.connection_info = info
        self.session = info.get("session") if isinstance(info, dict) else None
        self.lease_lost = None
        self._connected = True

    def _described(self, description: dict[str, Any]) -> None:
        self.description = description
        self._budgets = dict(description.get("budgets") or {})
        self._idempotent = frozenset(description.get("idempotent") or ())
        functions = {
            f.get("name"): f
            for f in (description.get("doc") or {}).get("functions", [])
            if isinstance(f, dict)
        }
        for name in description.get("methods", []):
            if not isinstance(name, str) or not name.isidentifier() or hasattr(self, name):
                continue
            setattr(self, name, self._make_proxy(name, functions.get(name)))

    def _make_proxy(self, name: str, info: dict[str, Any] | None) -> Callable[..., Any]:
        raise NotImplementedError

    def get_config_list(self) -> list[str]:
        """Names of the device's parameters (from describe; no round trip)."""
        params = (self.description.get("doc") or {}).get("parameters") or {}
        return sorted(p["name"] for group in params.values() for p in group)


_POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _signature(info: dict[str, Any] | None) -> inspect.Signature | None:
    """Rebuild a remote operation's signature from describe, for help() and IDEs."""
    if not info:
        return None
    try:
        params = [
            inspect.Parameter(
                p["name"],
                getattr(inspect.Parameter, str(p.get("kind")), _POSITIONAL_OR_KEYWORD),
                default=inspect.Parameter.empty if p.get("required") else p.get("default"),
            )
            for p in info.get("iparams", [])
        ]
        return inspect.Signature(params)
    except (ValueError, TypeError, KeyError):
        return None


def _decorate(proxy: Callable[..., Any], name: str, info: dict[str, Any] | None) -> None:
    proxy.__name__ = name
    proxy.__qualname__ = name
    proxy.__doc__ = (info or {}).get("description") or f"Remote operation {name}."
    sig = _signature(info)
    if sig is not None:
        proxy.__signature__ = sig  # type: ignore[attr-defined]


#: Task states after which nothing changes.
FINISHED = frozenset({"done", "failed", "cancelled"})
#: The longest one task_status request waits on the server (s); longer waits ask again.
STATUS_WAIT_S = 30.0


def _task_outcome(status: dict[str, Any]) -> Any:
    """The result of a finished task, or its error raised (as the blocking call would)."""
    if status["state"] == "done":
        return status.get("result")
    error = status.get("error") or {}
    raise remote_error(
        str(error.get("type", "RemoteError")), str(error.get("error", "failed")), status
    )


class Task:
    """A long operation running on a device server (`client.start(...)`).

    `done()`, `wait(timeout)`, `result(timeout)` (the value, or the operation's error raised),
    `progress` (the last progress the operation reported), `status()` (everything the server
    knows: state, progress, steps, who started it), `cancel()` (stop it: the driver brings the
    hardware to rest; `result()` then raises TaskCancelledError saying where it stopped) and
    `add_done_callback(fn)`.
    """

    def __init__(self, client: DeviceClient, info: dict[str, Any]) -> None:
        self.client = client
        self.id: str = info["task"]
        self.operation: str = info.get("operation", "")
        self._status: dict[str, Any] = info

    def status(self) -> dict[str, Any]:
        """Ask the server how the task is doing."""
        if self._status.get("state") not in FINISHED:
            self._status = self.client._request({"type": "task_status", "task": self.id})
        return self._status

    @property
    def state(self) -> str:
        return self._status.get("state", "queued")

    @property
    def progress(self) -> Any:
        """The last progress the operation reported (asks the server while it runs)."""
        return self.status().get("progress")

    def done(self) -> bool:
        return self.status()["state"] in FINISHED

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the task has finished (True) or `timeout` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._status.get("state") not in FINISHED:
            left = STATUS_WAIT_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            wait_s = max(0.001, min(left, STATUS_WAIT_S))
            self._status = self.client._request(
                {"type": "task_status", "task": self.id, "wait": wait_s},
                wait_ms=int(wait_s * 1000) + GRACE_MS + self.client.default_timeout,
            )
        return True

    def result(self, timeout: float | None = None) -> Any:
        """The operation's result once it finished; its error raised if it failed or was
        stopped; TimeoutError if it is still running after `timeout` seconds."""
        if not self.wait(timeout):
            raise TimeoutError(
                f"task {self.id} ({self.operation}) still running after {timeout:g} s; "
                "wait longer, or cancel() it"
            )
        return _task_outcome(self._status)

    def cancel(self) -> dict[str, Any]:
        """Stop the task (at its next step; the driver stops the hardware); returns its status."""
        self._status = self.client._request({"type": "task_cancel", "task": self.id})
        return self._status

    def add_done_callback(self, fn: Callable[[Task], Any]) -> None:
        """Call `fn(task)` from a background thread once the task has finished."""

        def watch() -> None:
            try:
                self.wait()
            except Exception as exc:  # the server went away: the callback still learns
                log.info("task %s: waiting failed: %s", self.id, exc)
            fn(self)

        threading.Thread(target=watch, name=f"task:{self.id}", daemon=True).start()

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.operation} {self.state}>"


class DeviceClient(_ClientCore):
    """A synchronous client of one device server; safe to share between threads.

    Parameters:
        address: the server, e.g. `tcp://localhost:5555`, or a device name (`pm100-a`) that
            discovery resolves; a name is looked up again after a failed exchange (the
            device may have moved), and the last known address is used while discovery is down.
        timeout: default receive timeout in milliseconds.
        resources: what to lock at connect: a string (`"Dev1/port0"` = every line below it), a
            list, or a nested dict tree.
        client_id: a stable identity (the DEALER routing id); random when not given.
        connect_kwargs: metadata sent with connect (e.g. `{"name": "experiment-42"}`), shown to
            other users as the holder of your locks.
        retries: how many times a safe request (query, describe, ping) is re-sent after a timeout.
        lease_s: the lease asked for at connect, renewed in the background (None: PLESTY-style).
        wait_s: wait up to this long at connect for busy resources (first come, first served).
        reacquire: after a server restart, connect again and re-acquire the locks instead of
            raising LeaseExpiredError.
        discovery: discovery endpoints or a Resolver (default: LABMESH_DISCOVERY).
        context: the ZeroMQ context (default: the process-wide one).
        key: this client's CurveZMQ key pair (a KeyPair, or a name/path of one; default
            $LABMESH_KEY), used when the server is secured.
        server_key: the server's public key (Z85 text, a name or a `.key` path) for a server
            given by address; for a device name, discovery supplies it.
    """

    def __init__(
        self,
        address: str = "tcp://localhost:5555",
        timeout: int = 5000,
        resources: Any = None,
        client_id: str | None = None,
        connect_kwargs: dict | None = None,
        *,
        retries: int = 2,
        lease_s: float | None = DEFAULT_LEASE_S,
        wait_s: float | None = None,
        reacquire: bool = False,
        discovery: Any = None,
        context: zmq.Context | None = None,
        key: KeyPair | str | None = None,
        server_key: str | bytes | None = None,
    ) -> None:
        super().__init__(
            address,
            timeout,
            resources,
            client_id,
            connect_kwargs,
            retries,
            lease_s,
            wait_s,
            reacquire,
            discovery,
            key,
            server_key,
        )
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.RLock()
        self._receiver_lock = threading.Lock()
        self._rcvtimeo = -1
        self._closing = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._socket: zmq.Socket | None = None
        try:
            if self.address is None:  # a device name not seen before: ask discovery
                assert self._resolver is not None and self.device_name is not None
                self.address = self._channel.peer = self._resolver.resolve(self.device_name)
            self._secure()
            self._socket = self._dealer()
            self.connect()
        except BaseException:
            self._close_socket()
            raise

    def connect(self) -> None:
        """Handshake (locks `resources`), read describe and bind the device's operations."""
        self._handshake()
        self._described(self.describe())

    def _handshake(self) -> None:
        with self._lock:
            self.session = None
            info = self._request(self._connect_payload(), wait_ms=self._connect_wait_ms())
            self._connected_with(info)
            if self._subscriptions:
                self._resubscribe()
        if self.heartbeat_interval_s is not None and self._heartbeat is None:
            self._heartbeat = threading.Thread(
                target=self._renew_lease, name=f"lease:{self.client_id}", daemon=True
            )
            self._heartbeat.start()

    def _renew_lease(self) -> None:
        """Background: heartbeat every third of the lease until close()."""
        while not self._closing.wait(self.heartbeat_interval_s or 1.0):
            try:
                self._request({"type": "heartbeat"}, attempts=1, wait_ms=HEARTBEAT_WAIT_MS)
            except TimeoutError:
                log.info("%s: lease heartbeat not answered; retrying", self.address)
            except ConnectionError:
                return
            except RemoteError as exc:  # LeaseExpiredError, or anything a broken server says
                if self._heartbeat_refused(exc):
                    try:
                        self._handshake()
                        log.warning("%s: lease was lost (%s); re-acquired", self.address, exc)
                    except Exception as again:
                        log.warning("%s: re-acquiring the lease failed: %s", self.address, again)

    # ---- subscriptions ----------------------------------------------------------------------
    def subscribe(
        self,
        params: str | list[str],
        callback: Callable[[Any], Any] | None = None,
        *,
        every_s: float | None = None,
        deadband: float | None = None,
        max_rate_hz: float | None = None,
    ) -> Subscription:
        """Follow parameters as they change: a `Subscription` of `Update`s (name, value,
        timestamp, seq, missed), the first of each its current value.

        Iterate it (blocking), or pass `callback(update)` (run on the client's receiving
        thread). `every_s`: have the server read the device that often (one read per period
        whatever the number of subscribers); `deadband`: skip changes smaller than this;
        `max_rate_hz`: at most this many updates a second (the latest is kept). Updates also
        come from the driver (e.g. positions during a move) and from writes. Close it (or use
        `with`) to stop.
        """
        names = [params] if isinstance(params, str) else list(params)
        sub = Subscription(self, names, Filter(every_s, deadband, max_rate_hz), callback)
        # the SUB listens first; never waited for under the client's lock (a callback on the
        # receiving thread may be waiting for that lock)
        self._receiver_here().add(sub)
        with self._lock:
            self._start_subscription(sub)
        return sub

    def _receiver_here(self) -> Receiver:
        endpoint = self._pub_endpoint()
        with self._receiver_lock:
            if self._receiver is None:
                self._receiver = Receiver(self._ctx, endpoint, self.curve)
        self._receiver.reconnect(endpoint)
        return self._receiver

    def _start_subscription(self, sub: Subscription) -> None:
        receiver = self._receiver
        receiver.add(sub)  # already there (subscribe, or subscribing again): nothing waited for
        try:
            reply = self._request(sub.request())
        except BaseException:
            receiver.remove(sub)
            raise
        receiver.reconnect(self._pub_endpoint())  # the request may have met a restarted server
        if sub not in self._subscriptions:
            self._subscriptions.append(sub)
        for update in sub._current(reply):
            sub._hand(update)

    def _resubscribe(self) -> None:
        """Connected again (the server restarted, or the lease ran out): subscribe again."""
        for sub in list(self._subscriptions):
            sub._server_restarted()
            try:
                self._start_subscription(sub)
            except Exception as exc:
                log.warning("%s: subscribing again to %s failed: %s", self.address, sub.names, exc)

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._receiver is not None:
            self._receiver.remove(sub)  # outside the client's lock (see subscribe)
        with self._lock:
            topics = self._topics_left_by(sub)
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)
            if topics and self._socket is not None:
                with contextlib.suppress(TimeoutError, ConnectionError, RemoteError):
                    self._request({"type": "unsubscribe", "topics": topics}, attempts=1)

    def _reset_socket(self) -> None:
        """Replace the socket after a timeout so nothing stale can arrive on it."""
        if self._keeps_route():
            return
        self._close_socket()
        self._re_resolve()
        self._socket = self._dealer()
        self._rcvtimeo = -1

    def _close_socket(self) -> None:
        close_monitored(self._socket, self._monitor)  # the monitor stopped first (see there)
        self._socket = self._monitor = None

    def _request(
        self, payload: dict[str, Any], attempts: int | None = None, wait_ms: int | None = None
    ) -> Any:
        """Send one request and return its result (the exchange decides; this does the I/O)."""
        with self._lock:
            if self._socket is None:
                raise ConnectionError(f"client of {self.address} is closed")
            exchange = self._exchange(payload, attempts, wait_ms)
            try:
                action: Action = exchange.start(time.monotonic())
                while True:
                    if isinstance(action, Send):
                        if action.fresh_socket:
                            self._reset_socket()
                        self._send(action.body)
                        action = Wait(action.wait_ms)
                    elif isinstance(action, Wait):
                        body = self._receive(action.ms)
                        action = exchange.after_wait(body, time.monotonic())
                    elif isinstance(action, Done):
                        if self._monitor is not None:  # handshakes worked: old events say nothing
                            handshake_failure(self._monitor)
                        return result(action.reply)
                    elif isinstance(action, Reconnect):
                        self._handshake()
                        action = exchange.reconnected(self.session, time.monotonic())
                    else:
                        error = self._why_no_reply(action.error)
                        self._reset_socket()
                        raise error
            except BaseException:
                self._abandon(exchange)
                raise

    def _send(self, body: bytes) -> None:
        """Queue a request without ever blocking. A DEALER whose only connection is gone (a
        CurveZMQ handshake the server refused ends it for good, possibly before the first
        send) blocks a plain send forever; unqueued, the request gets no reply, and the wait
        times out and says why (_why_no_reply)."""
        try:
            self._socket.send(body, zmq.NOBLOCK)
        except zmq.Again:
            log.info(
                "%s: no connection takes the request now; waiting out its timeout", self.address
            )

    def _receive(self, wait_ms: int) -> bytes | None:
        sock = self._socket
        if self._rcvtimeo != wait_ms:  # a socket option write costs; most waits are the same
            sock.setsockopt(zmq.RCVTIMEO, wait_ms)
            self._rcvtimeo = wait_ms
        try:
            return sock.recv()
        except zmq.Again:
            return None

    # ---- public API -----------------------------------------------------------------------
    def query(self, param: str, timeout: float | None = None) -> Any:
        """Read a parameter. `timeout` (s) is the server-side budget."""
        return self._request({"type": "query", "param": param, "timeout": timeout})

    def write(self, param: str, value: Any, timeout: float | None = None) -> Any:
        """Write a parameter (never re-sent by the library)."""
        return self._request({"type": "write", "param": param, "value": value, "timeout": timeout})

    def call(self, func: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call an operation by name; waits its declared budget unless `timeout` is given."""
        return self._request(self._call_payload(func, args, kwargs, timeout))

    def start(self, func: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Task:
        """Start operation `func` as a task and return at once with a `Task` to follow, wait
        for, or cancel. `timeout` (s): a budget after which the server reports it timed out
        (the task keeps running until it ends or is cancelled)."""
        payload = self._call_payload(func, args, kwargs, timeout)
        payload["timeout"] = timeout
        payload["task"] = True
        return Task(self, self._request(payload))

    def describe(self) -> dict[str, Any]:
        return self._request({"type": "describe"})

    def help(self) -> str:
        """The server's human-readable summary of the device."""
        return self._request({"type": "help"})["help"]

    def ping(self) -> dict[str, Any]:
        """Liveness: answered without waiting for the device."""
        return self._request({"type": "ping"})

    def identity(self) -> str:
        return self.call("identity")

    def locks(self) -> dict[str, Any]:
        """Who holds which resource of the device."""
        return self._request({"type": "locks"})

    def lock(self, resources: Any, wait_s: float | None = None) -> list[str]:
        """Hold `resources` from now on (they replace what this client holds; [] releases all),
        keeping the session, its subscriptions and its tasks. `wait_s`: wait in line that long
        for busy resources. The leaves now held; ResourceAllocationError naming the holder."""
        with self._lock:
            info = self._request(
                self._lock_payload(resources, wait_s),
                attempts=1,
                wait_ms=self.default_timeout + int((wait_s or 0) * 1000),
            )
            self.resources = resources
            self._connected_with(info)
        return list(info["resources"])

    def force_release(self, resources: Any) -> dict[str, Any]:
        """Free locks another session holds (admin role on a secured device): every session
        holding one of `resources` ends. Returns `{"released": [{holder, resources}, ...]}`."""
        return self._request({"type": "force_release", "resources": resources}, attempts=1)

    def _make_proxy(self, name: str, info: dict[str, Any] | None) -> Callable[..., Any]:
        def proxy(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, *args, **kwargs)

        _decorate(proxy, name, info)
        return proxy

    def close(self) -> None:
        """Release locks (disconnect) and close; returns within about a second if the server
        is gone."""
        self._closing.set()
        with self._lock:
            if self._socket is None:
                return
            try:
                if self._connected:
                    self._connected = False
                    try:
                        self._request(
                            {"type": "disconnect"},
                            attempts=1,
                            wait_ms=min(self.default_timeout, CLOSE_TIMEOUT_MS),
                        )
                    except Exception as exc:  # (its answer is not used: e.g. a PLESTY
                        # server's late error to an earlier call, taken as the disconnect's)
                        log.info(
                            "%s: disconnect not confirmed (%s); closing anyway", self.address, exc
                        )
            finally:
                self._close_socket()
                for sub in self._subscriptions:
                    sub.closed = True
                self._subscriptions.clear()
                if self._receiver is not None:
                    self._receiver.close()
                self._receiver = None

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DeviceClient {self.description.get('name', '?')} at {self.address}>"


def build_client(
    address: str = "tcp://localhost:5555",
    timeout: int = 5000,
    resources: Any = None,
    client_id: str | None = None,
    connect_kwargs: dict | None = None,
    **options: Any,
) -> DeviceClient:
    """Connect to a device server (PLESTY's signature); `options` go to DeviceClient."""
    return DeviceClient(address, timeout, resources, client_id, connect_kwargs, **options)


class AsyncDeviceClient(_ClientCore):
    """The asyncio twin of DeviceClient: same methods, as coroutines.

    Create it with `await build_async_client(...)` (or construct and `await client.connect()`).
    """

    def __init__(
        self,
        address: str = "tcp://localhost:5555",
        timeout: int = 5000,
        resources: Any = None,
        client_id: str | None = None,
        connect_kwargs: dict | None = None,
        *,
        retries: int = 2,
        lease_s: float | None = DEFAULT_LEASE_S,
        wait_s: float | None = None,
        reacquire: bool = False,
        discovery: Any = None,
        context: zmq.asyncio.Context | None = None,
        key: KeyPair | str | None = None,
        server_key: str | bytes | None = None,
    ) -> None:
        super().__init__(
            address,
            timeout,
            resources,
            client_id,
            connect_kwargs,
            retries,
            lease_s,
            wait_s,
            reacquire,
            discovery,
            key,
            server_key,
        )
        self._heartbeat: asyncio.Task | None = None
        self._ctx = context or zmq.asyncio.Context.instance()
        self._lock = asyncio.Lock()
        self._socket: zmq.asyncio.Socket | None = None

    async def connect(self) -> AsyncDeviceClient:
        """Resolve the name (in a worker thread: the event loop never waits on discovery),
        handshake, read describe and bind the device's operations."""
        try:
            if self.address is None:  # a device name not seen before: ask discovery
                assert self._resolver is not None and self.device_name is not None
                self.address = self._channel.peer = await asyncio.to_thread(
                    self._resolver.resolve, self.device_name
                )
            self._secure()
            self._socket = self._dealer()
            await self._handshake()
            self._described(await self.describe())
        except BaseException:
            self._close_socket()
            raise
        return self

    async def _handshake(self) -> None:
        self.session = None
        info = await self._request_locked(
            self._connect_payload(), attempts=None, wait_ms=self._connect_wait_ms()
        )
        self._connected_with(info)
        if self._subscriptions:
            await self._resubscribe()
        if self.heartbeat_interval_s is not None and self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._renew_lease())

    async def _renew_lease(self) -> None:
        """Background task: heartbeat every third of the lease until close()."""
        while True:
            await asyncio.sleep(self.heartbeat_interval_s or 1.0)
            try:
                await self._request({"type": "heartbeat"}, attempts=1, wait_ms=HEARTBEAT_WAIT_MS)
            except TimeoutError:
                log.info("%s: lease heartbeat not answered; retrying", self.address)
            except ConnectionError:
                return
            except RuntimeError as exc:  # the event loop or its executor is shutting down
                log.debug("%s: lease heartbeat ends: %s", self.address, exc)
                return
            except RemoteError as exc:
                if self._heartbeat_refused(exc):
                    try:
                        async with self._lock:
                            await self._handshake()
                        log.warning("%s: lease was lost (%s); re-acquired", self.address, exc)
                    except Exception as again:
                        log.warning("%s: re-acquiring the lease failed: %s", self.address, again)

    # ---- subscriptions ----------------------------------------------------------------------
    def subscribe(
        self,
        params: str | list[str],
        callback: Callable[[Any], Any] | None = None,
        *,
        every_s: float | None = None,
        deadband: float | None = None,
        max_rate_hz: float | None = None,
    ) -> AsyncSubscription:
        """As DeviceClient.subscribe: `async for update in client.subscribe("POWER"): ...`
        (the subscription is made on first use, or by `await sub.start()`)."""
        names = [params] if isinstance(params, str) else list(params)
        return AsyncSubscription(self, names, Filter(every_s, deadband, max_rate_hz), callback)

    async def _subscribe(self, sub: AsyncSubscription) -> None:
        async with self._lock:
            await self._start_subscription(sub)

    async def _start_subscription(self, sub: AsyncSubscription) -> None:
        endpoint = self._pub_endpoint()
        if self._receiver is None:
            self._receiver = AsyncReceiver(self._ctx, endpoint, self.curve)
        else:
            self._receiver.reconnect(endpoint)
        await self._receiver.wait_linked()  # a new connection: subscriptions reach the server
        self._receiver.add(sub)
        try:
            reply = await self._request_locked(sub.request(), None, None)
        except BaseException:
            self._receiver.remove(sub)
            raise
        self._receiver.reconnect(self._pub_endpoint())  # it may have met a restarted server
        if sub not in self._subscriptions:
            self._subscriptions.append(sub)
        for update in sub._current(reply):
            sub._hand(update)

    async def _resubscribe(self) -> None:
        for sub in list(self._subscriptions):
            sub._server_restarted()
            try:
                await self._start_subscription(sub)
            except Exception as exc:
                log.warning("%s: subscribing again to %s failed: %s", self.address, sub.names, exc)

    async def _unsubscribe(self, sub: AsyncSubscription) -> None:
        async with self._lock:
            topics = self._topics_left_by(sub)
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)
            if self._receiver is not None:
                self._receiver.remove(sub)
            if topics and self._socket is not None:
                with contextlib.suppress(TimeoutError, ConnectionError, RemoteError):
                    await self._request_locked({"type": "unsubscribe", "topics": topics}, 1, None)

    async def _reset_socket(self) -> None:
        if self._keeps_route():  # (see there)
            return
        self._close_socket()
        if self._resolver is not None and self.device_name is not None:  # else nothing to ask
            await asyncio.to_thread(self._re_resolve)
        self._socket = self._dealer()

    def _close_socket(self) -> None:
        close_monitored(self._socket, self._monitor)  # the monitor stopped first (see there)
        self._socket = self._monitor = None

    async def _request(
        self, payload: dict[str, Any], attempts: int | None = None, wait_ms: int | None = None
    ) -> Any:
        async with self._lock:
            return await self._request_locked(payload, attempts, wait_ms)

    async def _request_locked(
        self, payload: dict[str, Any], attempts: int | None, wait_ms: int | None
    ) -> Any:
        """As DeviceClient._request, awaiting instead of blocking."""
        if self._socket is None:
            raise ConnectionError(f"client of {self.address} is closed")
        exchange = self._exchange(payload, attempts, wait_ms)
        try:
            action: Action = exchange.start(time.monotonic())
            while True:
                if isinstance(action, Send):
                    if action.fresh_socket:
                        await self._reset_socket()
                    await self._send(action.body)
                    action = Wait(action.wait_ms)
                elif isinstance(action, Wait):
                    body = await self._receive(action.ms)
                    action = exchange.after_wait(body, time.monotonic())
                elif isinstance(action, Done):
                    return result(action.reply)
                elif isinstance(action, Reconnect):
                    await self._handshake()
                    action = exchange.reconnected(self.session, time.monotonic())
                else:
                    await self._reset_socket()
                    raise action.error
        except BaseException:
            # e.g. asyncio.wait_for(client.query(...), t): the socket is replaced at once,
            # without awaiting (no re-resolving), so nothing late answers the next request
            self._abandon(exchange)
            raise

    async def _send(self, body: bytes) -> None:
        """As DeviceClient._send: never waits for a connection to take the request."""
        try:
            await self._socket.send(body, zmq.NOBLOCK)
        except zmq.Again:
            log.info(
                "%s: no connection takes the request now; waiting out its timeout", self.address
            )

    async def _receive(self, wait_ms: int) -> bytes | None:
        sock = self._socket
        if wait_ms <= 0 or not await sock.poll(wait_ms):
            return None
        return await sock.recv()

    async def query(self, param: str, timeout: float | None = None) -> Any:
        return await self._request({"type": "query", "param": param, "timeout": timeout})

    async def write(self, param: str, value: Any, timeout: float | None = None) -> Any:
        return await self._request(
            {"type": "write", "param": param, "value": value, "timeout": timeout}
        )

    async def call(self, func: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return await self._request(self._call_payload(func, args, kwargs, timeout))

    async def start(
        self, func: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> AsyncTask:
        """As DeviceClient.start: the task, at once."""
        payload = self._call_payload(func, args, kwargs, timeout)
        payload["timeout"] = timeout
        payload["task"] = True
        return AsyncTask(self, await self._request(payload))

    async def describe(self) -> dict[str, Any]:
        return await self._request({"type": "describe"})

    async def help(self) -> str:
        return (await self._request({"type": "help"}))["help"]

    async def ping(self) -> dict[str, Any]:
        return await self._request({"type": "ping"})

    async def identity(self) -> str:
        return await self.call("identity")

    async def locks(self) -> dict[str, Any]:
        return await self._request({"type": "locks"})

    async def lock(self, resources: Any, wait_s: float | None = None) -> list[str]:
        """As DeviceClient.lock."""
        async with self._lock:
            info = await self._request_locked(
                self._lock_payload(resources, wait_s),
                1,
                self.default_timeout + int((wait_s or 0) * 1000),
            )
            self.resources = resources
            self._connected_with(info)
        return list(info["resources"])

    async def force_release(self, resources: Any) -> dict[str, Any]:
        return await self._request({"type": "force_release", "resources": resources}, 1)

    def _make_proxy(self, name: str, info: dict[str, Any] | None) -> Callable[..., Any]:
        async def proxy(*args: Any, **kwargs: Any) -> Any:
            return await self.call(name, *args, **kwargs)

        _decorate(proxy, name, info)
        return proxy

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._socket is None:
            return
        try:
            if self._connected:
                self._connected = False
                try:
                    await self._request(
                        {"type": "disconnect"},
                        attempts=1,
                        wait_ms=min(self.default_timeout, CLOSE_TIMEOUT_MS),
                    )
                except Exception as exc:  # (its answer is not used: see DeviceClient.close)
                    log.info("%s: disconnect not confirmed (%s); closing anyway", self.address, exc)
        finally:
            self._close_socket()
            for sub in self._subscriptions:
                sub.closed = True
                sub._hand_end()
            self._subscriptions.clear()
        if self._receiver is not None:
            await self._receiver.close()
            self._receiver = None

    async def __aenter__(self) -> AsyncDeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncTask:
    """The asyncio twin of Task: `await task.status()`, `wait(timeout)`, `result(timeout)`,
    `cancel()`; `progress` and `state` are the last known (no I/O)."""

    def __init__(self, client: AsyncDeviceClient, info: dict[str, Any]) -> None:
        self.client = client
        self.id: str = info["task"]
        self.operation: str = info.get("operation", "")
        self._status: dict[str, Any] = info

    @property
    def state(self) -> str:
        return self._status.get("state", "queued")

    @property
    def progress(self) -> Any:
        return self._status.get("progress")

    async def status(self) -> dict[str, Any]:
        if self.state not in FINISHED:
            self._status = await self.client._request({"type": "task_status", "task": self.id})
        return self._status

    async def done(self) -> bool:
        return (await self.status())["state"] in FINISHED

    async def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in FINISHED:
            left = STATUS_WAIT_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            wait_s = max(0.001, min(left, STATUS_WAIT_S))
            self._status = await self.client._request(
                {"type": "task_status", "task": self.id, "wait": wait_s},
                wait_ms=int(wait_s * 1000) + GRACE_MS + self.client.default_timeout,
            )
        return True

    async def result(self, timeout: float | None = None) -> Any:
        if not await self.wait(timeout):
            raise TimeoutError(
                f"task {self.id} ({self.operation}) still running after {timeout:g} s; "
                "wait longer, or cancel() it"
            )
        return _task_outcome(self._status)

    async def cancel(self) -> dict[str, Any]:
        self._status = await self.client._request({"type": "task_cancel", "task": self.id})
        return self._status

    def __repr__(self) -> str:
        return f"<AsyncTask {self.id} {self.operation} {self.state}>"


async def build_async_client(
    address: str = "tcp://localhost:5555",
    timeout: int = 5000,
    resources: Any = None,
    client_id: str | None = None,
    connect_kwargs: dict | None = None,
    **options: Any,
) -> AsyncDeviceClient:
    """Connect an AsyncDeviceClient (same arguments as build_client)."""
    client = AsyncDeviceClient(address, timeout, resources, client_id, connect_kwargs, **options)
    return await client.connect()
