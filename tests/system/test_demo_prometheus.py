"""`labmesh demo --prometheus` (README): the demo also starts Prometheus on 127.0.0.1 with the
shipped scrape config and alert rules, Prometheus scrapes every demo host and discovery itself,
and Ctrl+C stops all of it (issue 20, "Untested promises")."""

from __future__ import annotations

import shutil
import signal
import socket
import time
import urllib.parse
from typing import Any

import pytest

from support import http_json, running_demo, unavailable, wait_for

pytestmark = pytest.mark.system

#: Where the demo's Prometheus listens (fixed by `labmesh demo`).
PROMETHEUS = "http://127.0.0.1:9090"
#: Prometheus starts, asks discovery for targets, and scrapes every 5 s: generous on a loaded
#: 2-core machine.
SCRAPED_WITHIN_S = 90.0


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _api(path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    body = http_json(f"{PROMETHEUS}/api/v1/{path}{query}")
    assert body["status"] == "success", body
    return body["data"]


def test_demo_with_prometheus_scrapes_every_host_and_stops_on_ctrl_c() -> None:
    if shutil.which("prometheus") is None:
        unavailable("prometheus is not installed (install: apt-get install -y prometheus)")
    if _port_in_use(9090):
        unavailable("127.0.0.1:9090 is taken; `labmesh demo --prometheus` runs Prometheus there")
    with running_demo("--prometheus", ready_within_s=60) as demo:
        assert f"  prometheus    {PROMETHEUS}" in demo["banner"], demo["banner"]

        def all_up() -> list[dict[str, Any]] | None:
            series = _api("query", query="up")["result"]
            jobs = sorted(s["metric"]["job"] for s in series if s["value"][1] == "1")
            return series if jobs == ["labmesh", "labmesh", "labmesh-discovery"] else None

        series = wait_for("every demo target up==1", all_up, SCRAPED_WITHIN_S, 1.0)
        hosts = {s["metric"].get("labmesh_host") for s in series if s["metric"]["job"] == "labmesh"}
        assert hosts == {"optics-pc", "daq-pc"}
        # every target is on 127.0.0.1, and what is scraped is the demo's own metrics
        assert all(s["metric"]["instance"].startswith("127.0.0.1:") for s in series), series
        devices = {
            s["metric"]["device"] for s in _api("query", query="labmesh_device_up == 1")["result"]
        }
        assert devices == {"pm100-a", "daq-1", "stage"}
        # the shipped config and rules: its job names, and labmesh's alert rules loaded
        config = _api("status/config")["yaml"]
        assert "job_name: labmesh-discovery" in config and "/targets" in config
        groups = _api("rules")["groups"]
        assert groups and all(g["file"].endswith("labmesh.rules.yml") for g in groups), groups

        proc = demo["proc"]
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)  # our own child, by its PID
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 20
        assert "labmesh demo: stopped" in proc.stdout.read()
    # Prometheus went with it (the demo ended it by its PID)
    assert not _port_in_use(9090)
