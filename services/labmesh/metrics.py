"""Every labmesh Prometheus metric, declared once, with its labels and its unit in its name.

All metrics live on `REGISTRY`, a module-level CollectorRegistry of labmesh's own (not
prometheus_client's default registry), together with the standard process, platform and GC
collectors. A labmesh process exposes exactly `REGISTRY` (see `exposition()`), and an application
that imports labmesh keeps its own default registry free of labmesh names.

Metrics are process-wide: two discovery services in one process (tests) share them.
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

#: The Content-Type of `exposition()`.
EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST

# ---- discovery service --------------------------------------------------------------------
# Declared here, registered only by `enable_discovery_metrics()` when a discovery service runs
# in the process: an instrument host must not export discovery series (an alert on
# "no registered devices" would fire on every host).
#: Request types the discovery API counts; anything else is counted as `invalid`.
DISCOVERY_REQUEST_TYPES = (
    "register",
    "heartbeat",
    "deregister",
    "lookup",
    "list",
    "watch",
    "ping",
    "invalid",
)

DISCOVERY_REGISTERED_DEVICES = Gauge(
    "labmesh_discovery_registered_devices",
    "Devices with a live registration in this discovery service.",
    registry=None,
)
DISCOVERY_HEARTBEATS = Counter(
    "labmesh_discovery_heartbeats_total",
    "Device heartbeats received, by whether the device was known (unknown: it must register).",
    ["result"],
    registry=None,
)
DISCOVERY_EXPIRIES = Counter(
    "labmesh_discovery_expiries_total",
    "Registrations removed because their server stopped heartbeating.",
    registry=None,
)
DISCOVERY_LOOKUPS = Counter(
    "labmesh_discovery_lookups_total",
    "Device lookups by name, by result (found or unknown).",
    ["result"],
    registry=None,
)
DISCOVERY_REQUESTS = Counter(
    "labmesh_discovery_requests_total",
    "Discovery API requests, by request type and reply status (ok or error).",
    ["type", "status"],
    registry=None,
)

# every label value exists from the start, so rates and dashboards see zeros, not gaps
for _result in ("known", "unknown"):
    DISCOVERY_HEARTBEATS.labels(_result)
for _result in ("found", "unknown"):
    DISCOVERY_LOOKUPS.labels(_result)
for _type in DISCOVERY_REQUEST_TYPES:
    for _status in ("ok", "error"):
        DISCOVERY_REQUESTS.labels(_type, _status)


# ---- device servers -----------------------------------------------------------------------
#: Request latency ladder from 50 us to 30 s (prometheus_client's default starts at 5 ms, which
#: would put every query of a local instrument into one bucket).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
REQUEST_DURATION = Histogram(
    "labmesh_request_duration_seconds",
    "Time from receiving a request to sending its reply, by device, request type, operation "
    "(parameter or operation name; empty for control requests) and status (ok, error, "
    "timeout).",
    ["device", "type", "operation", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUEST_ERRORS = Counter(
    "labmesh_request_errors_total",
    "Requests answered with an error, by device, request type and error type.",
    ["device", "type", "error"],
    registry=REGISTRY,
)
BUDGET_EXPIRIES = Counter(
    "labmesh_budget_expiries_total",
    "Device calls whose time budget ran out (still_running: the device stayed busy).",
    ["device", "operation", "still_running"],
    registry=REGISTRY,
)
LOCK_WAIT = Histogram(
    "labmesh_lock_wait_seconds",
    "How long a connect waited for busy resources before it was granted or gave up.",
    ["device", "outcome"],
    buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
    registry=REGISTRY,
)
LEASE_EXPIRIES = Counter(
    "labmesh_lease_expiries_total",
    "Lock grants freed because their holder stopped renewing (crashed client, lost network).",
    ["device"],
    registry=REGISTRY,
)
#: The ServerLimits fields whose hits are refusals (the `bound` label's values).
REFUSAL_BOUNDS = (
    "max_queue_per_device",
    "max_queue_per_session",
    "max_queue_bytes",
    "max_sessions",
    "max_waiters",
    "max_connect_paths",
    "max_metadata_bytes",
    "max_streams",
    "max_streams_per_session",
    "max_status_waiters",
)
BOUND_REFUSALS = Counter(
    "labmesh_bound_refusals_total",
    "Requests refused at once because a server bound was reached, by bound (a ServerLimits "
    "field: max_queue_per_device, max_queue_per_session, max_waiters, max_connect_paths, "
    "max_metadata_bytes).",
    ["device", "bound"],
    registry=REGISTRY,
)
REPLIES_DROPPED = Counter(
    "labmesh_replies_dropped_total",
    "Replies that could not be queued to their peer: peer_gone (it disconnected first) or "
    "peer_not_reading (max_replies_queued_per_peer replies already waiting for it).",
    ["device", "reason"],
    registry=REGISTRY,
)
SERVER_INFO = Gauge(
    "labmesh_server_info",
    "Always 1: the labmesh version, protocols and kind of each served device.",
    ["device", "kind", "version", "protocols"],
    registry=REGISTRY,
)


AUDIT_EVENTS = Counter(
    "labmesh_audit_events_total",
    "Audit events (writes, calls, lock grants, releases, expiries and force-releases, refused "
    "permissions) by device, event and outcome (ok, started, denied, error).",
    ["device", "event", "outcome"],
    registry=REGISTRY,
)


class DeviceMetrics:
    """The metrics of one device server, with labelled children cached for the hot path.

    `operation` label values come only from the device's declarations (the server core labels
    anything else `(undeclared)`), so a client cannot grow the series.
    """

    def __init__(self, device: str, budgeted: frozenset[str] = frozenset()) -> None:
        self.device = device
        self._durations: dict[tuple[str, str, str], Any] = {}
        self._audits: dict[tuple[str, str], Any] = {}
        # series that alerts rate() exist from the start, so their first event counts
        LEASE_EXPIRIES.labels(device)
        for reason in ("peer_gone", "peer_not_reading"):
            REPLIES_DROPPED.labels(device, reason)
        for bound in REFUSAL_BOUNDS:
            BOUND_REFUSALS.labels(device, bound)
        for outcome in ("granted", "timeout"):
            LOCK_WAIT.labels(device, outcome)
        for operation in budgeted:
            for still_running in ("true", "false"):
                BUDGET_EXPIRIES.labels(device, operation, still_running)

    def observe(self, rtype: str, operation: str, status: str, seconds: float) -> None:
        key = (rtype, operation, status)
        child = self._durations.get(key)
        if child is None:
            child = REQUEST_DURATION.labels(self.device, rtype, operation, status)
            self._durations[key] = child
        child.observe(seconds)

    def error(self, rtype: str, error_type: str) -> None:
        REQUEST_ERRORS.labels(self.device, rtype, error_type).inc()

    def budget_expired(self, operation: str, still_running: bool) -> None:
        BUDGET_EXPIRIES.labels(self.device, operation, "true" if still_running else "false").inc()

    def lock_waited(self, outcome: str, seconds: float) -> None:
        LOCK_WAIT.labels(self.device, outcome).observe(seconds)

    def lease_expired(self) -> None:
        LEASE_EXPIRIES.labels(self.device).inc()

    def refused(self, bound: str) -> None:
        BOUND_REFUSALS.labels(self.device, bound).inc()

    def reply_dropped(self, reason: str) -> None:
        REPLIES_DROPPED.labels(self.device, reason).inc()

    def audited(self, event: str, outcome: str) -> None:
        if outcome not in ("ok", "started", "denied"):
            outcome = "error"  # the line has the error type; the label stays a small set
        key = (event, outcome)
        child = self._audits.get(key)
        if child is None:
            child = self._audits[key] = AUDIT_EVENTS.labels(self.device, event, outcome)
        child.inc()


class _ServerCollector:
    """Scrape-time gauges read from every live device server in the process: up, busy,
    queue depth, calls in flight, waiters, and one series per held resource."""

    def __init__(self) -> None:
        self._servers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._down: set[str] = set()

    def add(self, server: Any) -> None:
        self._servers.add(server)

    def remove(self, server: Any) -> None:
        self._servers.discard(server)

    def set_down(self, device: str, down: bool) -> None:
        """Report a configured device that is not served (yet) as up=0 (labmesh serve)."""
        if down:
            self._down.add(device)
        else:
            self._down.discard(device)

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "labmesh_device_up",
            "1 while the device is connected and its server healthy.",
            labels=["device"],
        )
        busy = GaugeMetricFamily(
            "labmesh_device_busy", "1 while a call runs on the device.", labels=["device"]
        )
        queue = GaugeMetricFamily(
            "labmesh_executor_queue_depth",
            "Device calls waiting behind the running one.",
            labels=["device"],
        )
        in_flight = GaugeMetricFamily(
            "labmesh_requests_in_flight",
            "Device calls received and not yet answered.",
            labels=["device"],
        )
        waiters = GaugeMetricFamily(
            "labmesh_lock_waiters", "Connects waiting for busy resources.", labels=["device"]
        )
        held = GaugeMetricFamily(
            "labmesh_lock_held_since_seconds",
            "One series per held resource: when (Unix time) its holder got it. The series "
            "disappears when the lock is released or expires.",
            labels=["device", "resource", "holder", "holder_name"],
        )
        values = GaugeMetricFamily(
            "labmesh_parameter_value",
            "The last reading of a parameter exported in the host file (`metrics:`), from the "
            "server's cache: a scrape never reads the device.",
            labels=["device", "parameter", "unit"],
        )
        served = set()
        for server in list(self._servers):
            snapshot = server.metrics_snapshot()
            served.add(snapshot["device"])
            name = snapshot["device"]
            up.add_metric([name], 1.0 if snapshot["up"] else 0.0)
            busy.add_metric([name], 1.0 if snapshot["busy"] else 0.0)
            queue.add_metric([name], snapshot["queue_depth"])
            in_flight.add_metric([name], snapshot["in_flight"])
            waiters.add_metric([name], snapshot["waiters"])
            for row in snapshot["locks"]:
                held.add_metric(
                    [name, row["resource"], row["holder"], row["holder_name"]], row["since"]
                )
            for parameter, unit, value in snapshot.get("values", ()):
                values.add_metric([name, parameter, unit], value)
        for name in sorted(self._down - served):
            up.add_metric([name], 0.0)
        yield from (up, busy, queue, in_flight, waiters, held, values)


SERVERS = _ServerCollector()
REGISTRY.register(SERVERS)


_discovery_enabled = False


def enable_discovery_metrics() -> None:
    """Add the discovery metrics to REGISTRY (once per process)."""
    global _discovery_enabled
    if _discovery_enabled:
        return
    for metric in (
        DISCOVERY_REGISTERED_DEVICES,
        DISCOVERY_HEARTBEATS,
        DISCOVERY_EXPIRIES,
        DISCOVERY_LOOKUPS,
        DISCOVERY_REQUESTS,
    ):
        REGISTRY.register(metric)
    _discovery_enabled = True


def exposition() -> bytes:
    """The text exposition of every labmesh metric (serve with EXPOSITION_CONTENT_TYPE)."""
    return generate_latest(REGISTRY)


def start_http(
    port: int, host: str = "0.0.0.0", ready: Callable[[], dict[str, Any]] | None = None
) -> Any:
    """Serve this process's /metrics, /health and /ready on `host:port` (a daemon thread);
    returns the server.

    /health is liveness: 200 whenever the process answers. /ready is readiness: `ready()`'s
    JSON, 200 when its "ready" is true and 503 when not (a device not served, e.g. its
    instrument unplugged); without `ready`, the same as /health. Every other path is the
    Prometheus exposition, as before. Raises OSError with a clear message when the port is
    taken.
    """
    import json
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    exposition_app = make_wsgi_app(REGISTRY)

    def answer(start_response: Callable, ok: bool, body: dict[str, Any]) -> list[bytes]:
        data = json.dumps(body, indent=1).encode() + b"\n"
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(
            status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
        )
        return [data]

    def app(environ: dict[str, Any], start_response: Callable) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return answer(start_response, True, {"status": "alive"})
        if path == "/ready":
            report = ready() if ready is not None else {"ready": True}
            return answer(start_response, bool(report.get("ready")), report)
        return exposition_app(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """No line per scrape on stderr."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = make_server(host, port, app, Server, handler_class=Quiet)
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror} (another labmesh serve on "
            "this host? set metrics_port in the host file)"
        ) from None
    threading.Thread(target=server.serve_forever, name="labmesh-metrics-http", daemon=True).start()
    return server
