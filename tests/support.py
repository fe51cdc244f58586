"""Shared test devices and helpers: real servers on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from labmesh import Device, Parameter, build_server, operation
from labmesh.server import DeviceServer


def on_ci() -> bool:
    """True when the tests run on CI: any non-empty `CI` (CI=1, CI=yes, CI=true all count)."""
    return bool(os.environ.get("CI", "").strip())


def unavailable(reason: str, *, module: bool = False) -> None:
    """Skip because something the test needs is missing or not working; on CI fail instead.

    A broken CI image must not pass by skipping. `module=True` skips (or fails) the whole module
    when called at import time.
    """
    if on_ci():
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def run_labmesh(
    *args: str,
    env: dict | None = None,
    unset: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:
    """Run the `labmesh` command as a user would, in a fresh interpreter, and capture its output.

    `env` adds to (or overrides) this process's environment and `unset` removes variables, e.g.
    `LABMESH_DISCOVERY` for a newcomer who has configured nothing. stdin is empty, like CI's.
    """
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "labmesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def note_disconnect(path: str, name: str) -> None:
    """Append `name` to the file `path` (if set): how a device served by another process (a
    `labmesh serve` subprocess) shows the test that it was disconnected."""
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(name + "\n")


class MemoryMeter(Device):
    """An in-memory power meter used across tests."""

    kind = "powermeter"
    resources = {"Dev1": {"port0": ["line0", "line1"], "port1": ["line0"]}}

    WAVELENGTH = Parameter(float, unit="nm", min=400.0, max=1100.0, description="laser line")
    POWER = Parameter(float, unit="W", read_only=True, description="measured power")
    AVERAGING = Parameter(int, min=1, max=1000)
    MODE = Parameter(str, options=("CW", "PULSED"))
    AUTORANGE = Parameter(bool)
    TRIGGER = Parameter(bool, write_only=True)

    def __init__(self, name: str = "meter", disconnect_log: str = "") -> None:
        super().__init__(name)
        self.disconnect_log = disconnect_log
        self.values = {
            "WAVELENGTH": 532.0,
            "POWER": 0.001,
            "AVERAGING": 10,
            "MODE": "CW",
            "AUTORANGE": True,
        }
        self.active = 0
        self.max_active = 0
        self.threads: set[str] = set()
        self._guard = threading.Lock()
        self.disconnected = False

    def disconnect(self) -> None:
        self.disconnected = True
        note_disconnect(self.disconnect_log, self.name)

    def _query_(self, name: str):
        self.threads.add(threading.current_thread().name)
        return self.values[name]

    def _write_(self, name: str, value) -> bool:
        self.threads.add(threading.current_thread().name)
        self.values[name] = value
        return True

    @operation(budget_s=5)
    def sleep(self, seconds: float = 0.1) -> float:
        """Hold the device for `seconds`, counting overlapping calls."""
        self.threads.add(threading.current_thread().name)
        with self._guard:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(seconds)
        finally:
            with self._guard:
                self.active -= 1
        return seconds

    @operation
    def add(self, a: float, b: float = 1.0) -> float:
        """Add two numbers."""
        return a + b

    @operation
    def fail(self, message: str = "boom") -> None:
        """Raise a RuntimeError."""
        raise RuntimeError(message)

    @operation
    def exit(self, code: int = 3) -> None:
        """Raise SystemExit inside the device call."""
        raise SystemExit(code)

    @operation
    def unencodable(self) -> object:
        """Return something JSON cannot carry."""
        return {1, 2, 3}

    def not_exposed(self) -> str:
        return "secret"


class UnpluggedMeter(MemoryMeter):
    """A meter whose instrument is unplugged until the file `plugged_in` exists: opening it
    fails the way a missing USB instrument does (the host retries it with backoff)."""

    def __init__(self, name: str = "meter", plugged_in: str = "") -> None:
        super().__init__(name)
        self.plugged_in = plugged_in

    def connect(self) -> None:
        if not self.plugged_in or not os.path.exists(self.plugged_in):
            raise ConnectionError(f"{self.name}: no instrument answers (unplugged?)")


def serve(device: Device | None = None, **options) -> DeviceServer:
    options.setdefault("address", "tcp://127.0.0.1:0")
    return build_server(device or MemoryMeter(), **options).start()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class MemoryDaq(Device):
    """An in-memory DAQ card: one lockable resource per digital line and per analog output."""

    kind = "daq"
    resources = {"Dev1": {"port0": ["line0", "line1"], "port1": ["line0"], "ao0": None}}

    AO0 = Parameter(float, unit="V", min=-10, max=10, resources=["Dev1/ao0"])
    LABEL = Parameter(str)

    def __init__(self, name: str = "daq", disconnect_log: str = "") -> None:
        super().__init__(name)
        self.disconnect_log = disconnect_log
        self.lines: dict[str, bool] = {}
        self.values = {"AO0": 0.0, "LABEL": ""}

    def disconnect(self) -> None:
        note_disconnect(self.disconnect_log, self.name)

    def _query_(self, name: str):
        return self.values[name]

    def _write_(self, name: str, value) -> bool:
        self.values[name] = value
        return True

    @operation(resources=["{line}"])
    def write_line(self, line: str, value: bool) -> bool:
        """Drive one digital line."""
        self.lines[line] = value
        return value

    @operation(idempotent=True, resources=())
    def read_line(self, line: str) -> bool:
        """Read one digital line (touches nothing)."""
        return self.lines.get(line, False)

    @operation
    def reset_card(self) -> None:
        """Touches the whole card."""
        self.lines.clear()

    @operation(budget_s=10, resources=())
    def hold(self, seconds: float) -> float:
        """Keep the card busy (touches no resource)."""
        time.sleep(seconds)
        return seconds

    @operation
    def granted(self, resources=None) -> list:
        """What the server passes as the caller's resources (PLESTY style)."""
        return resources


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, predicate, timeout: float, interval: float = 0.2):
    """The first truthy value of `predicate()` (an OSError, ValueError or KeyError counts as
    not yet), or AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_json(url: str, timeout: float = 5.0):
    """GET `url` and decode its JSON body."""
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def free_base(span: int = 8) -> int:
    """A base port with `span` free ports after it, below the ephemeral range (so client
    connections made meanwhile cannot take them)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        socks = []
        try:
            for port in range(base, base + span):
                sock = socket.socket()
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


@contextlib.contextmanager
def running_demo(*extra: str, ready_within_s: float = 30.0):
    """`labmesh demo` (with `extra` flags) on free ports, as a subprocess of this test: yields
    {proc, banner (lines up to "(ready in ...)"), base, endpoint}; Ctrl+C (SIGINT) at the end,
    by its PID, then a kill if it overruns."""
    base, metrics = free_base(10), free_base(2)
    argv = [sys.executable, "-m", "labmesh.cli", "demo", "--base-port", str(base)]
    proc = subprocess.Popen(
        [*argv, "--metrics-port", str(metrics), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    banner: list[str] = []
    try:
        deadline = time.monotonic() + ready_within_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line.rstrip())
            if line.startswith("(ready in"):
                break
        assert banner and banner[-1].startswith("(ready in"), banner
        yield {"proc": proc, "banner": banner, "base": base, "endpoint": f"tcp://127.0.0.1:{base}"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
