"""Every dashboard panel's PromQL against a real Prometheus scraping a real labmesh lab.

On 127.0.0.1 with free ports: a `labmesh discovery`, two `labmesh serve` hosts with simulated
devices (lab-a: a NI card and a stage; lab-b: a NI card), and the Debian `prometheus` running the
SHIPPED compose/prometheus/prometheus.yml and rules, with only the discovery address and the
scrape/evaluation intervals substituted. Traffic is driven in two rounds a few scrapes apart
(labmesh creates most labelled series at their first event, and a rate needs two samples):
queries, writes, calls, errors, a budget timeout, a lock held by one client and refused to
another, a waiting connect, a client killed while holding a lease. Then every panel's every
query, with the dashboard's variables set to real values, must parse and return at least one
finite value; the variables' own queries must offer those values; the rules must load and
evaluate cleanly; both hosts and discovery must be up targets. Everything is stopped by PID.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from system_tools import require_tool

from labmesh import RemoteError, build_client

from support import free_port, http_json, wait_for

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "check_dashboards", ROOT / "scripts" / "check_dashboards.py"
)
assert _spec is not None and _spec.loader is not None
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

DEADLINE_S = 90
SCRAPE = "1s"
#: Grafana's built-in variables: windows wide enough to span both traffic rounds (Grafana would
#: use at least 4 scrape intervals for $__rate_interval; the test scrapes every second).
BUILTINS = {"__rate_interval": "1m", "__interval": "5s", "__range": "5m", "__range_s": "300"}
#: Variable values each dashboard is run with (All = the variable's allValue).
VARIANTS = {
    "labmesh-overview": [{"host": "All"}, {"host": "lab-a"}],
    "labmesh-device": [{"host": "All", "device": "stage-a"}],
    "labmesh-locks": [{"host": "All", "device": "All"}, {"host": "lab-a", "device": "daq-a"}],
}


# ---- processes ---------------------------------------------------------------------------------
def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class Processes:
    """Subprocesses with their output in files; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("LABMESH_DISCOVERY", None)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        log.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_output(self, name: str, marker: str, timeout: float) -> None:
        proc = self.procs[name]

        def seen() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}):\n{self.output(name)}")
            return marker in self.output(name)

        wait_for(f"{marker!r} from {name}", seen, timeout, 0.1)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def logs(self) -> str:
        return "\n".join(
            f"---- {name} (exit {p.poll()}) ----\n{self.output(name)[-3000:]}"
            for name, p in self.procs.items()
        )


def labmesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "labmesh.cli", *args]


def write_host(path: Path, host: str, discovery: str, metrics_port: int, devices: list) -> None:
    """A host file as users write them: bind 127.0.0.1, discovery, its own metrics port."""
    config = {
        "host": host,
        "bind": "127.0.0.1",
        "discovery": discovery,
        "metrics_port": metrics_port,
        "devices": devices,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def sim_daq(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "driver": "nidaq",
        "resource": "Dev1",
        "port": port,
        "sim": True,
        "options": {"lines": ["port0/line0:3", "port1/line0:1"], "ai": ["ai0"], "ao": ["ao0"]},
    }


# ---- the shipped Prometheus config, rendered -------------------------------------------------
def render_prometheus(dest: Path, discovery_http: str) -> Path:
    """A copy of compose/prometheus/ whose prometheus.yml differs from the shipped one only in
    the discovery and Alertmanager addresses and the scrape and evaluation intervals. (No
    Alertmanager runs here: a port on 127.0.0.1 nobody listens on, so that the alerts that fire
    never make Prometheus look the name labmesh-alertmanager up in DNS; test_alerting.py runs
    the real one.)"""
    shutil.copytree(checks.PROMETHEUS_DIR, dest)
    shipped = checks.PROMETHEUS_CONFIG.read_text()
    no_alertmanager = f"127.0.0.1:{free_port()}"
    substitutions = [
        ("http://labmesh-discovery:5552/targets", f"http://{discovery_http}/targets"),
        ('targets: ["labmesh-discovery:5552"]', f'targets: ["{discovery_http}"]'),
        ('targets: ["labmesh-alertmanager:9093"]', f'targets: ["{no_alertmanager}"]'),
        ("scrape_interval: 5s", f"scrape_interval: {SCRAPE}"),
        ("evaluation_interval: 5s", f"evaluation_interval: {SCRAPE}"),
    ]
    text = shipped
    for old, new in substitutions:
        assert text.count(old) == 1, f"shipped prometheus.yml no longer has {old!r} once"
        text = text.replace(old, new)
    rendered, original = yaml.safe_load(text), yaml.safe_load(shipped)
    for config in (rendered, original):  # the substituted fields, and nothing else, may differ
        config["global"].pop("scrape_interval")
        config["global"].pop("evaluation_interval")
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        jobs["labmesh"]["http_sd_configs"][0].pop("url")
        jobs["labmesh-discovery"]["static_configs"][0].pop("targets")
        config["alerting"]["alertmanagers"][0]["static_configs"][0].pop("targets")
    assert rendered == original
    (dest / "prometheus.yml").write_text(text)
    return dest / "prometheus.yml"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            body = http_json(f"{self.url}/api/v1/{path}?{query}", timeout=10)
        except urllib.error.HTTPError as exc:  # 400: the query did not parse
            body = json.loads(exc.read() or b"{}")
        return body

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)


def finite_values(body: dict[str, Any]) -> list[float]:
    data = body.get("data") or {}
    if data.get("resultType") == "scalar":
        results = [{"value": data["result"]}]
    else:
        results = data.get("result") or []
    values = []
    for row in results:
        for _t, raw in [row["value"]] if "value" in row else row.get("values", []):
            value = float(raw)
            if math.isfinite(value):
                values.append(value)
    return values


# ---- traffic -----------------------------------------------------------------------------------
HOLDER_SCRIPT = """
import sys, time
from labmesh import build_client
client = build_client(sys.argv[1], resources=sys.argv[2], lease_s=1.0,
                      connect_kwargs={"name": "crashing-notebook"})
print("holding", flush=True)
time.sleep(120)
"""


def drive_traffic(lab: dict[str, Any], procs: Processes, round_no: int) -> None:
    """One round of everything the dashboards show: every series gets a new sample. Round 1
    also keeps a connect waiting and the stage busy with a queue for over a scrape interval."""
    daq, stage = lab["daq-a"], lab["stage-a"]
    slow = round_no == 1
    holder = lab["holder"]  # holds Dev1/port0/line0 of daq-a for the whole test
    with build_client(daq, connect_kwargs={"name": f"analyzer-{round_no}"}) as other:
        for _ in range(5):
            other.query("Dev1/ai0")
            other.read_line("Dev1/port0/line1")
        other.write("Dev1/ao0", 1.5)
        other.ping()
        with pytest.raises(RemoteError, match=r"held by .*\(pump-probe\)"):
            other.write_line("Dev1/port0/line0", False)  # refused: the holder's line
        with pytest.raises(ValueError):
            other.write("Dev1/ao0", 50)  # out of range
    holder.write_line("Dev1/port0/line0", round_no % 2 == 0)
    # a connect that waits for a line another client releases, and one that gives up
    blocker = build_client(daq, resources="Dev1/port1/line0")
    release = threading.Timer(1.5 if slow else 0.3, blocker.close)
    release.start()
    with build_client(daq, resources="Dev1/port1/line0", wait_s=4) as waiter:
        waiter.write_line("Dev1/port1/line0", True)
    release.join()
    with pytest.raises(RemoteError, match="still not available"):
        build_client(daq, resources="Dev1/port0/line0", wait_s=0.2)
    # stage: parameters, operations, an error, and a budget that runs out mid-move (the stage
    # stays busy with it; the next call queues)
    with build_client(stage, connect_kwargs={"name": f"alignment-{round_no}"}) as s:
        for _ in range(5):
            s.query("x/position")
            s.positions()
        s.write("x/speed", 20.0)
        s.move_abs("y", 1.0 + round_no)
        s.ping()
        with pytest.raises(ValueError, match="soft limits"):
            s.move_abs("x", 500)
        with pytest.raises(TimeoutError):
            s.move_abs("x", 40.0 if slow else 20.0, timeout=0.1)  # a 2 s (1 s) move
        s.positions()  # queued behind the still-running move
    # lab-b's card, found by name through discovery; and a name nobody serves
    with build_client("daq-b", discovery=lab["discovery"]) as b:
        b.query("Dev1/ai0")
        b.write_line("Dev1/port0/line1", True)
    with pytest.raises(LookupError, match="nobody-serves-this"):
        build_client("nobody-serves-this", discovery=lab["discovery"], timeout=1000)
    # a client holding a lease dies: the server frees its line after the lease (1 s)
    before = lab["expiries"]("daq-a")
    procs.kill(f"crashed-{round_no}")
    wait_for("the lease expiry", lambda: lab["expiries"]("daq-a") > before, 6, 0.1)


# ---- the test ----------------------------------------------------------------------------------
@pytest.fixture
def prometheus_binary() -> str:
    return require_tool("prometheus")


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(prometheus_binary):
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="labmesh-prom-"))
    procs = Processes(tmp)
    clients: list[Any] = []
    try:
        _run(tmp, procs, clients, prometheus_binary)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    assert time.monotonic() - started < DEADLINE_S


def _run(tmp: Path, procs: Processes, clients: list[Any], prometheus_exe: str) -> None:
    api, pub, http = free_port(), free_port(), free_port()
    discovery = f"tcp://127.0.0.1:{api}"
    discovery_http = f"127.0.0.1:{http}"
    procs.start(
        "discovery",
        labmesh(
            "discovery",
            "--address",
            discovery,
            "--pub",
            f"tcp://127.0.0.1:{pub}",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http),
            "--no-beacon",
        ),
    )
    ports = {name: free_port() for name in ("daq-a", "stage-a", "daq-b", "m-a", "m-b")}
    stage = {
        "name": "stage-a",
        "driver": "motor",
        "port": ports["stage-a"],
        "sim": True,
        "options": {"axes": ["x", "y"], "limits": {"x": [0, 100], "y": [0, 100]}, "speed": 20.0},
        "metrics": {"x/position": 0.5, "y/position": 0.5},
    }
    write_host(
        tmp / "lab-a.yaml",
        "lab-a",
        discovery,
        ports["m-a"],
        [sim_daq("daq-a", ports["daq-a"]), stage],
    )
    write_host(
        tmp / "lab-b.yaml", "lab-b", discovery, ports["m-b"], [sim_daq("daq-b", ports["daq-b"])]
    )
    procs.wait_output("discovery", "Ctrl+C stops", 20)
    procs.start("lab-a", labmesh("serve", str(tmp / "lab-a.yaml")))
    procs.start("lab-b", labmesh("serve", str(tmp / "lab-b.yaml")))
    address = {n: f"tcp://127.0.0.1:{ports[n]}" for n in ("daq-a", "stage-a", "daq-b")}
    # two clients that will "crash" holding leases on daq-a (one per round)
    for n in (1, 2):
        procs.start(
            f"crashed-{n}",
            [sys.executable, "-c", HOLDER_SCRIPT, address["daq-a"], f"Dev1/port0/line{n + 1}"],
        )
    procs.wait_output("lab-a", "Ctrl+C stops", 30)
    procs.wait_output("lab-b", "Ctrl+C stops", 30)

    def registered() -> bool:
        groups = http_json(f"http://{discovery_http}/targets")
        return {g["labels"]["labmesh_host"] for g in groups} == {"lab-a", "lab-b"}

    wait_for("both hosts in discovery's http_sd targets", registered, 15)
    for n in (1, 2):
        procs.wait_output(f"crashed-{n}", "holding", 20)

    prom_port = free_port()
    config = render_prometheus(tmp / "prometheus", discovery_http)
    procs.start(
        "prometheus",
        [
            prometheus_exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--storage.tsdb.retention.time=1h",
        ],
    )
    prom = Prometheus(f"http://127.0.0.1:{prom_port}")
    wait_for("Prometheus ready", lambda: http_text(f"{prom.url}/-/ready"), 20)

    def expiries(device: str) -> float:
        text = http_text(f"http://127.0.0.1:{ports['m-a']}/metrics")
        prefix = f'labmesh_lease_expiries_total{{device="{device}"}} '
        return sum(
            float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)
        )

    holder = build_client(
        address["daq-a"], resources="Dev1/port0/line0", connect_kwargs={"name": "pump-probe"}
    )
    clients.append(holder)
    lab = {**address, "holder": holder, "discovery": discovery, "expiries": expiries}

    # every target up (http_sd: the first scrape comes a few seconds after start)
    def targets_up() -> list[dict[str, Any]] | None:
        active = prom.api("targets", state="active")["data"]["activeTargets"]
        up = [t for t in active if t["health"] == "up"]
        return active if len(active) == 3 and len(up) == 3 else None

    active = wait_for("3 targets up in Prometheus", targets_up, 20, 0.5)
    hosts = {t["labels"].get("labmesh_host"): t for t in active if t["labels"]["job"] == "labmesh"}
    assert set(hosts) == {"lab-a", "lab-b"}
    assert hosts["lab-a"]["scrapeUrl"] == f"http://127.0.0.1:{ports['m-a']}/metrics"
    for target in hosts.values():  # dropped by the shipped relabelling
        assert not {"labmesh_devices", "labmesh_kinds"} & set(target["labels"])
    assert [t["labels"]["job"] for t in active].count("labmesh-discovery") == 1

    drive_traffic(lab, procs, 1)
    time.sleep(2.5)  # a few scrapes, so the second round shows as increases
    drive_traffic(lab, procs, 2)

    def scraped_round_two() -> bool:
        body = prom.query('sum(labmesh_lease_expiries_total{device="daq-a"})')
        return finite_values(body) == [2.0]

    wait_for("Prometheus to scrape the second round", scraped_round_two, 10, 0.25)
    time.sleep(1.5)

    # the real /metrics outputs pass promtool's lint (without promtool: skipped, failed on CI)
    promtool = require_tool("promtool")
    for port in (ports["m-a"], ports["m-b"], http):
        text = http_text(f"http://127.0.0.1:{port}/metrics")
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert lint.returncode == 0, f"port {port}: " + lint.stdout + lint.stderr

    # the scrape-time gauges saw round 1's waiting connect, busy stage and queued call
    for expr in (
        'max_over_time(labmesh_lock_waiters{device="daq-a"}[2m])',
        'max_over_time(labmesh_device_busy{device="stage-a"}[2m])',
        'max_over_time(labmesh_executor_queue_depth{device="stage-a"}[2m])',
    ):
        assert finite_values(prom.query(expr)) == [1.0], expr
    # (the queued call; labmesh also counts the expired move it already answered, so 1 or 2)
    in_flight = 'max_over_time(labmesh_requests_in_flight{device="stage-a"}[2m])'
    assert finite_values(prom.query(in_flight))[0] >= 1

    failures = check_dashboards_against(prom)
    failures += check_rules_loaded(prom)
    assert not failures, "\n".join(failures)


def check_dashboards_against(prom: Prometheus) -> list[str]:
    failures: list[str] = []
    # every metric the dashboards name was really scraped
    names = set()
    for path in checks.dashboard_files():
        for _title, _ref, expr in checks.queries(checks.load_dashboard(path)):
            names |= checks.metric_names(expr)
    for name in sorted(names):
        if not finite_values(prom.query(f"count({name})")):
            failures.append(f"metric {name} was never scraped")
    ran = 0
    for path in checks.dashboard_files():
        dashboard = checks.load_dashboard(path)
        variables = {v["name"]: v for v in checks.variables(dashboard)}
        for variant in VARIANTS[dashboard["uid"]]:
            values = dict(BUILTINS)
            for name, chosen in variant.items():
                var = variables[name]
                values[name] = var["allValue"] if chosen == "All" else chosen
            # the variable's own query offers the chosen value
            for name, chosen in variant.items():
                query = checks.substitute(checks.variable_query(variables[name]), values)
                selector, label = query.removeprefix("label_values(").rstrip(")").rsplit(",", 1)
                body = prom.api(f"label/{label.strip()}/values", **{"match[]": selector})
                offered = body.get("data") or []
                if not offered or (chosen != "All" and chosen not in offered):
                    failures.append(f"{dashboard['title']}: ${name} offers {offered}, not {chosen}")
            where = f"{dashboard['title']} {variant}"
            for title, ref, expr in checks.queries(dashboard):
                promql = checks.substitute(expr, values)
                body = prom.query(promql)
                ran += 1
                if body.get("status") != "success":
                    failures.append(f"{where} / {title} {ref}: {body.get('error')}: {promql}")
                elif not finite_values(body):
                    failures.append(f"{where} / {title} {ref}: no data: {promql}")
    assert ran >= 60, ran
    return failures


def check_rules_loaded(prom: Prometheus) -> list[str]:
    failures = []
    shipped = yaml.safe_load(checks.RULES.read_text())
    expected = {r["alert"] for g in shipped["groups"] for r in g["rules"] if "alert" in r}
    groups = prom.api("rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    if set(loaded) != expected:
        failures.append(f"rules loaded {sorted(loaded)}, shipped {sorted(expected)}")
    for name, rule in loaded.items():
        if rule.get("health") != "ok" or rule.get("lastError"):
            failures.append(f"rule {name}: {rule.get('health')} {rule.get('lastError')}")
    # the lease expiries of this run fire their alert (both of its branches see them)
    lease = loaded.get("LabmeshLeaseExpiries", {})
    firing = [a["labels"].get("device") for a in lease.get("alerts", [])]
    if "daq-a" not in firing:
        failures.append(f"LabmeshLeaseExpiries not firing for daq-a: {lease.get('alerts')}")
    quiet = ("LabmeshDeviceDown", "LabmeshHostUnreachable", "LabmeshDiscoveryDown")
    for name in quiet:
        if loaded.get(name, {}).get("alerts"):
            failures.append(f"{name} is active on a healthy lab: {loaded[name]['alerts']}")
    return failures
