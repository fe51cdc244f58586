"""`labmesh serve` as a real subprocess: several devices, locks between two clients, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from labmesh import RemoteError, build_client, build_server

from support import MemoryMeter, free_port, wait_until

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]


def start_serve(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "serve", str(config), "--bind", "127.0.0.1", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 20) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} not seen; output:\n" + "\n".join(lines))


def test_serve_two_devices_one_failing_locks_and_sigterm(tmp_path):
    daq_port, meter_port, broken_port, metrics_port = (free_port() for _ in range(4))
    disconnected = tmp_path / "disconnected.log"  # each served device writes its name there
    config = tmp_path / "host.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        host: test-host
        metrics_port: {metrics_port}
        devices:
          - name: daq
            driver: support:MemoryDaq
            port: {daq_port}
            options: {{disconnect_log: {disconnected}}}
          - name: meter
            driver: support:MemoryMeter
            port: {meter_port}
            fixed_threading: false
            options: {{disconnect_log: {disconnected}}}
          - name: broken
            driver: support:UnpluggedMeter
            port: {broken_port}
            options: {{plugged_in: {tmp_path / "never"}}}
        """)
    )
    proc = start_serve(config)
    try:
        out = read_until(proc, "Ctrl+C stops")
        text = "\n".join(out)
        assert f"tcp://127.0.0.1:{daq_port}" in text and "serving" in text
        assert "broken" in text and "retrying" in text and "unplugged?" in text
        a = build_client(
            f"tcp://127.0.0.1:{daq_port}", resources="Dev1/port0", connect_kwargs={"name": "exp-A"}
        )
        b = build_client(f"tcp://127.0.0.1:{daq_port}", connect_kwargs={"name": "exp-B"})
        try:
            assert a.write_line("Dev1/port0/line1", True) is True
            with pytest.raises(RemoteError, match=r"held by .*\(exp-A\)"):
                b.write_line("Dev1/port0/line1", False)
            assert b.write_line("Dev1/port1/line0", True) is True
        finally:
            a.close()
            b.close()
        with build_client(f"tcp://127.0.0.1:{meter_port}") as meter:
            assert meter.query("WAVELENGTH") == 532.0
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        text = scraped.decode()
        assert 'labmesh_device_up{device="daq"} 1.0' in text
        assert 'labmesh_device_up{device="broken"} 0.0' in text  # configured, not served
        assert "labmesh_discovery_" not in text  # an instrument host is no discovery service
        assert (
            'labmesh_request_duration_seconds_count{device="meter",operation="WAVELENGTH"'
            ',status="ok",type="query"} 1.0' in text
        )
        assert (
            'labmesh_request_errors_total{device="daq",error="ResourceLockedError",'
            'type="call"} 1.0' in text
        )
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        rest = proc.stdout.read()
        assert "labmesh serve: stopped" in rest
        # SIGTERM disconnected every device that was served, each once (broken never opened),
        # and no device's port is still listening
        names = disconnected.read_text().split() if disconnected.exists() else []
        assert sorted(names) == ["daq", "meter"], rest
        for port in (daq_port, meter_port, broken_port, metrics_port):
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_retries_a_device_that_cannot_open(tmp_path):
    port = free_port()
    plug = tmp_path / "plugged-in"
    config = tmp_path / "host.yaml"
    config.write_text(
        f"metrics_port: null\ndevices:\n  - {{name: meter, driver: 'support:UnpluggedMeter', "
        f"port: {port}, options: {{plugged_in: '{plug}'}}}}\n"
    )
    proc = start_serve(config)
    try:
        out = read_until(proc, "Ctrl+C stops")
        assert any("retrying" in line for line in out), out
        plug.write_text("")  # plugged in: the next attempt (after backoff) succeeds
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with build_client(f"tcp://127.0.0.1:{port}", timeout=500, retries=0) as c:
                    assert c.query("WAVELENGTH") == 532.0
                    break
            except TimeoutError:
                time.sleep(0.2)
        else:
            raise AssertionError("device never came up after it was plugged in")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_config_error_is_one_line_with_exit_code_2(tmp_path):
    config = tmp_path / "host.yaml"
    config.write_text("devices:\n  - name: a\n    driver: motor\n    port: abc\n")
    result = subprocess.run(
        [sys.executable, "-m", "labmesh.cli", "serve", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"labmesh: {config}:4: devices[0].port: expected a TCP port number 1-65535, got 'abc'"
    )


SLOW_CONNECT = textwrap.dedent("""
    import asyncio, sys, time
    from labmesh import Device, build_server

    class Slow(Device):
        def connect(self):
            print("CONNECTING", flush=True)
            time.sleep(1.5)

        def disconnect(self):
            print("DISCONNECTED", flush=True)

    async def main():
        await build_server(Slow(), address="tcp://127.0.0.1:0").run()

    asyncio.run(main())
    print("EXITED", flush=True)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_await_run_stops_cleanly_on_a_signal_even_while_connecting(sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONNECT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "CONNECTING"
        time.sleep(0.3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out.split() == ["DISCONNECTED", "EXITED"]
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_seed_example_stops_on_sigterm_with_device_disconnected():
    example = TESTS.parent / "examples" / "seed_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(example), "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        address = line.split(" on ")[1].strip()
        with build_client(address) as c:
            assert c.write("WAVELENGTH", 1064) is True
            assert c.query("WAVELENGTH") == 1064.0
            assert c.zero() == 0.001
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_the_shared_daq_example_simulated_with_two_experiments(tmp_path):
    """The seed's second scenario from the shipped example file, with --sim."""
    text = (TESTS.parent / "examples" / "hosts" / "shared-daq.yaml").read_text()
    ports = {old: free_port() for old in (5556, 5557, 5558)}
    for old, new in ports.items():
        text = text.replace(f"port: {old}", f"port: {new}")
    text = text.replace("bind:", f"metrics_port: {free_port()}\nbind:")
    config = tmp_path / "shared-daq.yaml"
    config.write_text(text)
    proc = start_serve(config, "--sim")
    try:
        read_until(proc, "Ctrl+C stops")
        daq = f"tcp://127.0.0.1:{ports[5556]}"
        a = build_client(daq, resources="Dev1/port0/line0", connect_kwargs={"name": "exp-A"})
        b = build_client(daq, resources="Dev1/port0/line1", connect_kwargs={"name": "exp-B"})
        try:
            assert a.write_line("Dev1/port0/line0", True) is True
            assert b.write_line("Dev1/port0/line1", True) is True
            with pytest.raises(RemoteError, match=r"held by .*\(exp-A\)"):
                b.write_line("Dev1/port0/line0", False)
            assert a.read_line("Dev1/port0/line1") is True  # reads stay open
        finally:
            a.close()
            b.close()
        with build_client(f"tcp://127.0.0.1:{ports[5557]}") as stage:
            assert stage.move_abs("x", 5.0) == 5.0
        with build_client(f"tcp://127.0.0.1:{ports[5558]}") as psu:
            assert psu.write("VOLTAGE", 3.3) is True
            assert psu.query("VOLTAGE") == 3.3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_the_pm100_example_simulated(tmp_path):
    port = free_port()
    text = (TESTS.parent / "examples" / "hosts" / "pm100.yaml").read_text()
    config = tmp_path / "pm100.yaml"
    text = text.replace("bind:", f"metrics_port: {free_port()}\nbind:")
    config.write_text(text.replace("port: 5555", f"port: {port}"))
    proc = start_serve(config, "--sim")
    try:
        read_until(proc, "Ctrl+C stops")
        with build_client(f"tcp://127.0.0.1:{port}") as client:
            assert client.query("WAVELENGTH") > 0
            assert client.write("WAVELENGTH", 1064) is True
            assert client.query("WAVELENGTH") == 1064.0
            assert isinstance(client.query("POWER"), float)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_answers_laplace_clients_when_the_host_file_asks(tmp_path):
    import json

    import zmq

    port = free_port()
    config = tmp_path / "host.yaml"
    config.write_text(
        f"metrics_port: null\ndevices:\n  - name: stage\n    driver: motor\n    port: {port}\n"
        "    sim: true\n    options: {axes: [x, y]}\n    laplace: {}\n"
    )
    proc = start_serve(config)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        read_until(proc, "Ctrl+C stops")
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(
            json.dumps(
                {"version": "0.2.2", "cmd": "INFO", "from": "master", "to": "stage", "payload": {}}
            ).encode()
        )
        info = json.loads(sock.recv())
        assert info["error_msg"] is None and info["payload"]["freedom"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_health_is_liveness_and_ready_reflects_an_unplugged_instrument(tmp_path):
    """Issue 19: health checks looked at /metrics only, so a host whose instrument is
    unplugged reported healthy. /health answers while the process does; /ready is 503 and
    names the device until it is served."""
    import json
    import urllib.error

    port, metrics_port = free_port(), free_port()
    plug = tmp_path / "plugged-in"
    config = tmp_path / "host.yaml"
    config.write_text(
        f"host: rig-7\nbind: 127.0.0.1\nmetrics_port: {metrics_port}\ndevices:\n"
        f"  - {{name: stage, driver: motor, port: {free_port()}, sim: true}}\n"
        f"  - {{name: meter, driver: 'support:UnpluggedMeter', port: {port}, "
        f"options: {{plugged_in: '{plug}'}}}}\n"
    )

    def get(path: str) -> tuple[int, dict | bytes]:
        url = f"http://127.0.0.1:{metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                body = reply.read()
                status = reply.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        return status, (json.loads(body) if path in ("/health", "/ready") else body)

    proc = start_serve(config)
    try:
        read_until(proc, "Ctrl+C stops")
        assert get("/health") == (200, {"status": "alive"})
        status, report = get("/ready")
        assert status == 503
        assert report["ready"] is False and report["down"] == ["meter"]
        assert report["devices"]["stage"] == {"up": True, "state": "serving"}
        assert report["devices"]["meter"]["state"] == "retrying"
        assert "unplugged?" in report["devices"]["meter"]["error"]
        status, text = get("/metrics")
        assert status == 200 and b'labmesh_device_up{device="meter"} 0.0' in text
        plug.write_text("")  # plugged in: the next attempt (after backoff) serves it
        assert wait_until(lambda: get("/ready")[0] == 200, timeout=15)
        assert get("/ready")[1]["devices"]["meter"] == {"up": True, "state": "serving"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_stop_while_the_server_is_still_starting_its_threads(monkeypatch):
    """SIGTERM can land while the device thread already serves and the standby thread is not
    started yet (a loaded machine): stop() must wait for it instead of failing with "cannot
    join thread before it is started" (the seed example's `Future exception was never
    retrieved` at exit)."""
    standby_starting = threading.Event()
    real_start = threading.Thread.start

    def slow_standby_start(thread: threading.Thread) -> None:
        if thread.name.startswith("standby:"):
            standby_starting.set()
            time.sleep(0.3)  # the scheduler looks elsewhere
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", slow_standby_start)
    server = build_server(MemoryMeter("meter"), address="tcp://127.0.0.1:0")
    starting = threading.Thread(target=server.start, name="starter")
    real_start(starting)
    assert standby_starting.wait(10)
    server.stop()  # raised RuntimeError before
    starting.join(10)
    assert not starting.is_alive()
    assert server.wait_stopped(5) and not server.running
