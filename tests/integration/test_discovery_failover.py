"""Discovery without a single point of failure (issue 19): two discovery services, hosts
registering with both, clients asking them in turn. One is killed under a live lab: lookups,
calls, heartbeats and new registrations carry on through the other, and the killed one, once
back, is filled again by the hosts' heartbeats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from labmesh import build_client
from labmesh.discovery import Resolver

from support import free_port, wait_until


def start_discovery(api: int, pub: int, ttl_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labmesh.cli",
            "discovery",
            "--address",
            f"tcp://127.0.0.1:{api}",
            "--pub",
            f"tcp://127.0.0.1:{pub}",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(free_port()),
            "--ttl",
            str(ttl_s),
            "--no-beacon",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc


def serve(config: Path, state: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "serve", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "LABMESH_STATE_DIR": str(state)},
    )


def names_on(endpoint: str) -> set[str]:
    """The names one discovery instance holds now (empty if it does not answer)."""
    with Resolver([endpoint], timeout_s=0.5) as only:
        try:
            return {record["name"] for record in only.list()}
        except ConnectionError:
            return set()


def stop(proc: subprocess.Popen | None) -> str:
    if proc is None:
        return ""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # our own child, by its PID
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out or ""


def host_file(path: Path, host: str, device: str, port: int, endpoints: list[str]) -> Path:
    path.write_text(
        f"host: {host}\nbind: 127.0.0.1\nmetrics_port: null\n"
        f"discovery: [{', '.join(endpoints)}]\n"
        f"devices:\n  - {{name: {device}, driver: motor, port: {port}, sim: true}}\n"
    )
    return path


def test_a_killed_discovery_instance_leaves_lookups_calls_and_registrations_working(tmp_path):
    ttl = 3.0
    ports = [(free_port(), free_port()) for _ in range(2)]
    endpoints = [f"tcp://127.0.0.1:{api}" for api, _ in ports]
    first, second = (start_discovery(api, pub, ttl) for api, pub in ports)
    hosts: list[subprocess.Popen] = []
    try:
        hosts.append(
            serve(
                host_file(tmp_path / "a.yaml", "rig-a", "stage-a", free_port(), endpoints),
                tmp_path / "state-a",
            )
        )
        # the host registers with both instances
        assert wait_until(lambda: all("stage-a" in names_on(e) for e in endpoints), timeout=20)

        with build_client("stage-a", discovery=endpoints, timeout=5) as stage:
            assert "x" in stage.positions()
            first.kill()  # a crash of the first instance (our own child)
            first.wait(5)
            assert names_on(endpoints[0]) == set()

            # calls carry on, and a fresh lookup (a new process would make one) finds the
            # device through the second instance, the dead one asked first
            stage.move_abs("x", 1.0)
            started = time.monotonic()
            with Resolver(endpoints, timeout_s=1.0) as resolver:
                assert resolver.resolve("stage-a") == stage.address
            assert time.monotonic() - started < 5

            # heartbeats keep the record alive on the survivor for several TTLs
            time.sleep(2.5 * ttl)
            assert "stage-a" in names_on(endpoints[1])

            # a host started after the kill registers with the survivor and is found by name
            hosts.append(
                serve(
                    host_file(tmp_path / "b.yaml", "rig-b", "stage-b", free_port(), endpoints),
                    tmp_path / "state-b",
                )
            )
            assert wait_until(lambda: "stage-b" in names_on(endpoints[1]), timeout=20)
            with build_client("stage-b", discovery=endpoints, timeout=5) as other:
                assert "x" in other.positions()

            # the first instance comes back empty (no state on disk) on the same port; the
            # hosts' heartbeats fill it again within a few TTLs
            first = start_discovery(*ports[0], ttl)
            assert wait_until(
                lambda: {"stage-a", "stage-b"} <= names_on(endpoints[0]), timeout=6 * ttl
            )
            assert "x" in stage.positions()
    finally:
        outputs = [stop(proc) for proc in hosts]
        stop(first)
        stop(second)
    for out in outputs:
        assert "Traceback" not in out, out
