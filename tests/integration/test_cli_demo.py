"""The CLI end to end, as subprocesses, against a running `labmesh demo`."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from labmesh.discovery import DeviceRecord, Registrar

pytestmark = pytest.mark.integration


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


@pytest.fixture(scope="module")
def demo():
    base, metrics = free_base(), free_base(2)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labmesh.cli",
            "demo",
            "--base-port",
            str(base),
            "--metrics-port",
            str(metrics),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    t0 = time.monotonic()
    banner = []
    try:
        while time.monotonic() - t0 < 20:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line.rstrip())
            if line.startswith("(ready in"):
                break
        assert banner and banner[-1].startswith("(ready in"), banner
        ready_s = float(banner[-1].split()[2])
        yield {
            "endpoint": f"tcp://127.0.0.1:{base}",
            "banner": banner,
            "ready_s": ready_s,
            "proc": proc,
            "base": base,
        }
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def cli(demo, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABMESH_DISCOVERY": demo["endpoint"]}
    return subprocess.run(
        [sys.executable, "-m", "labmesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_demo_is_ready_quickly_and_says_where_things_are(demo):
    assert demo["ready_s"] < 3.0
    text = "\n".join(demo["banner"])
    for name in ("pm100-a", "daq-1", "stage", "discovery"):
        assert name in text
    assert f"LABMESH_DISCOVERY={demo['endpoint']}" in text and "build_client(" in text
    assert "metrics http://127.0.0.1:" in text


def test_ls(demo):
    result = cli(demo, "--json", "ls")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"pm100-a", "daq-1", "stage"}
    assert rows["pm100-a"]["host"] == "optics-pc" and rows["stage"]["kind"] == "motor"
    assert all(r["up"] and r["healthy"] for r in rows.values())
    table = cli(demo, "ls").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "KIND", "HOST", "ADDRESS", "UP"]
    assert len(table) == 4


def test_get_set_call_describe(demo):
    assert cli(demo, "set", "pm100-a", "WAVELENGTH", "1064").stdout.strip() == "ok"
    got = cli(demo, "--json", "get", "pm100-a", "WAVELENGTH")
    assert json.loads(got.stdout) == 1064.0
    power = cli(demo, "get", "pm100-a", "POWER")
    assert power.returncode == 0 and float(power.stdout) > 0
    moved = cli(demo, "--json", "call", "stage", "move_abs", "x", "position=12.5")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout) == 12.5
    desc = json.loads(cli(demo, "--json", "describe", "daq-1").stdout)
    assert desc["kind"] == "daq" and "write_line" in desc["methods"]
    human = cli(demo, "describe", "stage").stdout
    assert "Operations:" in human and "move_abs" in human


def test_locks_for_one_device_and_all(demo):
    from labmesh import build_client

    with build_client(
        "daq-1",
        discovery=demo["endpoint"],
        resources="Dev1/port0/line3",
        connect_kwargs={"name": "cli-test"},
    ):
        one = json.loads(cli(demo, "--json", "locks", "daq-1").stdout)
        assert [(h["resource"], h["metadata"]["name"]) for h in one["holders"]] == [
            ("Dev1/port0/line3", "cli-test")
        ]
        everything = json.loads(cli(demo, "--json", "locks").stdout)
        assert [(h["device"], h["resource"]) for h in everything] == [("daq-1", "Dev1/port0/line3")]
        refused = cli(demo, "call", "daq-1", "write_line", "Dev1/port0/line3", "false")
        assert refused.returncode == 1
        assert refused.stderr.startswith("labmesh: daq-1: ResourceLockedError: resource locked")
        assert "cli-test" in refused.stderr and "Traceback" not in refused.stderr
        assert "cli-test (1)" in cli(demo, "ls").stdout


def test_watch_prints_changes(demo):
    watch = subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "--json", "watch", "--seconds", "4"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "LABMESH_DISCOVERY": demo["endpoint"]},
    )
    try:
        time.sleep(1.0)
        registrar = Registrar([demo["endpoint"]], ttl_s=3).start()
        registrar.add(
            DeviceRecord(
                name="visitor",
                address="tcp://127.0.0.1:1",
                instance="v1",
                kind="test",
                host="elsewhere",
            )
        )
        assert registrar.wait_registered(5)
        registrar.stop()
        out, _ = watch.communicate(timeout=15)
    finally:
        if watch.poll() is None:
            watch.kill()
    events = [(e["event"], e["name"]) for e in map(json.loads, out.splitlines())]
    assert ("added", "visitor") in events and ("removed", "visitor") in events


def test_errors_are_one_line_with_exit_codes(demo):
    unknown = cli(demo, "get", "nosuch", "X")
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1
    assert "nosuch" in unknown.stderr
    bad_value = cli(demo, "set", "pm100-a", "WAVELENGTH", "5")
    assert bad_value.returncode == 1
    assert bad_value.stderr.startswith("labmesh: pm100-a: ValueError: 5 is out of range")
    usage = cli(demo, "get")
    assert usage.returncode == 2
    debug = cli(demo, "--debug", "get", "pm100-a", "NOPE")
    assert debug.returncode == 1


def test_ctrl_c_stops_the_whole_lab(demo):
    proc = demo["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert "labmesh demo: stopped" in proc.stdout.read()
    # every port of the lab is free again (as a server would rebind it): nothing left behind
    for port in (demo["base"], demo["base"] + 5, demo["base"] + 6, demo["base"] + 7):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
