"""The LAN beacon across real hosts: network namespaces on a bridge this test creates.

Layout (every address assigned here, deleted afterwards):

    switch ns: br0 (no multicast snooping)
      |- discovery ns  eth0 10.213.0.1/24, multicast route     runs DiscoveryService + beacon
      |- client ns     eth0 10.213.0.2/24, multicast route     finds it with LABMESH_DISCOVERY=auto
      '- bare ns       eth0 10.213.0.3/24, no multicast route  must name the interface
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from netns import SUBNET, Lan, netns_problem
from system_tools import unavailable

pytestmark = pytest.mark.system

HOSTS = {"discovery": 1, "client": 2, "bare": 3}


@pytest.fixture
def lan() -> Iterator[Lan]:
    reason = netns_problem()
    if reason:
        unavailable(reason)  # skipped (failed on CI)
    network = Lan(f"lm{os.getpid() % 100000}", HOSTS, multicast=("discovery", "client"))
    try:
        yield network.build()
    finally:
        network.delete()


def _python(ns: str, code: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)]


DISCOVERY = """
import sys
from labmesh.discovery import BeaconSettings, DiscoveryService
svc = DiscoveryService("tcp://*:0", "tcp://*:0", http_port=0, ttl_s=3,
                       beacon=BeaconSettings(interval_s=0.3)).start()
print(svc.address, svc.instance, flush=True)
sys.stdin.read()  # serve until the test closes stdin
svc.stop()
"""

CLIENT = """
import json
from labmesh.discovery import (BeaconSettings, DeviceRecord, Registrar, Resolver,
                               advertised_address, find_discovery)
out = {"found": find_discovery(5.0)}
resolver = Resolver("auto", beacon_timeout_s=5.0, timeout_s=2.0)
out["ping"] = resolver.ping()["instance"]
registrar = Registrar("auto", ttl_s=3, beacon_timeout_s=5.0, timeout_s=2.0).start()
address = advertised_address("tcp://*:5555", resolver.endpoints[0])
registrar.add(DeviceRecord(name="pm100-a", address=address, instance="i1", host="client"))
out["registered"] = registrar.wait_registered(10)
out["resolved"] = resolver.resolve("pm100-a")
registrar.stop()
out["after_stop"] = [d["name"] for d in resolver.list()]
print(json.dumps(out))
"""

BARE = """
import json
from labmesh.discovery import find_discovery
out = {"by_name": find_discovery(5.0, interface="eth0"),
       "by_address": find_discovery(5.0, interface="10.213.0.3")}
try:
    find_discovery(1.0)
except OSError as exc:
    out["no_route"] = str(exc)
print(json.dumps(out))
"""


def _run(ns: str, code: str) -> dict:
    result = subprocess.run(_python(ns, code), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_clients_find_discovery_by_multicast_and_register_by_route(lan):
    server = subprocess.Popen(
        _python(lan.ns["discovery"], DISCOVERY),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address, instance = server.stdout.readline().split()
        port = address.rsplit(":", 1)[1]
        assert address == f"tcp://0.0.0.0:{port}"  # announced as a wildcard ...
        expected = f"tcp://{SUBNET}.1:{port}"  # ... and completed with the sender's address

        client = _run(lan.ns["client"], CLIENT)
        assert client["found"] == [expected]
        assert client["ping"] == instance
        assert client["registered"] is True
        # the advertised address is the client host's own address on the route to discovery
        assert client["resolved"] == f"tcp://{SUBNET}.2:5555"
        assert client["after_stop"] == []

        bare = _run(lan.ns["bare"], BARE)
        assert bare["by_name"] == [expected]
        assert bare["by_address"] == [expected]
        assert "pass the interface" in bare["no_route"]
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()  # by its PID, via the Popen handle
            server.wait(timeout=10)
        server.stdout.close()
        server.stderr.close()


HOST = """
import sys
from labmesh.discovery import DeviceRecord, Registrar, advertised_address
endpoint = sys.argv[1]
registrar = Registrar([endpoint], ttl_s=3, timeout_s=0.5).start()
address = advertised_address("tcp://*:5555", endpoint)
registrar.add(DeviceRecord(name="pm100-a", address=address, instance="i1", host="client"))
print("ready" if registrar.wait_registered(10) else "not registered", flush=True)
sys.stdin.read()
registrar.stop()
"""

OBSERVER = """
import json, sys, time
from labmesh.discovery import Resolver
resolver = Resolver(sys.argv[1], timeout_s=1.0)
for line in sys.stdin:  # "present" or "absent": report how long until pm100-a is so
    want = line.strip() == "present"
    start = time.monotonic()
    after = None
    while time.monotonic() - start < 15:
        if any(d["name"] == "pm100-a" for d in resolver.list()) == want:
            after = round(time.monotonic() - start, 2)
            break
        time.sleep(0.05)
    print(json.dumps(after), flush=True)
"""


def _popen(ns: str, code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*_python(ns, code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _end(process: subprocess.Popen) -> None:
    """Close stdin (a clean stop), then kill by PID if it does not end."""
    if process.stdin and not process.stdin.closed:
        process.stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for stream in (process.stdout, process.stderr):
        if stream:
            stream.close()


def test_link_cut_expires_a_host_and_restoring_it_brings_it_back(lan):
    processes = []
    try:
        server = _popen(lan.ns["discovery"], DISCOVERY)
        processes.append(server)
        port = server.stdout.readline().split()[0].rsplit(":", 1)[1]
        endpoint = f"tcp://{SUBNET}.1:{port}"
        host = _popen(lan.ns["client"], HOST, endpoint)
        processes.append(host)
        assert host.stdout.readline().strip() == "ready"
        observer = _popen(lan.ns["bare"], OBSERVER, endpoint)
        processes.append(observer)

        def after(state: str) -> float | None:
            observer.stdin.write(state + "\n")
            observer.stdin.flush()
            return json.loads(observer.stdout.readline())

        assert after("present") is not None
        lan.link("client", up=False)
        gone = after("absent")
        assert gone is not None and gone <= 3 + 1.0, gone  # within the TTL (+ expiry tick)
        lan.link("client", up=True)
        back = after("present")
        assert back is not None and back <= 6.0, back  # next retry, plus TCP reconnecting
        host.kill()  # a crashed host: no deregistration, its record expires
        host.wait(timeout=10)
        gone = after("absent")
        assert gone is not None and gone <= 3 + 1.0, gone
    finally:
        for process in reversed(processes):
            _end(process)
