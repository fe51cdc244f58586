"""Discovery wired end to end: serve registers, clients connect by name, the CLI lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labmesh import build_async_client, build_client, build_server
from labmesh.discovery import DeviceRecord, DiscoveryService, Registrar, Resolver

from support import MemoryMeter, free_port, wait_until
from support import run_labmesh as labmesh

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
def discovery():
    svc = DiscoveryService(
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        http_host="127.0.0.1",
        http_port=0,
        ttl_s=1.5,
        beacon=None,
    ).start()
    try:
        yield svc
    finally:
        svc.stop()


def register(discovery, server, name="meter", ttl_s=1.5) -> Registrar:
    registrar = Registrar([discovery.address], ttl_s=ttl_s).start()
    registrar.add(
        DeviceRecord(
            name=name,
            address=server.address,
            instance=server.epoch,
            kind="powermeter",
            host="bench-1",
        )
    )
    assert registrar.wait_registered(5)
    return registrar


def test_connect_by_name_and_keep_working_while_discovery_is_down(discovery):
    server = build_server(MemoryMeter(), address="tcp://127.0.0.1:0").start()
    registrar = register(discovery, server)
    try:
        client = build_client("meter", discovery=[discovery.address], timeout=2000)
        assert client.address == server.address and client.device_name == "meter"
        assert client.query("WAVELENGTH") == 532.0
        discovery.stop()  # the lab core goes away: a connected client carries on
        assert client.write("WAVELENGTH", 800) is True
        assert client.query("WAVELENGTH") == 800.0
        client.close()
    finally:
        registrar.stop()
        server.stop()


def test_a_device_that_moved_is_found_again(discovery):
    resolver = Resolver([discovery.address])
    first = build_server(MemoryMeter(), address="tcp://127.0.0.1:0").start()
    registrar = register(discovery, first)
    client = build_client("meter", discovery=resolver, timeout=700, retries=2, lease_s=None)
    try:
        assert client.query("WAVELENGTH") == 532.0
        # the instrument moves to another PC (here: another port), re-registered under its name
        registrar.remove("meter")
        first.stop()
        second = build_server(MemoryMeter(), address="tcp://127.0.0.1:0").start()
        registrar.add(
            DeviceRecord(
                name="meter",
                address=second.address,
                instance=second.epoch,
                kind="powermeter",
                host="bench-2",
            )
        )
        assert registrar.wait_registered(5)
        try:
            # the first attempt times out, the reset asks discovery again and finds it
            assert client.query("WAVELENGTH") == 532.0
            assert client.address == second.address
        finally:
            second.stop()
    finally:
        client.close()
        registrar.stop()


def test_async_client_by_name(discovery):
    import asyncio

    server = build_server(MemoryMeter(), address="tcp://127.0.0.1:0").start()
    registrar = register(discovery, server)

    async def main() -> None:
        client = await build_async_client("meter", discovery=[discovery.address])
        assert await client.query("WAVELENGTH") == 532.0
        await client.close()

    try:
        asyncio.run(main())
    finally:
        registrar.stop()
        server.stop()


def test_unknown_name_and_no_discovery_are_clear_errors(discovery, monkeypatch):
    with pytest.raises(LookupError, match="nosuch"):
        build_client("nosuch", discovery=[discovery.address])
    monkeypatch.delenv("LABMESH_DISCOVERY", raising=False)
    monkeypatch.setenv("LABMESH_ADDRESS_CACHE", "off")  # no address remembered by other tests
    with pytest.raises(ConnectionError, match="LABMESH_DISCOVERY is not set; set it to"):
        build_client("meter", discovery=Resolver())


def test_serve_registers_and_the_cli_lists_and_watches(discovery, tmp_path):
    ports = [free_port(), free_port()]
    config = tmp_path / "host.yaml"
    config.write_text(
        f"host: rig-7\nbind: 127.0.0.1\ndiscovery: {discovery.address}\n"
        f"metrics_port: {free_port()}\ndevices:\n"
        f"  - {{name: daq, driver: nidaq, port: {ports[0]}, sim: true}}\n"
        f"  - {{name: stage, driver: motor, port: {ports[1]}, sim: true,"
        f" options: {{axes: [x, y]}}}}\n"
    )
    env = {"LABMESH_DISCOVERY": discovery.address, "PYTHONPATH": str(TESTS)}
    watch = subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "--json", "watch", "--seconds", "20"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    serve = subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "serve", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    try:
        assert wait_until(lambda: len(discovery.devices()) == 2, timeout=15)
        ls = labmesh("--json", "ls", env=env)
        assert ls.returncode == 0, ls.stderr
        rows = {r["name"]: r for r in json.loads(ls.stdout)}
        record = next(d for d in discovery.devices() if d["name"] == "daq")
        assert record["metrics_url"].startswith("http://127.0.0.1:")
        assert [t["targets"] for t in discovery.targets()] == [
            [record["metrics_url"].split("/")[2]]
        ]
        assert rows["daq"]["host"] == "rig-7" and rows["daq"]["up"] is True
        assert rows["stage"]["address"] == f"tcp://127.0.0.1:{ports[1]}"
        with build_client(
            "stage", discovery=[discovery.address], resources="x", connect_kwargs={"name": "scan-7"}
        ) as stage:
            assert stage.move_abs("x", 2.0) == 2.0
            locks = labmesh("--json", "locks", env=env)
            held = json.loads(locks.stdout)
            assert [(h["device"], h["resource"], h["metadata"]["name"]) for h in held] == [
                ("stage", "x", "scan-7")
            ]
            got = labmesh("get", "stage", "x/position", env=env)
            assert got.returncode == 0 and float(got.stdout) == 2.0
        serve.terminate()
        assert serve.wait(10) == 0
        assert wait_until(lambda: discovery.devices() == [], timeout=5)  # deregistered
    finally:
        for proc in (serve, watch):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
    events = [json.loads(line) for line in watch.stdout.read().splitlines() if line.strip()]
    kinds = [(e["event"], e["name"]) for e in events]
    assert ("added", "daq") in kinds and ("removed", "stage") in kinds


def test_ls_without_discovery_is_a_one_line_error():
    result = labmesh("ls", env={"LABMESH_DISCOVERY": ""})
    assert result.returncode == 1
    assert result.stderr.startswith("labmesh: no discovery service answered")
    assert "on this machine and for the LAN beacon" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


KILLED_HOST = """
import sys, time
sys.path.insert(0, sys.argv[2])
from support import MemoryMeter
from labmesh import build_server
from labmesh.discovery import DeviceRecord, Registrar
server = build_server(MemoryMeter(), address="tcp://127.0.0.1:0").start()
registrar = Registrar([sys.argv[1]], ttl_s=float(sys.argv[3])).start()
registrar.add(DeviceRecord(name="doomed", address=server.address, instance=server.epoch))
registrar.wait_registered(5)
print("READY", flush=True)
time.sleep(60)
"""


def test_a_registered_host_that_is_killed_expires_after_the_ttl():
    import signal

    # a longer TTL than the fixture's: heartbeats every 1 s leave 2 s of slack on a loaded
    # machine before a live host could expire
    ttl_s = 3.0
    discovery = DiscoveryService(
        "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", http_port=None, ttl_s=ttl_s, beacon=None
    ).start()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_HOST, discovery.address, str(TESTS), str(ttl_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert [d["name"] for d in discovery.devices()] == ["doomed"]
        time.sleep(ttl_s + 0.5)  # heartbeats keep it alive past one TTL
        assert [d["name"] for d in discovery.devices()] == ["doomed"]
        proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_until(lambda: discovery.devices() == [], timeout=ttl_s + 3)
        assert time.monotonic() - t0 < ttl_s + 1.0
    finally:
        proc.kill()
        proc.wait(5)
        discovery.stop()


def test_serve_uses_labmesh_discovery_when_the_host_file_names_none(discovery, tmp_path):
    port = free_port()
    config = tmp_path / "host.yaml"
    config.write_text(
        f"bind: 127.0.0.1\nmetrics_port: null\ndevices:\n"
        f"  - {{name: envdaq, driver: nidaq, port: {port}, sim: true}}\n"
    )
    env = {**os.environ, "LABMESH_DISCOVERY": discovery.address}
    serve = subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert wait_until(
            lambda: [d["name"] for d in discovery.devices()] == ["envdaq"], timeout=15
        )
    finally:
        serve.terminate()
        serve.wait(10)


def test_a_host_that_crashed_takes_its_names_back_at_once(tmp_path):
    """Issue 19: a restarted host was refused by its own stale record for the whole TTL (and
    that was logged at ERROR). Its registration id now survives the restart."""
    service = DiscoveryService(
        "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", http_port=None, ttl_s=30.0
    ).start()
    port = free_port()
    config = tmp_path / "host.yaml"
    config.write_text(
        f"host: rig-9\nbind: 127.0.0.1\ndiscovery: {service.address}\nmetrics_port: null\n"
        f"devices:\n  - {{name: stage-9, driver: motor, port: {port}, sim: true}}\n"
    )
    env = {**os.environ, "LABMESH_STATE_DIR": str(tmp_path / "state")}

    def serve() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "labmesh.cli", "serve", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    first = serve()
    second = None
    try:
        assert wait_until(lambda: service.devices(name="stage-9"), timeout=15)
        before = service.devices(name="stage-9")[0]["started"]
        first.kill()  # a crash: no deregistration (our own child, by its PID)
        first.wait(5)
        assert service.devices(name="stage-9")  # its record lives on (TTL 30 s)
        second = serve()
        started = time.monotonic()
        # the restarted host's own registration (a newer `started`) replaces the stale one
        assert wait_until(
            lambda: service.devices(name="stage-9")[0]["started"] > before, timeout=10
        )
        assert time.monotonic() - started < 10  # not the 30 s TTL
        with build_client("stage-9", discovery=[service.address]) as stage:
            assert stage.positions()
        second.terminate()
        out, _ = second.communicate(timeout=10)
        assert "already registered" not in out and "ERROR" not in out, out
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)
        service.stop()
