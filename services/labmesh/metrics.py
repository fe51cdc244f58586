"""Every labmesh Prometheus metric, declared once, with its labels and its unit in its name.

All metrics live on `REGISTRY`, a module-level CollectorRegistry of labmesh's own (not
prometheus_client's default registry), together with the standard process, platform and GC
collectors. A labmesh process exposes exactly `REGISTRY` (see `exposition()`), and an application
that imports labmesh keeps its own default registry free of labmesh names.

Metrics are process-wide: two discovery services in one process (tests) share them.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
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
    registry=REGISTRY,
)
DISCOVERY_HEARTBEATS = Counter(
    "labmesh_discovery_heartbeats_total",
    "Device heartbeats received, by whether the device was known (unknown: it must register).",
    ["result"],
    registry=REGISTRY,
)
DISCOVERY_EXPIRIES = Counter(
    "labmesh_discovery_expiries_total",
    "Registrations removed because their server stopped heartbeating.",
    registry=REGISTRY,
)
DISCOVERY_LOOKUPS = Counter(
    "labmesh_discovery_lookups_total",
    "Device lookups by name, by result (found or unknown).",
    ["result"],
    registry=REGISTRY,
)
DISCOVERY_REQUESTS = Counter(
    "labmesh_discovery_requests_total",
    "Discovery API requests, by request type and reply status (ok or error).",
    ["type", "status"],
    registry=REGISTRY,
)

# every label value exists from the start, so rates and dashboards see zeros, not gaps
for _result in ("known", "unknown"):
    DISCOVERY_HEARTBEATS.labels(_result)
for _result in ("found", "unknown"):
    DISCOVERY_LOOKUPS.labels(_result)
for _type in DISCOVERY_REQUEST_TYPES:
    for _status in ("ok", "error"):
        DISCOVERY_REQUESTS.labels(_type, _status)


def exposition() -> bytes:
    """The text exposition of every labmesh metric (serve with EXPOSITION_CONTENT_TYPE)."""
    return generate_latest(REGISTRY)
