"""The discovery service: the registry behind a ZeroMQ API, a change feed, HTTP, and a beacon.

ZeroMQ API (ROUTER, native reply style: `{"status": "ok", "result": ...}` or
`{"status": "error", "error": msg, "type": T}`, echoing the request's `id`):

    register    {"record": {name, address, instance, kind, metrics_url, host, labels, resources,
                 protocols, version, started}}       -> {name, instance, ttl_s, heartbeat_s}
    heartbeat   {"name", "instance"} or {"records": [{"name", "instance"}, ...]}
                                                     -> {ttl_s, unknown: [names to register]}
    deregister  same fields as heartbeat             -> {removed: [names]}
    lookup      {"name"}                             -> the record (+ registered_for_s,
                                                        last_seen_s, expires_in_s)
    list        {"name": glob, "kind", "host", "labels": {k: v}} (all optional) -> [records]
    watch       {}                                   -> {pub, seq, devices}: subscribe to `pub`
                                                        first, then apply events with seq > seq
    ping        {}                                   -> {pong, service, instance, devices, ...}

Errors: NameTakenError (with `holder`), UnknownDeviceError (with `close` names), ValueError (a
malformed record), ProtocolError (a malformed request; the service carries on).

Change feed (PUB, two frames: topic, JSON): topic `device:NAME` carries
`{"event": "added"|"updated"|"removed", "reason", "seq", "name", "record", "service"}`; topic
`hello` carries `{"event": "hello", "seq", "service", "devices"}` every second, so a watcher
notices a restarted service (a new `service` id) or missed events (a gap in `seq`).

HTTP (stdlib ThreadingHTTPServer): GET /targets (Prometheus http_sd), /devices (JSON, same
filters as `list` as query parameters, `label=key=value` repeatable), /health, /metrics.

Logging: every line a peer can cause (malformed requests, refused registrations, dropped
replies, HTTP failures, registrations and expiries) goes through one LogBudget per service: at
most `log_burst` lines per cause per `log_interval_s`, then one summary line with the count of
the rest. The changes of one batch (e.g. every record expiring after a network cut) are logged
as one line per kind naming the first few records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import zmq

from labmesh import access, logbudget, metrics
from labmesh.discovery.beacon import BeaconAnnouncer, BeaconSettings, encode_announcement
from labmesh.discovery.registry import (
    DEFAULT_TTL_S,
    Change,
    DeviceRecord,
    InvalidRecordError,
    NameTakenError,
    Registry,
    UnknownDeviceError,
)
from labmesh.protocol import native
from labmesh.protocol.errors import InternalError, LabmeshError, ProtocolError
from labmesh.security import ServerSecurity, authenticate, stop_authenticating
from labmesh.transport import bound_address, pub_socket, router_socket

log = logging.getLogger("labmesh.discovery")

DEFAULT_ADDRESS = "tcp://*:5550"
DEFAULT_PUB_ADDRESS = "tcp://*:5551"
DEFAULT_HTTP_PORT = 5552
#: Discovery messages are small; a record's resource tree is the largest part.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
SERVICE_NAME = "labmesh-discovery"
REQUEST_TYPES = frozenset(
    {"register", "heartbeat", "deregister", "lookup", "list", "watch", "ping"}
)
#: Seconds between `hello` events on the change feed.
HELLO_INTERVAL_S = 1.0
#: Records named in a log line about a batch of changes (the rest are counted).
NAMED_IN_BATCH_LINE = 5
#: Longest peer-caused text (an error message quoting the request) copied into a log line.
MAX_LOGGED_TEXT = 300
_NOBLOCK = int(zmq.NOBLOCK)
_SCALARS = (str, int, float, bool, type(None))
_LABEL_NAME_JUNK = re.compile(r"[^A-Za-z0-9_]")
# labeled metric children resolved once: labels() costs microseconds on every request
_REQUESTS = {
    (t, s): metrics.DISCOVERY_REQUESTS.labels(t, s)
    for t in metrics.DISCOVERY_REQUEST_TYPES
    for s in ("ok", "error")
}
_HEARTBEATS_KNOWN = metrics.DISCOVERY_HEARTBEATS.labels("known")
_HEARTBEATS_UNKNOWN = metrics.DISCOVERY_HEARTBEATS.labels("unknown")
_LOOKUPS_FOUND = metrics.DISCOVERY_LOOKUPS.labels("found")
_LOOKUPS_UNKNOWN = metrics.DISCOVERY_LOOKUPS.labels("unknown")


class DiscoveryService:
    """Knows where every device of the lab is served; answers over ZeroMQ and HTTP.

    Parameters:
        address: the ZeroMQ API endpoint (ROUTER), e.g. `tcp://*:5550` or `tcp://127.0.0.1:0`.
        pub_address: the change feed endpoint (PUB).
        http_host: the interface HTTP listens on.
        http_port: the HTTP port (0: chosen by the system; None: no HTTP).
        ttl_s: seconds a registration lives without a heartbeat.
        beacon: announce this service by UDP multicast with these settings (None: silent).
        max_message_bytes: largest accepted request.
        clock: monotonic seconds (injected in tests).
        log_burst: log lines a peer can cause per cause ("malformed request", "record
            expired", ...) per `log_interval_s`; the rest are counted in one summary line.
        log_interval_s: the interval of `log_burst`.
        security: serve the API and the change feed with CurveZMQ (labmesh.security.
            ServerSecurity): only known keys connect; `roles` decide who registers (operator;
            default: every known key) and who only looks up (observer); a record belongs to
            the key that registered it. None: plaintext, records owned by their instance id.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        pub_address: str = DEFAULT_PUB_ADDRESS,
        *,
        http_host: str = "0.0.0.0",
        http_port: int | None = DEFAULT_HTTP_PORT,
        ttl_s: float = DEFAULT_TTL_S,
        beacon: BeaconSettings | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
        log_burst: int = logbudget.DEFAULT_BURST,
        log_interval_s: float = logbudget.DEFAULT_INTERVAL_S,
        security: ServerSecurity | None = None,
    ) -> None:
        metrics.enable_discovery_metrics()
        self.security = security
        self._access: access.AccessPolicy | None = None
        #: the discovery service's public key (Z85 text) when it runs with CurveZMQ
        self.server_key: str | None = None
        self._owner: str | None = None  # the key of the request being handled
        self._registry = Registry(ttl_s)  # touched only under self._lock
        self.ttl_s = self._registry.ttl_s
        self.instance = secrets.token_hex(6)
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self._lock = threading.Lock()
        # peer-caused log lines: used by the API thread and the HTTP threads
        self._log_budget = logbudget.LogBudget(log_burst, log_interval_s)
        self._log_budget_lock = threading.Lock()
        self._tick_s = max(0.01, min(0.5, self.ttl_s / 10))
        self._ctx = zmq.Context(io_threads=1)
        self._router: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._httpd: ThreadingHTTPServer | None = None
        curve = None
        if security is not None:
            curve = security.pair
            self.server_key = curve.public.decode()
            self._access = access.AccessPolicy(
                security.roles or {"*": "operator"}, "none", security.keyring.name_of
            )
            authenticate(
                self._ctx,
                {_DOMAIN: self._access.may_connect, _PUB_DOMAIN: self._access.may_connect},
            )
        try:
            self._router = router_socket(
                self._ctx, address, max_message_bytes, curve=curve, domain=_DOMAIN
            )
            self._pub = pub_socket(self._ctx, pub_address, curve=curve, domain=_PUB_DOMAIN)
            if http_port is not None:
                self._httpd = _http_server(self, http_host, http_port)
        except BaseException:
            self._close_zmq()
            raise
        self.address = bound_address(self._router)
        self.pub_address = bound_address(self._pub)
        self.http_url = (
            f"http://{_url_host(http_host)}:{self._httpd.server_address[1]}"
            if self._httpd is not None
            else None
        )
        self._beacon = (
            BeaconAnnouncer(
                encode_announcement(
                    [self.address], instance=self.instance, pub=self.pub_address, http=self.http_url
                ),
                beacon,
            )
            if beacon is not None
            else None
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0
        self._next_hello = 0.0
        self._handlers: dict[str, Callable[[dict[str, Any], float], Any]] = {
            "register": self._on_register,
            "heartbeat": self._on_heartbeat,
            "deregister": self._on_deregister,
            "lookup": self._on_lookup,
            "list": self._on_list,
            "watch": self._on_watch,
            "ping": self._on_ping,
        }

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> DiscoveryService:
        """Serve the API, the change feed, HTTP and the beacon from background threads."""
        if self._threads:
            return self
        self._started_at = self.clock()
        self._threads.append(threading.Thread(target=self._run, name="discovery:api", daemon=True))
        if self._httpd is not None:
            self._threads.append(
                threading.Thread(
                    target=self._httpd.serve_forever,
                    kwargs={"poll_interval": 0.1},
                    name="discovery:http",
                    daemon=True,
                )
            )
        for thread in self._threads:
            thread.start()
        if self._beacon is not None:
            self._beacon.start()
        log.info(
            "discovery: API on %s, changes on %s, HTTP %s, TTL %.1f s",
            self.address,
            self.pub_address,
            self.http_url or "off",
            self.ttl_s,
        )
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every thread and release every port (bounded by about `timeout`)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")
        deadline = time.monotonic() + timeout
        if self._beacon is not None:
            self._beacon.stop(timeout / 2)
        if self._httpd is not None and self._threads:
            self._httpd.shutdown()  # returns once serve_forever has left its loop
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not self._threads:
            self._close_zmq()  # never started: the API loop did not take the sockets
        if self._httpd is not None:
            self._httpd.server_close()
        self._wake_r.close()
        self._wake_w.close()
        log.info("discovery: stopped")

    def __enter__(self) -> DiscoveryService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def http_port(self) -> int | None:
        return self._httpd.server_address[1] if self._httpd is not None else None

    @property
    def healthy(self) -> bool:
        """Every service thread is running."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _close_zmq(self) -> None:
        if self._access is not None:
            stop_authenticating(self._ctx, (_DOMAIN, _PUB_DOMAIN))
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        self._router = self._pub = None
        self._ctx.term()

    # ---- the API loop (owns both ZeroMQ sockets) ------------------------------------------
    def _run(self) -> None:
        router = self._router
        assert router is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                now = self.clock()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + self._tick_s
                timeout_ms = max(0, int((next_tick - self.clock()) * 1000) + 1)
                try:
                    events = dict(poller.poll(timeout_ms))
                except zmq.ZMQError as exc:
                    log.error("discovery: poll failed: %s", exc)
                    continue
                if router in events:
                    secured = self._access is not None
                    for _ in range(256):
                        try:
                            if secured:
                                parts = router.recv_multipart(_NOBLOCK, copy=False)
                                self._owner = parts[0].get("User-Id")
                                frames = [part.bytes for part in parts]
                            else:
                                frames = router.recv_multipart(_NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                    self._publish()
        finally:
            self._close_zmq()

    def _tick(self, now: float) -> None:
        with self._lock:
            expired = self._registry.expire(now)
            count = self._registry.count(now)
            seq = self._registry.seq
        if expired:
            metrics.DISCOVERY_EXPIRIES.inc(len(expired))
        metrics.DISCOVERY_REGISTERED_DEVICES.set(count)
        self._publish()
        self._log_summaries(now)
        if now >= self._next_hello:
            self._next_hello = now + HELLO_INTERVAL_S
            hello = {"event": "hello", "seq": seq, "service": self.instance, "devices": count}
            self._send_event(b"hello", hello)

    def _publish(self) -> None:
        # size() is O(1): a full live count after every batch made mass registration (every
        # server after a discovery restart) quadratic; _tick sets the exact count
        with self._lock:
            changes = self._registry.drain_changes()
            if not changes:
                return
            count = self._registry.size()
        metrics.DISCOVERY_REGISTERED_DEVICES.set(count)
        self._log_changes(changes)
        for change in changes:
            event = {**change.to_dict(), "service": self.instance}
            self._send_event(b"device:" + change.record.name.encode(), event)

    def _send_event(self, topic: bytes, event: dict[str, Any]) -> None:
        assert self._pub is not None
        try:
            self._pub.send_multipart([topic, native.encode(event)], _NOBLOCK)
        except zmq.ZMQError as exc:  # PUB drops on its own when full; this is a real fault
            if self._may_log(logging.WARNING, "publish failed"):
                log.warning("discovery: change event %s not published: %s", _clip(topic), exc)

    def _handle(self, frames: list[bytes]) -> None:
        parts = native.split_frames(frames)
        request: native.Request | None = None
        status = "error"
        try:
            request = _parse_request(native.decode_body(parts, self.max_message_bytes))
            if self._access is not None:
                who = self._access.principal(self._owner)
                need = access.OPERATOR if request.type in _REGISTRAR_TYPES else access.OBSERVER
                if who.rank < need:  # counted with the errors: requests_total{status="error"}
                    access.check(who, need, "discovery", request.type)
            result = self._handlers[request.type](request.fields, self.clock())
            reply = native.ok_reply(result, request)
            status = "ok"
        except ProtocolError as exc:
            if self._may_log(logging.WARNING, "malformed request"):
                log.warning(
                    "discovery: malformed request from %s: %s",
                    _clip(native.client_id_of(parts.identity)),
                    _clip(str(exc)),
                )
            rid, has_id = _id_of(request, exc)
            reply = native.error_reply(str(exc), exc.wire_type, rid, has_id)
        except LabmeshError as exc:
            rid, has_id = _id_of(request, exc)
            reply = native.error_reply(str(exc), exc.wire_type, rid, has_id, **_details(exc))
        except Exception as exc:  # a bug of ours must cost one request, never the service
            if self._may_log(logging.ERROR, "internal error"):
                log.exception("discovery: failed to handle a request")
            rid, has_id = _id_of(request, None)
            reply = native.error_reply(
                f"internal error: {exc!r}", InternalError.wire_type, rid, has_id
            )
        _REQUESTS[request.type if request else "invalid", status].inc()
        self._send(parts.route, reply)

    def _send(self, route: list[bytes], reply: dict[str, Any]) -> None:
        assert self._router is not None
        try:
            self._router.send_multipart([*route, native.encode_reply(reply)], _NOBLOCK)
        except zmq.ZMQError as exc:
            if self._may_log(logging.INFO, "reply dropped"):
                log.info("discovery: reply to %r dropped: client gone (%s)", route[0], exc)

    # ---- peer-caused log lines, within the budget -------------------------------------------
    def _may_log(self, level: int, cause: str) -> bool:
        """Whether a line of `cause` (a fixed string, never peer text) may be written now."""
        if not log.isEnabledFor(level):
            return False
        with self._log_budget_lock:
            return self._log_budget.allow(cause, self.clock())

    def _log_summaries(self, now: float) -> None:
        with self._log_budget_lock:
            due = self._log_budget.summaries_by_cause(now)
        for cause, line in due:
            log.log(_CAUSE_LEVELS.get(cause, logging.WARNING), "discovery: %s", line)

    def _log_changes(self, changes: list[Change]) -> None:
        """One line per kind of change in this batch (e.g. every record that expired)."""
        groups: dict[str, list[DeviceRecord]] = {}
        for change in changes:
            groups.setdefault(_change_cause(change), []).append(change.record)
        for cause, records in groups.items():
            level = _CAUSE_LEVELS[cause]
            if self._may_log(level, cause):
                log.log(level, "discovery: %s", _change_line(cause, records))

    # ---- request handlers: (fields, now) -> result ----------------------------------------
    def _on_register(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        record = DeviceRecord.from_dict(fields.get("record"))
        if self._access is not None:
            record.owner = self._owner
            if record.server_key is not None and record.server_key != self._owner:
                raise InvalidRecordError(
                    f"record {record.name!r}: its server_key must be the key it is registered "
                    "with (the host's own key), so clients can trust what discovery hands out"
                )
        try:
            with self._lock:
                self._registry.register(record, now)
        except NameTakenError as exc:
            if self._may_log(logging.WARNING, "registration refused"):
                log.warning("discovery: refused %s: %s", _clip(record.describe()), _clip(str(exc)))
            raise
        return {
            "name": record.name,
            "instance": record.instance,
            "ttl_s": self.ttl_s,
            "heartbeat_s": self.ttl_s / 3,
        }

    def _on_heartbeat(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        pairs = _name_instance_pairs(fields, "heartbeat")
        with self._lock:
            owner = self._owner if self._access is not None else None
            unknown = [n for n, i in pairs if not self._registry.heartbeat(n, i, now, owner)]
        _HEARTBEATS_KNOWN.inc(len(pairs) - len(unknown))
        if unknown:
            _HEARTBEATS_UNKNOWN.inc(len(unknown))
        return {"ttl_s": self.ttl_s, "unknown": unknown}

    def _on_deregister(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        pairs = _name_instance_pairs(fields, "deregister")
        with self._lock:
            owner = self._owner if self._access is not None else None
            removed = [
                n for n, i in pairs if self._registry.deregister(n, i, now, owner) is not None
            ]
        return {"removed": removed}

    def _on_lookup(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        name = fields.get("name")
        if not isinstance(name, str):
            raise ProtocolError("lookup needs a string 'name' (the device name)")
        with self._lock:
            try:
                self._registry.lookup(name, now)
            except UnknownDeviceError:
                _LOOKUPS_UNKNOWN.inc()
                raise
            entry = self._registry.get(name, now)
            assert entry is not None
            view = entry.view(now)
        _LOOKUPS_FOUND.inc()
        return view

    def _on_list(self, fields: dict[str, Any], now: float) -> list[dict[str, Any]]:
        return self.devices(now=now, **_filters(fields))

    def _on_watch(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        with self._lock:
            seq = self._registry.seq
            devices = [e.view(now) for e in self._registry.query(now)]
        return {"pub": self.pub_address, "seq": seq, "service": self.instance, "devices": devices}

    def _on_ping(self, fields: dict[str, Any], now: float) -> dict[str, Any]:
        return {"pong": True, **self.health(now)}

    # ---- views shared by the API and HTTP -------------------------------------------------
    def devices(
        self,
        *,
        now: float | None = None,
        name: str | None = None,
        kind: str | None = None,
        host: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Live records matching the filters (see Registry.query), with TTL bookkeeping."""
        now = self.clock() if now is None else now
        with self._lock:
            entries = self._registry.query(now, name=name, kind=kind, host=host, labels=labels)
            return [e.view(now) for e in entries]

    def health(self, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        with self._lock:
            count = self._registry.count(now)
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "service": SERVICE_NAME,
            "instance": self.instance,
            "uptime_s": round(now - self._started_at, 3),
            "devices": count,
            "ttl_s": self.ttl_s,
            "address": self.address,
            "pub": self.pub_address,
            "http": self.http_url,
        }

    def targets(self, now: float | None = None) -> list[dict[str, Any]]:
        """Prometheus http_sd target groups: one per distinct metrics endpoint.

        Labels: `labmesh_host`, `labmesh_kinds` and `labmesh_devices` (comma-separated, sorted),
        `labmesh_label_<key>` for each record label shared by every device of that endpoint, and
        `__metrics_path__` / `__scheme__` when they are not /metrics and http. None of these
        collide with labmesh metric labels (which Prometheus would rename `exported_*`).
        """
        now = self.clock() if now is None else now
        with self._lock:
            records = [e.record for e in self._registry.query(now)]
        groups: dict[tuple[str, str, str], list[DeviceRecord]] = {}
        for record in records:
            if record.metrics_url:
                url = urlsplit(record.metrics_url)
                key = (url.scheme, url.netloc, url.path or "/metrics")
                groups.setdefault(key, []).append(record)
        out = []
        for (scheme, netloc, path), group in sorted(groups.items()):
            labels = {
                "labmesh_host": _joined(r.host for r in group),
                "labmesh_kinds": _joined(r.kind for r in group),
                "labmesh_devices": _joined(r.name for r in group),
            }
            first = group[0].labels
            for key, value in sorted(first.items()):
                if all(r.labels.get(key) == value for r in group):
                    labels[f"labmesh_label_{_LABEL_NAME_JUNK.sub('_', key)}"] = value
            if path != "/metrics":
                labels["__metrics_path__"] = path
            if scheme != "http":
                labels["__scheme__"] = scheme
            out.append({"targets": [netloc], "labels": {k: v for k, v in labels.items() if v}})
        return out


# ---- request parsing (pure helpers) ---------------------------------------------------------
def _parse_request(obj: dict[str, Any]) -> native.Request:
    has_id = "id" in obj
    rid = obj.get("id")
    if has_id and not isinstance(rid, _SCALARS):
        raise ProtocolError("id must be a JSON scalar (string, number, boolean or null)")
    rtype = obj.get("type")
    if rtype not in REQUEST_TYPES:
        raise ProtocolError(
            f"unknown discovery request type {rtype!r}; expected one of {sorted(REQUEST_TYPES)}",
            request_id=rid,
            has_id=has_id,
        )
    return native.Request(rtype, obj, rid, has_id)


def _id_of(request: native.Request | None, exc: LabmeshError | None) -> tuple[Any, bool]:
    if request is not None:
        return request.id, request.has_id
    if exc is not None:
        return exc.details.get("request_id"), bool(exc.details.get("has_id", False))
    return None, False


def _details(exc: LabmeshError) -> dict[str, Any]:
    return {
        k: v
        for k, v in exc.details.items()
        if k not in ("status", "error", "type", "id", "request_id", "has_id")
    }


def _name_instance_pairs(fields: dict[str, Any], rtype: str) -> list[tuple[str, str]]:
    """[(name, instance)] from `{"name", "instance"}` or `{"records": [{...}, ...]}`."""
    items = fields.get("records") if "records" in fields else [fields]
    if not isinstance(items, list):
        raise ProtocolError(f"{rtype} 'records' must be a list of {{name, instance}} objects")
    pairs = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        instance = item.get("instance") if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(instance, str):
            raise ProtocolError(
                f"{rtype} needs string 'name' and 'instance' (or 'records': "
                "[{name, instance}, ...]), as the register reply confirmed them"
            )
        pairs.append((name, instance))
    return pairs


def _filters(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("name", "kind", "host"):
        value = fields.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ProtocolError(f"list filter {key!r} must be a string, got {value!r}")
            out[key] = value
    labels = fields.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ProtocolError(f"list filter 'labels' must map strings to strings: {labels!r}")
        out["labels"] = labels
    return out


def _joined(values: Any) -> str:
    return ",".join(sorted({v for v in values if v}))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


#: The level of each cause of a peer-caused log line (its summary line is written at it too).
#: Requests only an operator key may send to a secured discovery service.
_REGISTRAR_TYPES = frozenset({"register", "heartbeat", "deregister"})
_DOMAIN = "labmesh/discovery"
_PUB_DOMAIN = "labmesh-pub/discovery"

_CAUSE_LEVELS = {
    "malformed request": logging.WARNING,
    "registration refused": logging.WARNING,
    "reply dropped": logging.INFO,
    "publish failed": logging.WARNING,
    "internal error": logging.ERROR,
    "HTTP request failed": logging.WARNING,
    "HTTP internal error": logging.ERROR,
    "registered": logging.INFO,
    "updated": logging.INFO,
    "record expired": logging.WARNING,
    "deregistered": logging.INFO,
    "removed": logging.INFO,
}
#: Per cause of a change: (what one record did, what several did).
_CHANGE_WORDS = {
    "registered": ("registered {}", "registered {n} records: {}"),
    "updated": ("updated {}", "updated {n} records: {}"),
    "record expired": (
        "{} stopped heartbeating; removed",
        "{n} records stopped heartbeating and were removed: {}",
    ),
    "deregistered": ("{} deregistered", "{n} records deregistered: {}"),
    "removed": ("{} removed", "{n} records removed: {}"),
}


def _change_cause(change: Change) -> str:
    if change.event == "added":
        return "registered"
    if change.event == "updated":
        return "updated"
    if change.reason == "expired":
        return "record expired"
    return "deregistered" if change.reason == "deregistered" else "removed"


def _change_line(cause: str, records: list[DeviceRecord]) -> str:
    """`registered pm100-a at tcp://...`, or `registered 40 records: a, b, ... (+35 more)`."""
    one, several = _CHANGE_WORDS[cause]
    if len(records) == 1:
        return one.format(_clip(records[0].describe()))
    names = ", ".join(r.name for r in records[:NAMED_IN_BATCH_LINE])
    if len(records) > NAMED_IN_BATCH_LINE:
        names += f", ... (+{len(records) - NAMED_IN_BATCH_LINE} more)"
    return several.format(names, n=len(records))


def _clip(text: Any) -> str:
    """Peer-chosen text (identities, error messages quoting a request) cut for a log line."""
    text = text if isinstance(text, str) else repr(text)
    if len(text) <= MAX_LOGGED_TEXT:
        return text
    return f"{text[:MAX_LOGGED_TEXT]}... ({len(text) - MAX_LOGGED_TEXT} more characters)"


# ---- HTTP -----------------------------------------------------------------------------------
def _http_server(service: DiscoveryService, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("DiscoveryHttpHandler", (_HttpHandler,), {"service": service})
    try:
        httpd = _QuietHTTPServer((host, port), handler)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"discovery: cannot serve HTTP on {host}:{port}: {exc.strerror} (another "
            "service on that port? choose another http port)",
        ) from None
    httpd.service = service
    return httpd


class _QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    service: DiscoveryService

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.service._may_log(logging.WARNING, "HTTP request failed"):
            log.warning("discovery: HTTP request from %s failed", client_address, exc_info=True)


_HTTP_PATHS = ("/targets", "/devices", "/health", "/metrics")


class _HttpHandler(BaseHTTPRequestHandler):
    service: DiscoveryService
    server_version = SERVICE_NAME  # HTTP/1.0: one request per connection, none outlives stop()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        route = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        try:
            if route == "/targets":
                self._json(HTTPStatus.OK, self.service.targets())
            elif route == "/devices":
                self._json(HTTPStatus.OK, self.service.devices(**_query_filters(query)))
            elif route == "/health":
                health = self.service.health()
                ok = health["status"] == "ok"
                self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, health)
            elif route == "/metrics":
                self._send(HTTPStatus.OK, metrics.EXPOSITION_CONTENT_TYPE, metrics.exposition())
            elif route == "/":
                self._json(
                    HTTPStatus.OK,
                    {"service": SERVICE_NAME, "paths": list(_HTTP_PATHS)},
                )
            else:
                self._json(
                    HTTPStatus.NOT_FOUND,
                    {"error": f"no such path {url.path!r}; try {', '.join(_HTTP_PATHS)}"},
                )
        except ProtocolError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:
            if self.service._may_log(logging.ERROR, "HTTP internal error"):
                log.exception("discovery: HTTP %s failed", _clip(self.path))
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc!r}"})

    def _json(self, status: HTTPStatus, body: Any) -> None:
        self._send(status, "application/json", json.dumps(body, indent=1).encode() + b"\n")

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("discovery: HTTP %s - %s", self.address_string(), format % args)


def _query_filters(query: dict[str, list[str]]) -> dict[str, Any]:
    """/devices?kind=daq&host=pc-3&name=pm*&label=room=b12 -> list filters."""
    filters: dict[str, Any] = {k: query[k][-1] for k in ("name", "kind", "host") if k in query}
    labels = {}
    for item in query.get("label", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ProtocolError(f"label filter {item!r} must be key=value")
        labels[key] = value
    if labels:
        filters["labels"] = labels
    return filters
