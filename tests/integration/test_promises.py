"""Promises of the README and docs that no test held (issue 20, "Untested promises").

- re-sends: `@operation(idempotent=True)` calls are sent again after a timeout (up to
  1 + `retries` times), other calls never (docs/client.md);
- the command line: exit 130 on Ctrl+C, `ls` exits 1 when a device is down, `--debug` shows
  tracebacks (README, "Command line");
- LAPLACE STOP: refused by default, honoured with `allow_stop` (`LaplaceAdapter(allow_stop=...)`,
  or `laplace: {allow_stop: ...}` in a host file) (docs/protocol.md);
- SIGTERM on `labmesh serve` disconnects every device.

The `Recorder` driver below is loaded by `labmesh serve` subprocesses as `test_promises:Recorder`
(this folder is on their PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from labmesh import Device, Parameter, build_async_client, build_client, operation
from labmesh.config import parse_host_config
from labmesh.drivers.motor import MotorStage
from labmesh.host import HostServer
from labmesh.laplace import LaplaceAdapter
from labmesh.protocol import laplace as env
from labmesh.server import DeviceServer

from support import MemoryMeter, free_port, serve, wait_until
from support import run_labmesh as run_cli

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
#: Bounds on a loaded 2-core machine: a CLI subprocess's start, and a process's exit.
START_S = 30.0
EXIT_S = 15.0


# ---- drivers ------------------------------------------------------------------------------
class Recorder(Device):
    """A device that leaves `<markers>/<name>.connecting`, `.connected` and `.disconnected`
    files behind (connect takes `connect_s` and disconnect `disconnect_s`, as opening and
    closing a real instrument do)."""

    kind = "recorder"
    LEVEL = Parameter(float, description="a number")

    def __init__(
        self,
        name: str = "recorder",
        markers: str = "",
        disconnect_s: float = 0.0,
        connect_s: float = 0.0,
    ):
        super().__init__(name)
        self.markers = markers
        self.disconnect_s = float(disconnect_s)
        self.connect_s = float(connect_s)
        self.values = {"LEVEL": 1.0}

    def connect(self) -> None:
        self._mark("connecting")
        time.sleep(self.connect_s)
        self._mark("connected")

    def disconnect(self) -> None:
        time.sleep(self.disconnect_s)
        self._mark("disconnected")

    def _mark(self, what: str) -> None:
        if self.markers:
            Path(self.markers, f"{self.name}.{what}").write_text(str(os.getpid()))

    def _query_(self, name: str) -> Any:
        return self.values[name]

    def _write_(self, name: str, value: Any) -> bool:
        self.values[name] = value
        return True


class Flaky(Device):
    """Operations that are slow once (when named in `slow`) and count their invocations."""

    kind = "counter"
    LEVEL = Parameter(float)

    def __init__(self, slow_s: float) -> None:
        super().__init__("flaky")
        self.slow_s = slow_s
        self.slow: set[str] = set()
        self.calls = {"safe": 0, "unsafe": 0}

    def _query_(self, name: str) -> Any:
        return 1.0

    def _run(self, name: str) -> int:
        self.calls[name] += 1
        n = self.calls[name]
        if name in self.slow:
            self.slow.discard(name)
            time.sleep(self.slow_s)
        return n

    @operation(idempotent=True, resources=())
    def safe(self) -> int:
        """Idempotent: its invocation number."""
        return self._run("safe")

    @operation(resources=())
    def unsafe(self) -> int:
        """Not idempotent: its invocation number."""
        return self._run("unsafe")


# ---- subprocess helpers -------------------------------------------------------------------
def _default_sigint() -> None:
    # a runner started in the background by a non-interactive shell ignores SIGINT, and an
    # ignored signal stays ignored across exec: give the child Python's normal Ctrl+C
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A `labmesh` subprocess whose output lines are collected by threads (bounded waits)."""

    def __init__(self, *args: str, extra_env: dict[str, str] | None = None) -> None:
        child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(TESTS)])}
        child_env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labmesh.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
            preexec_fn=_default_sigint,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out, True)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err, False)),
        ]
        for pump in self._pumps:
            pump.daemon = True
            pump.start()

    def _pump(self, stream: Any, lines: list[str], announce: bool) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if announce:
                self._lines.put(line)
        if announce:
            self._lines.put(None)

    def wait_line(self, needle: str, timeout: float = START_S) -> str:
        """The first stdout line containing `needle` (fails after `timeout` s or at exit)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no line with {needle!r} within {timeout} s:\n{self.text}")
            if needle in line:
                return line

    def wait(self, timeout: float = EXIT_S) -> int:
        code = self.proc.wait(timeout)
        for pump in self._pumps:
            pump.join(5)
        return code

    @property
    def text(self) -> str:
        return "stdout:\n" + "\n".join(self.out) + "\nstderr:\n" + "\n".join(self.err)

    def end(self) -> None:
        """Kill it by its PID if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def spawn() -> Iterator[Any]:
    started: list[Child] = []

    def start(*args: str, extra_env: dict[str, str] | None = None) -> Child:
        child = Child(*args, extra_env=extra_env)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.end()


# ---- 2. re-sends: idempotent operations only ----------------------------------------------
#: The client waits WAIT_MS per attempt; a slow invocation takes SLOW_S (between one and two
#: waits, so the re-sent call, queued behind it, is answered within the second wait).
WAIT_MS = 1500
SLOW_S = 2.0


@pytest.fixture
def flaky() -> Iterator[DeviceServer]:
    server = serve(Flaky(SLOW_S))
    try:
        yield server
    finally:
        server.stop()


def test_an_idempotent_call_is_sent_again_after_a_timeout(flaky: DeviceServer) -> None:
    device: Flaky = flaky.device
    with build_client(flaky.address, timeout=WAIT_MS) as client:
        assert "safe" in client.description["idempotent"]
        assert "unsafe" not in client.description["idempotent"]
        device.slow = {"safe"}
        # the first invocation's reply came too late: the answer is the re-sent call's
        assert client.safe() == 2
        assert device.calls["safe"] == 2


def test_a_call_not_declared_idempotent_is_sent_once(flaky: DeviceServer) -> None:
    device: Flaky = flaky.device
    with build_client(flaky.address, timeout=WAIT_MS) as client:
        device.slow = {"unsafe"}
        with pytest.raises(TimeoutError, match="call unsafe within 1500 ms") as timed_out:
            client.unsafe()
        assert "sent" not in str(timed_out.value)  # "(sent N times)" only for re-sends
        # a query waits behind device calls: once it is answered, a re-sent call would have run
        assert client.query("LEVEL", timeout=SLOW_S * 3) == 1.0
        assert device.calls["unsafe"] == 1


def test_retries_zero_sends_an_idempotent_call_once(flaky: DeviceServer) -> None:
    device: Flaky = flaky.device
    with build_client(flaky.address, timeout=WAIT_MS, retries=0) as client:
        device.slow = {"safe"}
        with pytest.raises(TimeoutError, match="call safe"):
            client.safe()
        assert client.query("LEVEL", timeout=SLOW_S * 3) == 1.0
        assert device.calls["safe"] == 1


def test_async_client_follows_the_same_re_send_rules(flaky: DeviceServer) -> None:
    device: Flaky = flaky.device

    async def scenario() -> None:
        client = await build_async_client(flaky.address, timeout=WAIT_MS)
        try:
            device.slow = {"safe"}
            assert await client.safe() == 2
            device.slow = {"unsafe"}
            with pytest.raises(TimeoutError, match="call unsafe"):
                await client.unsafe()
            assert await client.query("LEVEL", timeout=SLOW_S * 3) == 1.0
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert device.calls == {"safe": 2, "unsafe": 1}


# ---- 3. Ctrl+C: exit status 130 -----------------------------------------------------------
def test_ctrl_c_ends_monitor_with_130(spawn: Any) -> None:
    server = serve(MemoryMeter("pm"))
    try:
        child = spawn("monitor", server.address, "POWER")
        child.wait_line("POWER")  # subscribed: the current value is printed
        child.proc.send_signal(signal.SIGINT)  # our own child, by its PID
        assert child.wait() == 130, child.text
        assert "Traceback" not in child.text
    finally:
        server.stop()


def test_ctrl_c_ends_a_blocking_call_with_130(spawn: Any) -> None:
    meter = MemoryMeter("pm")
    server = serve(meter)
    try:
        child = spawn("call", server.address, "sleep", "4")
        assert wait_until(lambda: meter.active == 1, timeout=START_S), child.text
        started = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        assert child.wait() == 130, child.text
        assert time.monotonic() - started < 3.5  # not after the 4 s call ended
        assert "Traceback" not in child.text
    finally:
        server.stop()


def test_ctrl_c_ends_a_task_call_with_130_and_stops_the_task(spawn: Any) -> None:
    stage = MotorStage(("x",), speed=5.0, limits={"x": (0, 100)}, name="slowstage")
    server = serve(stage)
    try:
        child = spawn("call", server.address, "move_abs", "x", "80")
        with build_client(server.address) as observer:
            assert wait_until(lambda: observer.ping()["task"] is not None, timeout=START_S)
            child.proc.send_signal(signal.SIGINT)
            assert child.wait() == 130, child.text
            assert "interrupted; stopped task" in child.text
            assert observer.ping()["task"] is None
            assert observer.query("x/position") < 80
    finally:
        server.stop()


# ---- 4. `labmesh ls` exits 1 when a device is down --------------------------------------------
def test_ls_exits_1_when_a_registered_device_is_down() -> None:
    from labmesh.discovery import DeviceRecord, DiscoveryService, Registrar

    discovery = DiscoveryService(
        "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", http_host="127.0.0.1", http_port=0, beacon=None
    ).start()
    up, gone = serve(MemoryMeter("meter-up")), serve(MemoryMeter("meter-gone"))
    registrar = Registrar([discovery.address], timeout_s=1.0).start()
    try:
        for server in (up, gone):
            registrar.add(
                DeviceRecord(
                    name=server.name,
                    address=server.address,
                    instance=f"i-{server.name}",
                    kind="powermeter",
                    host="pc-1",
                )
            )
        assert wait_until(lambda: len(discovery.devices()) == 2, timeout=10)
        common = ("--discovery", discovery.address, "--timeout", "1500")
        both = run_cli(*common, "ls")
        assert both.returncode == 0, both.stdout + both.stderr
        gone.stop()  # its server is gone; its record stays (the host still heartbeats)
        table = run_cli(*common, "ls")
        assert table.returncode == 1, table.stdout + table.stderr
        rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
        assert rows["meter-gone"][4] == "NO" and rows["meter-up"][4] == "yes", table.stdout
        listed = run_cli(*common, "--json", "ls")
        assert listed.returncode == 1, listed.stdout + listed.stderr  # --json: same exit code
        up_by_name = {r["name"]: r["up"] for r in json.loads(listed.stdout)}
        assert up_by_name == {"meter-up": True, "meter-gone": False}
    finally:
        registrar.stop(2.0)
        up.stop()
        gone.stop()
        discovery.stop()


# ---- 5. `--debug` shows tracebacks ---------------------------------------------------------
def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labmesh: "), result.stderr
    return lines[0]


def _traceback(result: subprocess.CompletedProcess, last_line: str) -> None:
    assert "Traceback (most recent call last):" in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == last_line, result.stderr


@pytest.mark.parametrize("case", ["timeout", "device error", "discovery down"])
def test_debug_adds_the_traceback_to_the_one_line_error(case: str) -> None:
    server = serve(MemoryMeter("pm"))
    nobody = f"tcp://127.0.0.1:{free_port()}"
    try:
        args = {
            "timeout": ("get", nobody, "POWER", "--timeout", "300"),
            "device error": ("get", server.address, "NOPE"),
            "discovery down": ("--discovery", nobody, "get", "some-device", "POWER"),
        }[case]
        plain = run_cli(*args)
        assert plain.returncode == 1, plain.stderr
        line = _one_line(plain)
        assert "Traceback" not in plain.stderr
        debug = run_cli("--debug", *args)
        assert debug.returncode == 1, debug.stderr  # the same exit code
        _traceback(debug, line)
    finally:
        server.stop()


def test_debug_keeps_the_usage_exit_code(tmp_path: Path) -> None:
    config = tmp_path / "host.yaml"
    config.write_text("devices:\n  - {name: x, driver: 'nosuch.module:Nope', port: 1}\n")
    plain = run_cli("serve", str(config))
    assert plain.returncode == 2 and "nosuch" in _one_line(plain)
    debug = run_cli("--debug", "serve", str(config))
    assert debug.returncode == 2, debug.stderr
    _traceback(debug, _one_line(plain))


# ---- 7. LAPLACE STOP: refused by default, honoured with allow_stop -------------------------
def laplace_ask(address: str, cmd: str, timeout_ms: int = 5000) -> dict[str, Any] | None:
    """One LAPLACE request on a fresh REQ socket; None when no reply came in time."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(json.dumps(env.request(cmd, None, sender="Master", target="Unknown")).encode())
        if not sock.poll(timeout_ms):
            return None
        return json.loads(sock.recv())
    finally:
        sock.close()


def _refused(reply: dict[str, Any] | None) -> None:
    assert reply is not None and reply["cmd"] == "STOP", reply
    assert reply["msg"] == "Error encountered."
    assert reply["error_msg"].startswith("STOP refused: this server does not take a remote STOP")


@pytest.mark.parametrize("options", [{}, {"allow_stop": False}], ids=["default", "false"])
def test_laplace_stop_is_refused_unless_allowed(options: dict[str, Any], tmp_path: Path) -> None:
    device = Recorder("cam", markers=str(tmp_path))
    server = DeviceServer(
        device, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter(**options)
    ).start()
    try:
        _refused(laplace_ask(server.address, "STOP"))
        assert "STOP" not in laplace_ask(server.address, "INFO")["payload"]["capabilities"]
        time.sleep(0.3)  # (an honoured STOP stops the server 0.1 s after its reply)
        assert server.running
        assert laplace_ask(server.address, "PING")["error_msg"] is None
        with build_client(server.address, timeout=5000) as client:
            assert client.query("LEVEL") == 1.0
        assert not (tmp_path / "cam.disconnected").exists()
    finally:
        server.stop()
    assert (tmp_path / "cam.disconnected").exists()


def test_laplace_stop_stops_the_server_when_allowed(tmp_path: Path) -> None:
    device = Recorder("cam", markers=str(tmp_path))
    server = DeviceServer(
        device, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter(allow_stop=True)
    ).start()
    try:
        assert "STOP" in laplace_ask(server.address, "INFO")["payload"]["capabilities"]
        reply = laplace_ask(server.address, "STOP")
        assert reply is not None and reply["error_msg"] is None, reply
        assert wait_until(lambda: not server.running, timeout=10)
        assert (tmp_path / "cam.disconnected").exists()  # stopped cleanly: device closed
        assert laplace_ask(server.address, "PING", timeout_ms=500) is None
    finally:
        server.stop()


def _host_file(
    tmp_path: Path, devices: list[dict[str, Any]], metrics_port: int | None = None
) -> Path:
    metrics = "null" if metrics_port is None else str(metrics_port)
    lines = ["host: promises-host", "bind: 127.0.0.1", f"metrics_port: {metrics}", "devices:"]
    for device in devices:
        lines.append("  - " + json.dumps(device))  # JSON is YAML
    config = tmp_path / "host.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.mark.parametrize("allow_stop", [False, True], ids=["refused", "allowed"])
def test_laplace_stop_through_labmesh_serve(allow_stop: bool, tmp_path: Path, spawn: Any) -> None:
    cam_port, other_port, metrics_port = free_port(), free_port(), free_port()
    markers = str(tmp_path)
    config = _host_file(
        tmp_path,
        [
            {
                "name": "cam",
                "driver": "test_promises:Recorder",
                "port": cam_port,
                "options": {"markers": markers},
                "laplace": {"allow_stop": allow_stop},
            },
            {
                "name": "other",
                "driver": "test_promises:Recorder",
                "port": other_port,
                "options": {"markers": markers},
            },
        ],
        metrics_port=metrics_port,
    )
    host = spawn("serve", str(config))
    host.wait_line("Ctrl+C stops")
    cam, other = f"tcp://127.0.0.1:{cam_port}", f"tcp://127.0.0.1:{other_port}"
    assert _ready(metrics_port) == (200, [])
    stopped = laplace_ask(cam, "STOP")
    if allow_stop:
        assert stopped is not None and stopped["error_msg"] is None, stopped
        assert wait_until(lambda: (tmp_path / "cam.disconnected").exists(), timeout=10)
        assert laplace_ask(cam, "PING", timeout_ms=500) is None  # that server is gone
        # the host says so: /ready names the stopped device and who stopped it
        assert wait_until(lambda: _ready(metrics_port)[0] == 503, timeout=10)
        code, down, report = _ready(metrics_port, full=True)
        assert code == 503 and down == ["cam"], report
        row = report["devices"]["cam"]
        assert row["state"] == "stopped", row
        assert row["error"].startswith("stopped by a LAPLACE STOP from "), row
        assert report["devices"]["other"] == {"up": True, "state": "serving"}, report
    else:
        _refused(stopped)
        time.sleep(0.3)
        assert laplace_ask(cam, "PING")["error_msg"] is None  # still serving
        assert not (tmp_path / "cam.disconnected").exists()
        assert _ready(metrics_port) == (200, [])
    with build_client(other, timeout=5000) as client:  # the host's other device: untouched
        assert client.query("LEVEL") == 1.0
    assert not (tmp_path / "other.disconnected").exists()
    host.proc.send_signal(signal.SIGTERM)
    assert host.wait() == 0, host.text
    assert (tmp_path / "cam.disconnected").exists() and (tmp_path / "other.disconnected").exists()


def _ready(port: int, full: bool = False) -> tuple:
    """`/ready` of a host: (status, the names it reports down) [, the whole report]."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            code, report = response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        code, report = exc.code, json.load(exc)
    down = report.get("down", [])
    return (code, down, report) if full else (code, down)


def test_a_laplace_stop_to_the_only_device_ends_labmesh_serve(tmp_path: Path, spawn: Any) -> None:
    """ServerLHC's process ends on STOP; so does a `labmesh serve` with nothing left to serve."""
    config = _host_file(
        tmp_path,
        [
            {
                "name": "cam",
                "driver": "test_promises:Recorder",
                "port": (port := free_port()),
                "options": {"markers": str(tmp_path)},
                "laplace": {"allow_stop": True},
            }
        ],
    )
    host = spawn("serve", str(config))
    host.wait_line("Ctrl+C stops")
    stopped = laplace_ask(f"tcp://127.0.0.1:{port}", "STOP")
    assert stopped is not None and stopped["error_msg"] is None, stopped
    assert host.wait() == 0, host.text
    assert (tmp_path / "cam.disconnected").exists()
    said = "\n".join(host.out)
    assert "stopped  (stopped by a LAPLACE STOP from " in said, host.text
    assert said.rstrip().endswith("labmesh serve: stopped"), host.text


def test_a_server_that_stops_without_being_asked_is_reported_failed(tmp_path: Path) -> None:
    """Only a peer's request (a LAPLACE STOP) stops a device of a host as "stopped"; a server
    that ended otherwise (its threads died: a bug) is reported "failed", saying what to do,
    withdrawn, and /ready says so; the host keeps serving its other devices."""
    port, other_port = free_port(), free_port()
    text = (
        "host: h\nbind: 127.0.0.1\nmetrics_port: null\naudit: off\ndevices:\n"
        f"  - {{name: stage, driver: motor, port: {port}, options: {{axes: [x]}}}}\n"
        f"  - {{name: other, driver: motor, port: {other_port}, options: {{axes: [y]}}}}\n"
    )
    host = HostServer(parse_host_config(text, "h.yaml"), sim=True).start()
    try:
        assert host.wait_ready(10)
        host.servers()["stage"].stop()  # no stop_reason: nobody asked for it
        assert wait_until(lambda: host.readiness()["devices"]["stage"]["state"] == "failed", 10)
        report = host.readiness()
        assert report["ready"] is False and report["down"] == ["stage"], report
        assert "stopped unexpectedly" in report["devices"]["stage"]["error"], report
        assert "restart `labmesh serve`" in report["devices"]["stage"]["error"], report
        assert not host.finished  # nothing asked the host to end
        with build_client(f"tcp://127.0.0.1:{other_port}", timeout=5000) as client:
            assert client.positions() == {"y": 0.0}
    finally:
        host.stop()


# ---- 8. SIGTERM on `labmesh serve` disconnects every device --------------------------------
def test_sigterm_while_serve_is_still_opening_its_devices_stops_it_cleanly(
    tmp_path: Path, spawn: Any
) -> None:
    """`docker stop` right after `up`: the signal comes while an instrument is still opening.
    It used to kill the process (exit -15, the instrument never closed): the handlers were
    installed only once every device served and the banner was printed."""
    config = _host_file(
        tmp_path,
        [
            {
                "name": "slow",
                "driver": "test_promises:Recorder",
                "port": free_port(),
                "options": {"markers": str(tmp_path), "connect_s": 1.5},
            }
        ],
    )
    host = spawn("serve", str(config))
    assert wait_until(lambda: (tmp_path / "slow.connecting").exists(), timeout=START_S)
    host.proc.send_signal(signal.SIGTERM)
    assert host.wait() == 0, host.text
    assert "labmesh serve: stopped" in host.out, host.text
    assert (tmp_path / "slow.disconnected").exists(), host.text


def test_sigterm_on_serve_disconnects_every_device(tmp_path: Path, spawn: Any) -> None:
    names = ["dev-a", "dev-b", "dev-c"]
    config = _host_file(
        tmp_path,
        [
            {
                "name": name,
                "driver": "test_promises:Recorder",
                "port": free_port(),
                # closing an instrument takes a moment: a shutdown that does not wait for it
                # leaves no marker
                "options": {"markers": str(tmp_path), "disconnect_s": 0.5},
            }
            for name in names
        ],
    )
    host = spawn("serve", str(config))
    host.wait_line("Ctrl+C stops")
    assert all((tmp_path / f"{name}.connected").exists() for name in names)
    assert not any((tmp_path / f"{name}.disconnected").exists() for name in names)
    host.proc.send_signal(signal.SIGTERM)
    assert host.wait() == 0, host.text
    assert "labmesh serve: stopped" in host.out, host.text
    pid = (tmp_path / "dev-a.connected").read_text()
    for name in names:
        marker = tmp_path / f"{name}.disconnected"
        assert marker.exists(), f"{name} was not disconnected:\n{host.text}"
        assert marker.read_text() == pid == str(host.proc.pid)
