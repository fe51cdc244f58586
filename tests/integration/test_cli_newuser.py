"""Issue 16, the new user's path outside a running demo: host files checked completely before
anything is served, ports that cannot be bound, discovery with no setup, the address book,
hints that point the right way, the demo's supervision of its hosts, `labmesh visa list`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labmesh.discovery import DeviceRecord, DiscoveryService, Registrar

from support import MemoryMeter, free_base, run_labmesh, serve

pytestmark = pytest.mark.integration


def run(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """`labmesh` for a newcomer: LABMESH_DISCOVERY unset."""
    return run_labmesh(*args, env=env, unset=("LABMESH_DISCOVERY",), timeout=timeout)


def host_file(tmp_path: Path, devices: str, **top: str) -> Path:
    lines = ["host: test-pc", "bind: 127.0.0.1", "metrics_port: null"]
    lines += [f"{k}: {v}" for k, v in top.items()]
    path = tmp_path / "host.yaml"
    path.write_text("\n".join(lines) + "\ndevices:\n" + textwrap.dedent(devices))
    return path


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "  - {name: stage, driver: motor, port: PORT, options: {sped: 3}}\n",
            "devices[0].options.sped: driver 'motor' takes no option 'sped'; did you mean 'speed'?",
        ),
        (
            "  - {name: pm, driver: powermeter, port: PORT}\n",
            "devices[0]: missing 'resource'",
        ),
        (
            "  - {name: pm, driver: powermeter, port: PORT, resource: USB0::1::2::3::INSTR,"
            " options: {sensor_type: S999C}}\n",
            "unknown Thorlabs sensor head 'S999C'",
        ),
    ],
    ids=["unknown-option", "missing-resource", "unknown-head"],
)
def test_bad_host_files_never_start(tmp_path, device, message):
    port = free_base(1)
    path = host_file(tmp_path, device.replace("PORT", str(port)))
    result = run("serve", str(path), "--sim")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and f"{path}:" in result.stderr
    assert "device(s); Ctrl+C stops" not in result.stdout and "Traceback" not in result.stderr


def test_ports_that_cannot_be_bound_stop_serve_with_exit_2(tmp_path):
    port, metrics = free_base(1), free_base(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        path = host_file(tmp_path, f"  - {{name: stage, driver: motor, port: {port}}}\n")
        result = run("serve", str(path), "--sim", timeout=15)
        assert result.returncode == 2
        assert f"cannot listen on {port} (device stage" in result.stderr
    other = free_base(1)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", metrics))
        taken.listen()
        path = host_file(tmp_path, f"  - {{name: stage, driver: motor, port: {other}}}\n")
        text = path.read_text().replace("metrics_port: null", f"metrics_port: {metrics}")
        path.write_text(text)
        result = run("serve", str(path), "--sim", timeout=15)
        assert result.returncode == 2 and f"{metrics} (metrics_port" in result.stderr
        assert "metrics_port: null turns metrics off" in result.stderr


def test_two_host_files_and_addresses_without_a_scheme_get_the_right_hint(tmp_path):
    two = run("serve", "a.yaml", "b.yaml")
    assert two.returncode == 2 and "serve takes one host file, got 2" in two.stderr
    assert "usage:" not in two.stderr
    port = free_base(1)
    disc = run("discovery", "--address", f"127.0.0.1:{port}", "--no-beacon", timeout=15)
    assert disc.returncode != 0
    assert f"write tcp://127.0.0.1:{port}" in disc.stderr.replace("e.g. ", "write ")
    assert "another server on that port" not in disc.stderr


def test_with_nothing_configured_clients_find_discovery_on_this_machine(tmp_path):
    try:
        service = DiscoveryService(
            "tcp://127.0.0.1:5550", "tcp://127.0.0.1:0", http_port=None
        ).start()
    except OSError:
        pytest.fail("port 5550 on 127.0.0.1 is taken: stop the labmesh demo or discovery there")
    srv = serve(MemoryMeter("meter-local"))
    registrar = Registrar([service.address]).start()
    try:
        registrar.add(DeviceRecord(name="meter-local", address=srv.address, instance=srv.epoch))
        assert registrar.wait_registered(5)
        env = {k: v for k, v in os.environ.items() if k != "LABMESH_DISCOVERY"}
        listed = subprocess.run(
            [sys.executable, "-m", "labmesh.cli", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert listed.returncode == 0, listed.stderr
        assert "meter-local" in listed.stdout
        assert (
            "(discovery: tcp://127.0.0.1:5550 (this machine; LABMESH_DISCOVERY is not set))"
            in listed.stderr
        )
    finally:
        registrar.stop()
        srv.stop()
        service.stop()


def test_a_fresh_process_reaches_a_known_device_while_discovery_is_down(tmp_path):
    book = tmp_path / "addresses.json"
    service = DiscoveryService("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", http_port=None).start()
    srv = serve(MemoryMeter("meter-book"))
    registrar = Registrar([service.address]).start()
    env = {"LABMESH_DISCOVERY": service.address, "LABMESH_ADDRESS_CACHE": str(book)}
    try:
        registrar.add(DeviceRecord(name="meter-book", address=srv.address, instance=srv.epoch))
        assert registrar.wait_registered(5)
        first = run("get", "meter-book", "WAVELENGTH", env=env)
        assert first.returncode == 0 and float(first.stdout) == 532.0
        assert json.loads(book.read_text())["devices"]["meter-book"]["address"] == srv.address
        registrar.stop()
        service.stop()
        again = run("get", "meter-book", "WAVELENGTH", env=env)
        assert again.returncode == 0, again.stderr
        assert float(again.stdout) == 532.0
        assert f"(discovery: the address book {book})" in again.stderr
        never = run("get", "meter-unknown", "WAVELENGTH", env=env)
        assert never.returncode == 1 and "no discovery service answered" in never.stderr
    finally:
        registrar.stop()
        srv.stop()
        service.stop()


def test_the_demo_restarts_a_crashed_host_and_gives_up_after_repeated_crashes():
    from labmesh import demo as lab

    base, metrics = free_base(10), free_base(2)
    running = lab.start(base, metrics)
    try:
        first = running.hosts["optics-pc"]
        first.send_signal(signal.SIGKILL)  # our own child, by its PID
        first.wait(5)
        lines: list[str] = []

        class Out:
            def write(self, text: str) -> None:
                lines.append(text)

            def flush(self) -> None:
                pass

        assert lab.supervise(running, Out()) is True
        said = "".join(lines)
        assert "host optics-pc exited with status -9" in said and "restarting optics-pc" in said
        assert running.hosts["optics-pc"].pid != first.pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if {d["name"] for d in running.discovery.devices()} >= set(lab.DEVICES):
                break
            time.sleep(0.1)
        for _ in range(lab.MAX_CRASHES - 1):
            proc = running.hosts["optics-pc"]
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            healthy = lab.supervise(running, Out())
        assert healthy is False and "crashed 3 times" in "".join(lines)
    finally:
        lab.stop(running)


def test_visa_list_shows_the_simulated_pm100_and_searches_without_the_network():
    sim = run("--json", "visa", "list", "--sim")
    assert sim.returncode == 0, sim.stderr
    rows = json.loads(sim.stdout)["resources"]
    assert {
        "resource": "USB0::0x1313::0x8078::P0000001::0::INSTR",
        "kind": "USB",
        "vendor": "Thorlabs",
        "product": "PM100D",
        "serial": "P0000001",
    } in rows
    local = run("visa", "list")
    assert local.returncode == 0
    assert "--tcpip" in local.stderr  # how to search the network; this run did not
