"""Prometheus metrics of real servers: what traffic, errors, budgets and locks produce."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labmesh import RemoteError, build_client, metrics

from support import MemoryDaq, MemoryMeter, serve, unavailable, wait_until

pytestmark = pytest.mark.integration


def samples(name: str, **labels: str) -> list:
    text = metrics.exposition().decode()
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append(sample)
    return found


def value(name: str, **labels: str) -> float:
    return sum(s.value for s in samples(name, **labels))


def test_request_latency_errors_and_budgets_are_counted():
    srv = serve(MemoryMeter("m-metrics"))
    try:
        with build_client(srv.address, timeout=3000) as c:
            for _ in range(5):
                c.query("WAVELENGTH")
            c.write("WAVELENGTH", 800)
            with pytest.raises(ValueError):
                c.write("WAVELENGTH", 5000)
            with pytest.raises(KeyError):
                c.query("NOPE")
            with pytest.raises(TimeoutError):
                c.sleep(0.5, timeout=0.1)
            c.ping()
        d = "m-metrics"
        assert (
            value(
                "labmesh_request_duration_seconds_count",
                device=d,
                type="query",
                operation="WAVELENGTH",
                status="ok",
            )
            == 5
        )
        assert (
            value(
                "labmesh_request_duration_seconds_count",
                device=d,
                type="write",
                operation="WAVELENGTH",
                status="error",
            )
            == 1
        )
        # an undeclared name never becomes a label value of its own
        assert (
            value(
                "labmesh_request_duration_seconds_count",
                device=d,
                type="query",
                operation="(undeclared)",
                status="error",
            )
            == 1
        )
        assert not samples("labmesh_request_duration_seconds_count", operation="NOPE")
        assert (
            value(
                "labmesh_request_duration_seconds_count",
                device=d,
                type="call",
                operation="sleep",
                status="timeout",
            )
            == 1
        )
        assert (
            value(
                "labmesh_budget_expiries_total", device=d, operation="sleep", still_running="true"
            )
            == 1
        )
        assert (
            value("labmesh_request_errors_total", device=d, type="write", error="ValueError") == 1
        )
        assert (
            value("labmesh_request_duration_seconds_count", device=d, type="ping", status="ok") == 1
        )
        # the fastest bucket is 50 us: local queries land in the low buckets, not all in one
        buckets = samples(
            "labmesh_request_duration_seconds_bucket", device=d, type="query", status="ok"
        )
        assert min(float(b.labels["le"]) for b in buckets) == 0.00005
        assert value("labmesh_device_up", device=d) == 1.0
        assert samples("labmesh_server_info", device=d)[0].labels["kind"] == "powermeter"
    finally:
        srv.stop()
    assert not samples("labmesh_device_up", device="m-metrics")  # gone with the server


def test_lock_holders_busy_queue_and_lease_expiry():
    srv = serve(MemoryDaq("daq-metrics"))
    d = "daq-metrics"
    try:
        holder = build_client(
            srv.address,
            resources="Dev1/port0/line0",
            lease_s=0.5,
            connect_kwargs={"name": "pump-probe"},
        )
        rows = samples("labmesh_lock_held_since_seconds", device=d)
        assert [
            (r.labels["resource"], r.labels["holder"], r.labels["holder_name"]) for r in rows
        ] == [("Dev1/port0/line0", holder.client_id, "pump-probe")]
        assert abs(rows[0].value - time.time()) < 5
        with build_client(srv.address) as other:
            t = threading.Thread(target=other.hold, args=(0.6,))
            t.start()
            assert wait_until(lambda: value("labmesh_device_busy", device=d) == 1.0)
            t.join(5)
        holder._closing.set()  # stop its heartbeats: the lease runs out
        assert wait_until(
            lambda: not samples("labmesh_lock_held_since_seconds", device=d), timeout=3
        )
        assert value("labmesh_lease_expiries_total", device=d) == 1
        holder.close()
    finally:
        srv.stop()


def test_lock_wait_is_measured():
    srv = serve(MemoryDaq("daq-wait"))
    try:
        a = build_client(srv.address, resources="Dev1/port1")
        threading.Timer(0.3, a.close).start()
        with build_client(srv.address, resources="Dev1/port1", wait_s=3):
            pass
        assert value("labmesh_lock_wait_seconds_count", device="daq-wait", outcome="granted") == 1
        assert value("labmesh_lock_wait_seconds_sum", device="daq-wait") >= 0.25
        with pytest.raises(RemoteError):
            holder = build_client(srv.address, resources="Dev1/port1")
            try:
                build_client(srv.address, resources="Dev1/port1", wait_s=0.2)
            finally:
                holder.close()
        assert value("labmesh_lock_wait_seconds_count", device="daq-wait", outcome="timeout") == 1
    finally:
        srv.stop()


def test_promtool_accepts_the_exposition():
    if shutil.which("promtool") is None:
        unavailable("promtool not installed (apt-get install prometheus)")
    srv = serve(MemoryDaq("daq-promtool"))
    try:
        with build_client(srv.address, resources="Dev1/port0") as c:
            c.write_line("Dev1/port0/line0", True)
            c.query("AO0")
        text = metrics.exposition()
    finally:
        srv.stop()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
