"""`labmesh demo`: a whole simulated lab on this machine, in one command.

A discovery service (in this process) and two simulated instrument hosts, each a real
`labmesh serve` process: `optics-pc` with a PM100 power meter, `daq-pc` with an NI DAQ card and a
3-axis stage. Everything listens on 127.0.0.1. Ctrl+C stops it all.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labmesh.config import ConfigError
from labmesh.signals import stop_signals, wait_for_signal

#: Ports of the demo relative to --base-port (default 5550).
DISCOVERY_API, DISCOVERY_PUB, DISCOVERY_HTTP = 0, 1, 2
PM100_PORT, DAQ_PORT, STAGE_PORT = 5, 6, 7
OPTICS_METRICS, DAQ_METRICS = 9105, 9106

HOSTS = {
    "optics-pc": """\
        host: optics-pc
        bind: 127.0.0.1
        discovery: {discovery}
        metrics_port: {optics_metrics}
        devices:
          - name: pm100-a
            driver: powermeter
            resource: USB0::0x1313::0x8078::P0000001::INSTR
            port: {pm100}
            options: {{sensor_type: S155C}}
            metrics: [POWER, WAVELENGTH]
        """,
    "daq-pc": """\
        host: daq-pc
        bind: 127.0.0.1
        discovery: {discovery}
        metrics_port: {daq_metrics}
        devices:
          - name: daq-1
            driver: nidaq
            resource: Dev1
            port: {daq}
            options:
              lines: ["port0/line0:7"]
              ai: ["ai0:1"]
              ao: ["ao0"]
          - name: stage
            driver: motor
            port: {stage}
            options:
              axes: [x, y, z]
              limits: {{x: [0, 100], y: [0, 100], z: [0, 25]}}
              speed: 25.0
            metrics: {{x/position: 0.5, y/position: 0.5, z/position: 0.5}}
        """,
}
DEVICES = ("pm100-a", "daq-1", "stage")
#: `--secure`: the key pairs made for the lab (hosts register, people use the devices), the
#: roles people get on every device, and pm100-a's plaintext listener (for PLESTY clients).
SECURE_HOSTS = ("optics-pc", "daq-pc")
SECURE_PEOPLE = {"operator": "operator", "observer": "observer", "admin": "admin"}
PM100_PLAINTEXT = 8
SECURITY_BLOCK = """\
security:
  key: {key}
  clients: {clients}
  discovery_key: '{discovery_key}'
  roles: {roles}
audit: {audit}
"""


@dataclass
class Demo:
    """The running demo: its discovery service, host processes and optional Prometheus."""

    base_port: int
    workdir: Path
    discovery: object = None
    hosts: dict[str, subprocess.Popen] = field(default_factory=dict)
    #: how each host was started (to restart it), and when it crashed
    commands: dict[str, list[str]] = field(default_factory=dict)
    crashes: dict[str, list[float]] = field(default_factory=dict)
    prometheus: subprocess.Popen | None = None
    prometheus_url: str | None = None
    #: --secure: where the keys are, discovery's public key
    keys: Path | None = None
    discovery_key: str | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.base_port + DISCOVERY_API}"


def _check_free(ports: list[int]) -> None:
    from labmesh.host import port_taken

    for port in ports:
        if port_taken("127.0.0.1", port) is not None:
            raise ConfigError(
                f"port {port} on 127.0.0.1 is in use (another labmesh demo or serve?); "
                "stop it or pick other ports with --base-port and --metrics-port"
            )


def _secure_lab(demo: Demo, ports: dict) -> object:
    """Make the secured demo's keys; return discovery's ServerSecurity (hosts register,
    people look up) and fill the host files' `security:` blocks into `ports`."""
    from labmesh.keys import new_key_pair
    from labmesh.security import Keyring, ServerSecurity, load_key_pair

    keys = demo.keys = demo.workdir / "keys"
    clients = keys / "clients"
    clients.mkdir(parents=True)
    new_key_pair(keys, "lab-core")
    for name in (*SECURE_HOSTS, *SECURE_PEOPLE):
        public, _secret = new_key_pair(keys, name)
        (clients / public.name).write_text(public.read_text())
    pair = load_key_pair(keys / "lab-core.key_secret")
    demo.discovery_key = pair.public.decode()
    roles = {**SECURE_PEOPLE, "*": "none"}
    for host in SECURE_HOSTS:
        ports[f"security_{host}"] = SECURITY_BLOCK.format(
            key=keys / f"{host}.key_secret",
            clients=clients,
            discovery_key=demo.discovery_key,
            roles="{" + ", ".join(f"{k!r}: {v}" for k, v in roles.items()) + "}",
            audit=demo.workdir / f"audit-{host}.jsonl",
        )
    registrars = {**dict.fromkeys(SECURE_HOSTS, "operator"), "*": "observer"}
    return ServerSecurity(pair, Keyring(directories=[clients]), registrars)


def start(
    base_port: int = 5550,
    metrics_port: int = OPTICS_METRICS,
    timeout_s: float = 15.0,
    secure: bool = False,
) -> Demo:
    """Start the demo lab; returns once every device is registered (or raises). `secure`:
    with CurveZMQ keys, roles and an audit trail (docs/security.md)."""
    from labmesh.discovery import DiscoveryService

    ports = {
        "discovery": f"tcp://127.0.0.1:{base_port + DISCOVERY_API}",
        "pm100": base_port + PM100_PORT,
        "daq": base_port + DAQ_PORT,
        "stage": base_port + STAGE_PORT,
        "optics_metrics": metrics_port,
        "daq_metrics": metrics_port + 1,
    }
    _check_free(
        [
            base_port + p
            for p in (
                DISCOVERY_API,
                DISCOVERY_PUB,
                DISCOVERY_HTTP,
                PM100_PORT,
                DAQ_PORT,
                STAGE_PORT,
                *((PM100_PLAINTEXT,) if secure else ()),
            )
        ]
        + [metrics_port, metrics_port + 1]
    )
    demo = Demo(base_port, Path(tempfile.mkdtemp(prefix="labmesh-demo-")))
    try:
        security = None
        if secure:
            security = _secure_lab(demo, ports)
        demo.discovery = DiscoveryService(
            f"tcp://127.0.0.1:{base_port + DISCOVERY_API}",
            f"tcp://127.0.0.1:{base_port + DISCOVERY_PUB}",
            http_host="127.0.0.1",
            http_port=base_port + DISCOVERY_HTTP,
            beacon=None,
            security=security,
        ).start()
        for host, template in HOSTS.items():
            path = demo.workdir / f"{host}.yaml"
            text = textwrap.dedent(template).format(**ports)
            if secure:
                text = text.replace("devices:\n", ports[f"security_{host}"] + "devices:\n", 1)
                listener = f"{{port: {base_port + PM100_PLAINTEXT}, role: observer}}"
                text = text.replace(
                    "    metrics: [POWER, WAVELENGTH]\n",
                    f"    metrics: [POWER, WAVELENGTH]\n    plaintext: {listener}\n",
                )
            path.write_text(text)
            demo.commands[host] = [sys.executable, "-m", "labmesh.cli", "serve", str(path), "--sim"]
            _start_host(demo, host)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            names = {d["name"] for d in demo.discovery.devices()}
            if names >= set(DEVICES):
                return demo
            for host, proc in demo.hosts.items():
                if proc.poll() is not None:
                    log = (demo.workdir / f"{host}.log").read_text()[-2000:]
                    raise RuntimeError(f"demo host {host} exited:\n{log}")
            time.sleep(0.05)
        raise RuntimeError(f"demo devices did not register within {timeout_s} s")
    except BaseException:
        stop(demo)
        raise


def _start_host(demo: Demo, host: str) -> None:
    demo.hosts[host] = subprocess.Popen(
        demo.commands[host],
        stdout=subprocess.DEVNULL,
        stderr=open(demo.workdir / f"{host}.log", "a"),  # noqa: SIM115
        start_new_session=True,
    )


#: A host that crashes this many times within CRASH_WINDOW_S ends the demo (exit 1).
MAX_CRASHES = 3
CRASH_WINDOW_S = 60.0


def supervise(demo: Demo, out: Any = None) -> bool:
    """Called every half second while the demo runs: a host that exited is reported (its exit
    status and the end of its log) and started again; False once one has crashed MAX_CRASHES
    times within CRASH_WINDOW_S (the demo then stops, exit 1)."""
    out = out or sys.stdout
    now = time.monotonic()
    for host, proc in list(demo.hosts.items()):
        code = proc.poll()
        if code is None:
            continue
        crashes = [t for t in demo.crashes.get(host, []) if now - t < CRASH_WINDOW_S] + [now]
        demo.crashes[host] = crashes
        tail = (demo.workdir / f"{host}.log").read_text(errors="replace").strip()
        last = "\n    ".join(tail.splitlines()[-5:]) or "(no output)"
        print(
            f"labmesh demo: host {host} exited with status {code}; its log ends:\n    {last}",
            file=out,
            flush=True,
        )
        if len(crashes) >= MAX_CRASHES:
            print(
                f"labmesh demo: {host} crashed {len(crashes)} times within "
                f"{CRASH_WINDOW_S:.0f} s; stopping the demo (its log: "
                f"{demo.workdir / f'{host}.log'})",
                file=out,
                flush=True,
            )
            return False
        print(f"labmesh demo: restarting {host}", file=out, flush=True)
        _start_host(demo, host)
    return True


def start_prometheus(demo: Demo, port: int = 9090) -> str:
    """Start a Prometheus binary with the shipped config pointed at the demo's discovery."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ConfigError(
            "--prometheus needs the prometheus binary on PATH (Debian: apt-get install prometheus)"
        )
    shipped = Path(__file__).resolve().parents[2] / "compose" / "prometheus"
    if not (shipped / "prometheus.yml").exists():
        raise ConfigError(
            f"--prometheus needs the repository's compose/prometheus folder "
            f"(not found at {shipped})"
        )
    _check_free([port])
    from labmesh.prometheus_config import render

    config = demo.workdir / "prometheus.yml"
    config.write_text(
        render(
            shipped,
            discovery_http=f"127.0.0.1:{demo.base_port + DISCOVERY_HTTP}",
            scrape_interval="5s",
        )
    )
    demo.prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={demo.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(demo.workdir / "prometheus.log", "w"),  # noqa: SIM115
        start_new_session=True,
    )
    demo.prometheus_url = f"http://127.0.0.1:{port}"
    return demo.prometheus_url


def stop(demo: Demo, timeout_s: float = 5.0, keep_workdir: bool = False) -> None:
    """Stop every process of the demo (by PID) and the discovery service; its folder (host
    files, logs, keys) goes too unless `keep_workdir` (after a crash: for its logs)."""
    procs = [*demo.hosts.values(), *([demo.prometheus] if demo.prometheus else [])]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2)
    if demo.discovery is not None:
        demo.discovery.stop()
    if not keep_workdir:
        shutil.rmtree(demo.workdir, ignore_errors=True)


def banner(demo: Demo) -> str:
    disc = demo.discovery
    lines = [
        "labmesh demo: a simulated lab on 127.0.0.1",
        "",
        f"  discovery     {demo.endpoint}   (HTTP {disc.http_url}: /devices /targets /health)",
    ]
    for record in sorted(disc.devices(), key=lambda r: r["name"]):
        lines.append(
            f"  {record['name']:<13} {record['address']:<26} {record['kind']:<11} "
            f"on {record['host']}   metrics {record['metrics_url']}"
        )
    if demo.prometheus_url:
        lines.append(f"  prometheus    {demo.prometheus_url}")
    if demo.keys is not None:
        plaintext = demo.base_port + PM100_PLAINTEXT
        lines += [
            "",
            f"Secured with CurveZMQ: keys in {demo.keys} (roles: operator, observer, admin);",
            f"pm100-a also listens in plaintext for PLESTY clients on tcp://127.0.0.1:{plaintext}"
            " (observer: read only).",
            "",
            "In another terminal:",
            f"  export LABMESH_DISCOVERY={demo.endpoint}",
            f"  export LABMESH_DISCOVERY_KEY='{demo.discovery_key}'",
            f"  export LABMESH_KEY={demo.keys / 'operator.key_secret'}",
            "  labmesh ls; labmesh set pm100-a WAVELENGTH 1064; labmesh get pm100-a POWER",
            f"  LABMESH_KEY={demo.keys / 'observer.key_secret'} labmesh set pm100-a "
            "WAVELENGTH 800   # PermissionError",
            f"  labmesh audit {demo.workdir / 'audit-optics-pc.jsonl'} --follow",
            "",
            "Ctrl+C stops the lab.",
        ]
        return "\n".join(lines)
    lines += [
        "",
        "In another terminal:",
        f"  export LABMESH_DISCOVERY={demo.endpoint}",
        "  labmesh ls; labmesh get pm100-a POWER; labmesh locks; labmesh watch",
        "",
        "or in Python:",
        "  from labmesh import build_client",
        f'  pm = build_client("pm100-a", discovery="{demo.endpoint}")',
        '  pm.write("WAVELENGTH", 1064); pm.query("POWER")',
        f'  daq = build_client("daq-1", discovery="{demo.endpoint}", resources="Dev1/port0/line0",',
        '                      connect_kwargs={"name": "my-experiment"})',
        '  daq.write_line("Dev1/port0/line0", True)   # others now get ResourceLockedError',
        f'  stage = build_client("stage", discovery="{demo.endpoint}"); stage.move_abs("x", 20)',
        "",
        "Ctrl+C stops the lab.",
    ]
    return "\n".join(lines)


def run(
    base_port: int,
    metrics_port: int,
    prometheus: bool,
    wait: threading.Event | None = None,
    secure: bool = False,
) -> int:
    """Start, print, serve until a signal (or `wait` is set), restarting a host that crashes,
    stop. 0, or 1 when a host kept crashing (its log is kept: the message says where)."""
    t0 = time.monotonic()
    with stop_signals() as signalled:  # (from before the first process starts)
        demo = start(base_port, metrics_port, secure=secure)
        healthy = True
        try:
            if prometheus:
                start_prometheus(demo)
            print(banner(demo), flush=True)
            print(f"(ready in {time.monotonic() - t0:.1f} s)", flush=True)
            if wait is not None:
                while not wait.wait(0.5) and not signalled.is_set() and healthy:
                    healthy = supervise(demo)
            else:
                healthy = wait_for_signal(lambda: supervise(demo), stop=signalled)
        finally:
            stop(demo, keep_workdir=not healthy)
    print("labmesh demo: stopped", flush=True)
    return 0 if healthy else 1
