"""Alerts that reach someone: a device goes down, and a webhook on this machine hears of it.

On 127.0.0.1 with free ports, every process stopped by PID:

  labmesh discovery  and  labmesh serve  (host alert-rig: a simulated power meter that works,
                     and a meter whose instrument is unplugged: labmesh_device_up 0)
  Prometheus         (Debian's) running the SHIPPED compose/prometheus/prometheus.yml and rules;
                     substituted: the discovery and Alertmanager addresses, the intervals (1 s),
                     and `for:` of the two device rules (1m -> 2s)
  Alertmanager       (Debian's prometheus-alertmanager) running the SHIPPED
                     compose/alertmanager/alertmanager.yml; substituted: the webhook's address and
                     group_wait / group_interval (1 s)
  a webhook          a small http.server thread recording what Alertmanager posts

The unplugged meter must arrive at the webhook as LabmeshDeviceDown (critical, with its host);
the working meter must not. Then the host is stopped: the working meter arrives as
LabmeshDeviceGone, and LabmeshDeviceDown as resolved. Bounded by DEADLINE_S. Off CI a missing
prometheus or alertmanager binary skips the test; on CI it fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from system_tools import require_tool

from support import free_port, http_json, wait_for

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
PROMETHEUS_DIR = REPO / "compose" / "prometheus"
ALERTMANAGER_CONFIG = REPO / "compose" / "alertmanager" / "alertmanager.yml"
DEADLINE_S = 60
FAST_RULES = ("LabmeshDeviceDown", "LabmeshDeviceGone")
HOST = "alert-rig"


class Processes:
    """Subprocesses with their output in files; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(TESTS)}
        env.pop("LABMESH_DISCOVERY", None)
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_output(self, name: str, marker: str, timeout: float) -> None:
        def seen() -> bool:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited:\n{self.output(name)}")
            return marker in self.output(name)

        wait_for(f"{marker!r} from {name}", seen, timeout, 0.1)

    def stop(self, name: str) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def logs(self) -> str:
        return "\n".join(
            f"---- {name} (exit {p.poll()}) ----\n{self.output(name)[-3000:]}"
            for name, p in self.procs.items()
        )


class Webhook:
    """What Alertmanager posts, one entry per alert: (status, labels) in arrival order."""

    def __init__(self) -> None:
        self.alerts: list[tuple[str, dict[str, str]]] = []
        self.posts = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.posts += 1
                    outer.path = self.path
                    for alert in body["alerts"]:
                        outer.alerts.append((alert["status"], alert["labels"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.path = ""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def received(self, status: str, alertname: str) -> list[dict[str, str]]:
        return [
            labels
            for got, labels in list(self.alerts)
            if got == status and labels.get("alertname") == alertname
        ]


def substitute(text: str, substitutions: list[tuple[str, str]], what: str) -> str:
    for old, new in substitutions:
        assert text.count(old) == 1, f"shipped {what} no longer has {old!r} exactly once"
        text = text.replace(old, new)
    return text


def render_prometheus(dest: Path, discovery_http: str, alertmanager: str) -> Path:
    """compose/prometheus/ copied; prometheus.yml differs only in the addresses and intervals,
    the rules only in `for:` of FAST_RULES."""
    shutil.copytree(PROMETHEUS_DIR, dest)
    shipped = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    text = substitute(
        shipped,
        [
            ("http://labmesh-discovery:5552/targets", f"http://{discovery_http}/targets"),
            ('targets: ["labmesh-discovery:5552"]', f'targets: ["{discovery_http}"]'),
            ('targets: ["labmesh-alertmanager:9093"]', f'targets: ["{alertmanager}"]'),
            ("scrape_interval: 5s", "scrape_interval: 1s"),
            ("evaluation_interval: 5s", "evaluation_interval: 1s"),
            ("refresh_interval: 10s", "refresh_interval: 1s"),
        ],
        "prometheus.yml",
    )
    expected = yaml.safe_load(shipped)  # the same changes, made on the structure
    expected["global"].update(scrape_interval="1s", evaluation_interval="1s")
    expected["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager]
    jobs = {job["job_name"]: job for job in expected["scrape_configs"]}
    jobs["labmesh"]["http_sd_configs"][0].update(
        url=f"http://{discovery_http}/targets", refresh_interval="1s"
    )
    jobs["labmesh-discovery"]["static_configs"][0]["targets"] = [discovery_http]
    assert yaml.safe_load(text) == expected
    (dest / "prometheus.yml").write_text(text)

    rules_path = dest / "rules" / "labmesh.rules.yml"
    rules = yaml.safe_load(rules_path.read_text())
    fast = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") in FAST_RULES]
    assert sorted(r["alert"] for r in fast) == sorted(FAST_RULES)
    for rule in fast:
        assert rule["for"] == "1m", rule
        rule["for"] = "2s"
    rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return dest / "prometheus.yml"


def render_alertmanager(dest: Path, webhook_port: int) -> tuple[Path, str]:
    """The shipped alertmanager.yml with the webhook on 127.0.0.1 and 1 s grouping; also the
    webhook path it posts to."""
    shipped = ALERTMANAGER_CONFIG.read_text()
    config = yaml.safe_load(shipped)
    (receiver,) = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    (webhook,) = receiver["webhook_configs"]
    url = webhook["url"]
    assert url.startswith("http://labmesh-alert-webhook:"), url
    address, _, path = url.removeprefix("http://").partition("/")
    text = substitute(
        shipped,
        [
            (f"url: http://{address}/", f"url: http://127.0.0.1:{webhook_port}/"),
            ("group_wait: 30s", "group_wait: 1s"),
            ("group_interval: 5m", "group_interval: 1s"),
        ],
        "alertmanager.yml",
    )
    expected = config
    webhook["url"] = f"http://127.0.0.1:{webhook_port}/{path}"
    expected["route"].update(group_wait="1s", group_interval="1s")
    assert yaml.safe_load(text) == expected
    dest.write_text(text)
    return dest, "/" + path


@pytest.fixture
def tools() -> dict[str, str]:
    return {
        "prometheus": require_tool("prometheus"),
        "alertmanager": require_tool("prometheus-alertmanager"),
    }


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Processes, Webhook]]:
    procs = Processes(tmp_path)
    webhook = Webhook()
    webhook.thread.start()
    try:
        yield procs, webhook
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        webhook.server.shutdown()
        webhook.server.server_close()


def test_shipped_alertmanager_config_is_valid():
    amtool = require_tool("amtool")
    proc = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    assert receiver["webhook_configs"][0]["send_resolved"] is True
    # the email example is documented (commented out: it needs a site's SMTP relay)
    assert "email_configs:" in ALERTMANAGER_CONFIG.read_text()


def test_a_device_going_down_reaches_the_webhook(tools, lab, tmp_path):
    started = time.monotonic()
    procs, webhook = lab
    api, pub, http, meter, unplugged, metrics = (free_port() for _ in range(6))
    discovery = f"tcp://127.0.0.1:{api}"
    labmesh = [sys.executable, "-m", "labmesh.cli"]
    procs.start(
        "discovery",
        [*labmesh, "discovery", "--address", discovery, "--pub", f"tcp://127.0.0.1:{pub}",
         "--http-host", "127.0.0.1", "--http-port", str(http), "--no-beacon"],
    )  # fmt: skip
    host = {
        "host": HOST,
        "bind": "127.0.0.1",
        "discovery": discovery,
        "metrics_port": metrics,
        "devices": [
            {
                "name": "meter-ok",
                "driver": "powermeter",
                "resource": "USB0::0x1313::0x8078::P0000001::INSTR",
                "port": meter,
                "sim": True,
            },
            {  # its instrument never answers: served as down, retried with backoff
                "name": "meter-unplugged",
                "driver": "support:UnpluggedMeter",
                "port": unplugged,
                "options": {"plugged_in": str(tmp_path / "never")},
            },
        ],
    }
    (tmp_path / "host.yaml").write_text(yaml.safe_dump(host, sort_keys=False))
    procs.wait_output("discovery", "Ctrl+C stops", 20)
    procs.start("serve", [*labmesh, "serve", str(tmp_path / "host.yaml")])

    am_port = free_port()
    am_config, path = render_alertmanager(tmp_path / "alertmanager.yml", webhook.port)
    procs.start(
        "alertmanager",
        [tools["alertmanager"], f"--config.file={am_config}",
         f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
         "--cluster.listen-address="],
    )  # fmt: skip
    prom_port = free_port()
    prom_config = render_prometheus(
        tmp_path / "prometheus", f"127.0.0.1:{http}", f"127.0.0.1:{am_port}"
    )
    procs.start(
        "prometheus",
        [tools["prometheus"], f"--config.file={prom_config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--storage.tsdb.retention.time=1h"],
    )  # fmt: skip
    prom = f"http://127.0.0.1:{prom_port}"
    procs.wait_output("serve", "Ctrl+C stops", 30)
    wait_for("Alertmanager ready", lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{am_port}/-/ready", timeout=2).status == 200, 20)  # fmt: skip
    wait_for("Prometheus ready", lambda: urllib.request.urlopen(
        f"{prom}/-/ready", timeout=2).status == 200, 20)  # fmt: skip

    # Prometheus found Alertmanager through the shipped alerting block
    def alertmanagers() -> list[str]:
        data = http_json(f"{prom}/api/v1/alertmanagers")["data"]
        return [a["url"] for a in data["activeAlertmanagers"]]

    active = wait_for("Prometheus to find Alertmanager", alertmanagers, 10)
    assert active == [f"http://127.0.0.1:{am_port}/api/v2/alerts"]

    def remaining() -> float:
        return DEADLINE_S - 10 - (time.monotonic() - started)

    # 1. the unplugged meter arrives at the webhook: critical, naming device and host
    down = wait_for(
        "LabmeshDeviceDown at the webhook",
        lambda: webhook.received("firing", "LabmeshDeviceDown"),
        remaining(),
    )
    assert webhook.path == path
    assert {labels["device"] for labels in down} == {"meter-unplugged"}
    (labels,) = {json.dumps(labels, sort_keys=True) for labels in down}
    labels = json.loads(labels)
    assert labels["severity"] == "critical"
    assert labels["labmesh_host"] == HOST
    assert labels["job"] == "labmesh"
    # the working meter is up, scraped through discovery, and raised nothing
    up = http_json(f'{prom}/api/v1/query?query=labmesh_device_up{{device="meter-ok"}}')
    assert [r["value"][1] for r in up["data"]["result"]] == ["1"]
    assert not [a for a in webhook.alerts if a[1].get("device") == "meter-ok"], webhook.alerts

    # 2. the host stops (its devices deregister and leave Prometheus's targets)
    assert procs.stop("serve") == 0
    gone = wait_for(
        "LabmeshDeviceGone at the webhook",
        lambda: webhook.received("firing", "LabmeshDeviceGone"),
        remaining(),
    )
    assert {labels["device"] for labels in gone} == {"meter-ok"}
    assert {labels["labmesh_host"] for labels in gone} == {HOST}
    assert {labels["severity"] for labels in gone} == {"warning"}
    resolved = wait_for(
        "LabmeshDeviceDown resolved at the webhook",
        lambda: webhook.received("resolved", "LabmeshDeviceDown"),
        remaining(),
    )
    assert {labels["device"] for labels in resolved} == {"meter-unplugged"}
    # only these alerts were sent (no discovery or host alert on this lab)
    names = {labels["alertname"] for _status, labels in webhook.alerts}
    assert names == {"LabmeshDeviceDown", "LabmeshDeviceGone"}, webhook.alerts
    took = time.monotonic() - started
    print(f"\nalert loop: {webhook.posts} webhook posts, {took:.1f} s")
    assert took < DEADLINE_S
