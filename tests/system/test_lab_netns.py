"""A whole lab in network namespaces this test creates: discovery, two instrument hosts, a client.

    switch ns: br0 (multicast snooping off)
      |- discovery ns  eth0 10.213.0.1/24  `labmesh discovery --ttl 2` (with its beacon)
      |- host-a ns     eth0 10.213.0.2/24  `labmesh serve`, `discovery: auto`    daq-a, stage-a
      |- host-b ns     eth0 10.213.0.3/24  `labmesh serve`, `discovery: tcp://10.213.0.1:5550`
      |                                                                           daq-b, stage-b
      '- client ns     eth0 10.213.0.4/24  an experiment process, LABMESH_DISCOVERY=auto

Every host has a multicast route and no default route. Every process runs in its namespace via
`ip netns exec` and is ended by its PID; deleting the namespaces removes every link and address.
The test process itself is in none of them: it asks the experiment process (the "agent", in the
client namespace) to connect, query and watch discovery's HTTP API. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from netns import SUBNET, Lan, netns_problem
from system_tools import require_tool, unavailable

pytestmark = pytest.mark.system

HOSTS = {"discovery": 1, "host-a": 2, "host-b": 3, "client": 4}
TTL_S = 2.0
HEARTBEAT_S = TTL_S / 3  # the registrar's interval: TTL/3
API, PUB, HTTP = 5550, 5551, 5552
#: Every serve host's /metrics port (each host is its own namespace, so one port for all).
METRICS = 9105
DEVICES = {"host-a": {"daq-a": 6001, "stage-a": 6002}, "host-b": {"daq-b": 6001, "stage-b": 6002}}
ALL_DEVICES = [name for devices in DEVICES.values() for name in devices]
#: Slack for expiry checks: the service's expiry tick (TTL/10) plus polling and scheduling.
SLACK_S = 1.0


def _host_yaml(role: str, discovery: str) -> str:
    devices = DEVICES[role]
    daq, stage = devices
    return textwrap.dedent(f"""\
        host: {role}
        bind: "*"
        discovery: {discovery}
        metrics_port: {METRICS}
        devices:
          - {{name: {daq}, driver: nidaq, port: {devices[daq]}, sim: true}}
          - {{name: {stage}, driver: motor, port: {devices[stage]}, sim: true,
              options: {{axes: [x, y], speed: 1000.0}}}}
        """)


AGENT = r"""
import json, sys, time, urllib.request
from labmesh import build_client
from labmesh.discovery import Resolver
from labmesh.discovery.beacon import find_announcements

found = find_announcements(5.0)  # what LABMESH_DISCOVERY=auto finds on this LAN
HTTP = found[0].http if found else None
web = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # only the lab's addresses
clients = {}


def get(path):
    try:
        with web.open(HTTP + path, timeout=1.0) as reply:
            return json.load(reply)
    except OSError:
        return None  # discovery down or unreachable


def connect(key, name, resources=None, experiment=None):
    # one client per key, kept open until closed: an experiment's connection
    if key not in clients:
        kwargs = {"connect_kwargs": {"name": experiment}} if experiment else {}
        clients[key] = build_client(name, timeout=2000, resources=resources, **kwargs)
    return {"address": clients[key].address}


def close(key):
    clients.pop(key).close()


def query(key, param):
    return clients[key].query(param)


def call(key, operation, args):
    return clients[key].call(operation, *args)


def wait(want, within):
    # until every name's presence in /devices is as wanted: seconds taken (None: not in time)
    start = time.monotonic()
    while True:
        devices = get("/devices")
        if devices is not None:
            names = {d["name"] for d in devices}
            if all((name in names) == present for name, present in want.items()):
                return {"after": round(time.monotonic() - start, 3), "devices": devices}
        if time.monotonic() - start > within:
            return {"after": None, "devices": devices}
        time.sleep(0.02)


def reregistered(names, within):
    # after a restart: how long after the service started each record registered (an upper
    # bound: /health is read after /devices)
    result = wait({name: True for name in names}, within)
    health = get("/health")
    if result["after"] is None or health is None:
        return {"delays": None, "devices": result["devices"], "health": health}
    delays = {d["name"]: round(health["uptime_s"] - d["registered_for_s"], 3)
              for d in result["devices"]}
    return {"delays": delays, "health": health}


def lookup_error(name):
    try:
        Resolver("auto").lookup(name)
    except LookupError as exc:
        return str(exc)
    return None


OPS = {"connect": connect, "close": close, "query": query, "call": call, "get": get,
       "wait": wait, "reregistered": reregistered, "lookup_error": lookup_error}
print(json.dumps({"endpoints": [e for a in found for e in a.endpoints], "http": HTTP}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        out = {"ok": OPS[cmd["op"]](**cmd.get("args", {}))}
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
for client in clients.values():
    client.close()
"""

EXPORTER = r"""
import sys
from labmesh.discovery import DeviceRecord, Registrar, advertised_address
endpoint = sys.argv[1]
metrics = advertised_address("http://*:9200/metrics", endpoint)
registrar = Registrar([endpoint], ttl_s=2.0).start()
for name, port in (("psu-b", 6101), ("scope-b", 6102)):
    address = advertised_address(f"tcp://*:{port}", endpoint)
    registrar.add(DeviceRecord(name=name, kind="scpi", address=address, instance="exp-1",
                               host="host-b", metrics_url=metrics, labels={"room": "b12"}))
print("ready" if registrar.wait_registered(10) else "not registered", flush=True)
sys.stdin.read()
registrar.stop()
"""


class Lab:
    """The namespaces, the processes in them, and the agent that acts from the client host."""

    def __init__(self, tag: str, logs: Path) -> None:
        self.lan = Lan(tag, HOSTS, multicast=HOSTS)
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.agent: subprocess.Popen | None = None
        self.agent_hello: dict[str, Any] = {}
        self._lines: queue.Queue[str] = queue.Queue()

    # ---- processes --------------------------------------------------------------------------
    def popen(self, role: str, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(
                self.lan.exec(role, *argv),
                stdout=kwargs.pop("stdout", log),
                stderr=log,
                **kwargs,
            )
        finally:
            log.close()

    def labmesh(self, role: str, name: str, *args: str) -> subprocess.Popen:
        return self.popen(role, name, [sys.executable, "-m", "labmesh.cli", *args])

    def start_discovery(self) -> None:
        log = self.logs / "discovery.log"
        marker = "labmesh discovery: API"
        seen = log.read_text().count(marker) if log.exists() else 0
        self.procs["discovery"] = self.labmesh(
            "discovery", "discovery", "discovery", "--ttl", str(TTL_S),
            "--address", f"tcp://*:{API}", "--pub", f"tcp://*:{PUB}", "--http-port", str(HTTP),
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while log.read_text().count(marker) <= seen:
            assert time.monotonic() < deadline, "discovery did not start\n" + self.tails()
            time.sleep(0.02)

    def start_serve(self, role: str) -> None:
        discovery = "auto" if role == "host-a" else f"tcp://{SUBNET}.1:{API}"
        config = self.logs / f"{role}.yaml"
        config.write_text(_host_yaml(role, discovery))
        self.procs[role] = self.labmesh(role, role, "serve", str(config))

    def end(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal one process by its PID and reap it (SIGKILL if it does not stop)."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def start_agent(self) -> None:
        env = {**os.environ, "LABMESH_DISCOVERY": "auto"}
        self.agent = self.popen(
            "client", "agent", [sys.executable, "-c", AGENT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        stdout = self.agent.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                self._lines.put(line)

        threading.Thread(target=pump, name="agent-stdout", daemon=True).start()
        self.agent_hello = json.loads(self._line(20))

    def _line(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"agent silent for {timeout} s\n" + self.tails()) from None

    def ask(self, op: str, reply_s: float = 30, **args: Any) -> Any:
        """Have the agent do `op`; its result, or AssertionError with its error."""
        assert self.agent is not None and self.agent.stdin is not None
        self.agent.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.agent.stdin.flush()
        reply = json.loads(self._line(reply_s))
        assert "error" not in reply, f"agent {op} {args}: {reply['error']}\n" + self.tails()
        return reply["ok"]

    def wait(self, within: float, present: Any = (), absent: Any = ()) -> float | None:
        """Seconds until /devices lists every `present` name and none of `absent`; None if
        that did not happen within `within` seconds."""
        want = {**dict.fromkeys(present, True), **dict.fromkeys(absent, False)}
        return self.ask("wait", reply_s=within + 10, want=want, within=within)["after"]

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.ask("get", path="/devices")}

    def all_registered(self, within: float = 15) -> None:
        after = self.wait(within, present=ALL_DEVICES)
        assert after is not None, "not every device registered\n" + self.tails()

    def tails(self, limit: int = 1500) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            out.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(out)

    def close(self) -> None:
        if self.agent is not None:
            if self.agent.stdin is not None:
                self.agent.stdin.close()
            try:
                self.agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(timeout=10)
        for name in list(self.procs):
            self.end(name)
        self.lan.delete()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = netns_problem()
    if reason:
        unavailable(reason)  # skipped (failed on CI)
    lab = Lab(f"lml{os.getpid() % 100000}", tmp_path_factory.mktemp("lab"))
    try:
        lab.lan.build()
        lab.start_discovery()
        for role in DEVICES:
            lab.start_serve(role)
        lab.start_agent()
        lab.all_registered()
        yield lab
    finally:
        lab.close()


def test_the_client_finds_discovery_by_multicast_and_uses_devices_by_name(lab):
    # LABMESH_DISCOVERY=auto: the beacon's wildcard endpoints completed with the sender address
    assert lab.agent_hello == {
        "endpoints": [f"tcp://{SUBNET}.1:{API}"],
        "http": f"http://{SUBNET}.1:{HTTP}",
    }
    stage = lab.ask("connect", key="scan-7", name="stage-b", resources="x", experiment="scan-7")
    assert stage["address"] == f"tcp://{SUBNET}.3:{DEVICES['host-b']['stage-b']}"
    assert lab.ask("call", key="scan-7", operation="move_abs", args=["x", 2.0]) == 2.0
    assert lab.ask("query", key="scan-7", param="x/position") == 2.0
    daq = lab.ask("connect", key="daq-b", name="daq-b")
    assert daq["address"] == f"tcp://{SUBNET}.3:{DEVICES['host-b']['daq-b']}"
    assert lab.ask("call", key="daq-b", operation="write_line", args=["Dev1/port0/line1", True])
    assert lab.ask("query", key="daq-b", param="Dev1/port0/line1") is True
    # the CLI on the client host, by name through the beacon too, sees the experiment's lock
    locks = subprocess.run(
        [
            *lab.lan.exec("client", sys.executable, "-m", "labmesh.cli"),
            "--json", "locks", "stage-b",
        ],
        capture_output=True, text=True, timeout=30, env={**os.environ, "LABMESH_DISCOVERY": "auto"},
    )  # fmt: skip
    assert locks.returncode == 0, locks.stderr
    holders = json.loads(locks.stdout)["holders"]
    assert [(h["resource"], h["metadata"]["name"]) for h in holders] == [("x", "scan-7")]
    lab.ask("close", key="scan-7")  # releases x


@pytest.mark.parametrize("role", ["host-a", "host-b"])  # host-a uses `discovery: auto`
def test_serve_registers_the_address_of_its_own_host(lab, role):
    lab.all_registered()
    devices = lab.devices()
    last = HOSTS[role]
    for name, port in DEVICES[role].items():
        record = devices[name]
        assert record["host"] == role
        assert record["address"] == f"tcp://{SUBNET}.{last}:{port}", record
        # serve's /metrics, advertised on the same address as the device
        assert record["metrics_url"] == f"http://{SUBNET}.{last}:{METRICS}/metrics", record


def test_a_killed_host_s_devices_expire_after_the_ttl(lab):
    lab.all_registered()
    try:
        lab.end("host-a", signal.SIGKILL)  # a crash: nothing deregisters
        gone = lab.wait(TTL_S + 3, absent=DEVICES["host-a"], present=DEVICES["host-b"])
        assert gone is not None, lab.tails()
        # the last heartbeat was at most one interval before the kill
        assert TTL_S - HEARTBEAT_S - 0.2 <= gone <= TTL_S + SLACK_S, gone
        assert "its server stopped heartbeating" in lab.ask("lookup_error", name="daq-a")
    finally:
        if "host-a" not in lab.procs:
            lab.start_serve("host-a")
    lab.all_registered()


def test_cutting_a_host_s_link_expires_it_and_restoring_it_brings_it_back(lab):
    lab.all_registered()
    lab.ask("connect", key="stage-b", name="stage-b")
    try:
        lab.lan.link("host-b", up=False)
        gone = lab.wait(TTL_S + 3, absent=DEVICES["host-b"], present=DEVICES["host-a"])
        assert gone is not None and gone <= TTL_S + SLACK_S, gone
    finally:
        lab.lan.link("host-b", up=True)
    back = lab.wait(10, present=ALL_DEVICES)
    # the registrar retries every second (its request timeout) with a fresh connection
    assert back is not None and back <= 3.0, back
    devices = lab.devices()
    assert devices["stage-b"]["address"] == f"tcp://{SUBNET}.3:{DEVICES['host-b']['stage-b']}"
    # the experiment's connection survived the unplugged cable
    assert lab.ask("call", key="stage-b", operation="move_abs", args=["y", 1.0]) == 1.0


def test_a_restarted_discovery_has_every_server_back_within_one_heartbeat(lab):
    lab.all_registered()
    lab.ask("connect", key="stage-b", name="stage-b")
    before = lab.ask("get", path="/health")
    lab.end("discovery")
    try:
        assert lab.ask("get", path="/health") is None  # really gone
        # a connected client keeps working, and a client connecting by name now gets the
        # last known address
        assert lab.ask("call", key="stage-b", operation="move_abs", args=["x", 4.0]) == 4.0
        lab.ask("close", key="stage-b")
        stage = lab.ask("connect", key="stage-b", name="stage-b")
        assert stage["address"] == f"tcp://{SUBNET}.3:{DEVICES['host-b']['stage-b']}"
        assert lab.ask("query", key="stage-b", param="x/position") == 4.0
        time.sleep(TTL_S)  # down for longer than a TTL: the hosts see timeouts
    finally:
        if "discovery" not in lab.procs:
            lab.start_discovery()
    result = lab.ask("reregistered", names=ALL_DEVICES, within=10)
    assert result["delays"] is not None, result
    assert result["health"]["instance"] != before["instance"]  # a new service, empty at start
    late = {name: d for name, d in result["delays"].items() if d > HEARTBEAT_S}
    assert not late, f"re-registered later than one heartbeat ({HEARTBEAT_S:.2f} s): {late}"


def test_targets_pass_promtool_check_service_discovery(lab, tmp_path):
    promtool = require_tool("promtool")
    lab.all_registered()
    # next to serve's records: two devices of another process on host-b sharing one metrics
    # endpoint and a label, so the list has a target group with every kind of label
    exporter = lab.popen(
        "host-b", "exporter", [sys.executable, "-c", EXPORTER, f"tcp://{SUBNET}.1:{API}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert exporter.stdout is not None and exporter.stdout.readline().strip() == "ready"
        targets = lab.ask("get", path="/targets")
        devices = lab.devices()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "scrape_configs:\n"
            "  - job_name: labmesh\n"
            "    http_sd_configs:\n"
            f"      - url: http://{SUBNET}.1:{HTTP}/targets\n"
        )
        check = subprocess.run(
            [
                *lab.lan.exec("client", promtool, "check", "service-discovery"),
                str(config), "labmesh", "--timeout=3s",
            ],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        assert exporter.stdin is not None
        exporter.stdin.close()
        try:
            exporter.wait(timeout=10)
        except subprocess.TimeoutExpired:
            exporter.kill()
            exporter.wait(timeout=10)
        assert exporter.stdout is not None
        exporter.stdout.close()
    # promtool exits 0 even when it rejects the target list: it logs the error instead
    assert check.returncode == 0 and "level=error" not in check.stderr, check.stderr
    found = {entry["labels"]["__address__"]: entry for entry in json.loads(check.stdout)}
    expected = {target: group["labels"] for group in targets for target in group["targets"]}
    assert set(found) == set(expected)
    assert expected[f"{SUBNET}.3:9200"] == {
        "labmesh_host": "host-b",
        "labmesh_kinds": "scpi",
        "labmesh_devices": "psu-b,scope-b",
        "labmesh_label_room": "b12",
    }
    for address, labels in expected.items():
        assert {k: found[address]["discoveredLabels"][k] for k in labels} == labels
        assert found[address]["labels"]["instance"] == address
    # every device has a metrics endpoint (serve's per host, the exporter's shared one), and
    # each endpoint is a target
    assert set(found) == {f"{SUBNET}.2:{METRICS}", f"{SUBNET}.3:{METRICS}", f"{SUBNET}.3:9200"}
    assert set(devices) == {*ALL_DEVICES, "psu-b", "scope-b"}
    for device in devices.values():
        assert device["metrics_url"], device
        assert urlsplit(device["metrics_url"]).netloc in found, device
