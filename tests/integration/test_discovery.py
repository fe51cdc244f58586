"""The discovery service, registrar and resolver over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from labmesh.discovery import (
    DeviceRecord,
    DiscoveryService,
    DiscoveryUnavailableError,
    NameTakenError,
    Registrar,
    Resolver,
    UnknownDeviceError,
)
from labmesh.discovery.registry import instance_tag
from labmesh.discovery.resolver import DiscoveryConnection

from support import unavailable, wait_until

pytestmark = pytest.mark.integration

TTL_S = 1.5  # heartbeats every 0.5 s


def start_discovery(address: str = "tcp://127.0.0.1:0", pub: str = "tcp://127.0.0.1:0", **kw):
    kw.setdefault("ttl_s", TTL_S)
    return DiscoveryService(address, pub, http_host="127.0.0.1", http_port=0, **kw).start()


@pytest.fixture
def discovery() -> Iterator[DiscoveryService]:
    svc = start_discovery()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def dealer(discovery) -> Iterator[zmq.Socket]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(discovery.address)
    try:
        yield sock
    finally:
        sock.close()


def exchange(sock: zmq.Socket, *frames: bytes, timeout_ms: int = 2000) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(timeout_ms), f"no reply to {frames!r}"
    return json.loads(sock.recv_multipart()[-1])


def ask(sock: zmq.Socket, payload: dict) -> dict:
    return exchange(sock, json.dumps(payload).encode())


def record(name: str = "pm100-a", instance: str = "i1", **fields) -> DeviceRecord:
    fields.setdefault("address", "tcp://127.0.0.1:5555")
    fields.setdefault("host", "pc-1")
    fields.setdefault("kind", "powermeter")
    fields.setdefault("metrics_url", "http://127.0.0.1:9105/metrics")
    return DeviceRecord(name=name, instance=instance, **fields)


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


# ---- the ZeroMQ API ------------------------------------------------------------------------
def test_register_heartbeat_lookup_list_deregister(dealer):
    reply = ask(dealer, {"type": "register", "id": 1, "record": record().to_dict()})
    assert reply == {
        "status": "ok",
        "result": {"name": "pm100-a", "instance": "i1", "ttl_s": TTL_S, "heartbeat_s": TTL_S / 3},
        "id": 1,
    }
    reply = ask(dealer, {"type": "heartbeat", "id": "h", "name": "pm100-a", "instance": "i1"})
    assert reply["result"] == {"ttl_s": TTL_S, "unknown": []} and reply["id"] == "h"
    batch = [{"name": "pm100-a", "instance": "i1"}, {"name": "gone", "instance": "x"}]
    reply = ask(dealer, {"type": "heartbeat", "records": batch})
    assert reply["result"]["unknown"] == ["gone"] and "id" not in reply
    found = ask(dealer, {"type": "lookup", "name": "pm100-a", "id": 2})["result"]
    assert found["address"] == "tcp://127.0.0.1:5555" and found["host"] == "pc-1"
    assert 0 < found["expires_in_s"] <= TTL_S
    ask(dealer, {"type": "register", "record": record("daq-1", "i2", kind="daq").to_dict()})
    listed = ask(dealer, {"type": "list"})["result"]
    assert [d["name"] for d in listed] == ["daq-1", "pm100-a"]
    assert [d["name"] for d in ask(dealer, {"type": "list", "kind": "daq"})["result"]] == ["daq-1"]
    assert ask(dealer, {"type": "list", "name": "pm*", "host": "pc-1"})["result"][0]["name"] == (
        "pm100-a"
    )
    reply = ask(dealer, {"type": "deregister", "name": "pm100-a", "instance": "wrong"})
    assert reply["result"] == {"removed": []}
    reply = ask(dealer, {"type": "deregister", "name": "pm100-a", "instance": "i1"})
    assert reply["result"] == {"removed": ["pm100-a"]}
    reply = ask(dealer, {"type": "lookup", "name": "pm100-a", "id": 3})
    assert reply["status"] == "error" and reply["type"] == "UnknownDeviceError"
    assert "pm100-a at tcp://127.0.0.1:5555 on pc-1 was removed" in reply["error"]
    assert reply["id"] == 3
    pong = ask(dealer, {"type": "ping"})["result"]
    assert pong["pong"] is True and pong["devices"] == 1 and pong["service"] == "labmesh-discovery"


def test_second_claimant_is_refused_with_the_holders_address(discovery, dealer, caplog):
    ask(dealer, {"type": "register", "record": record().to_dict()})
    other = record(instance="i2", address="tcp://127.0.0.2:6000", host="pc-2")
    reply = ask(dealer, {"type": "register", "id": 9, "record": other.to_dict()})
    assert reply["status"] == "error" and reply["type"] == "NameTakenError" and reply["id"] == 9
    assert "already registered by the server at tcp://127.0.0.1:5555 on host pc-1" in reply["error"]
    assert reply["holder"] == {
        "address": "tcp://127.0.0.1:5555",
        "host": "pc-1",
        "instance": instance_tag("i1"),
    }
    # the same error reaches a registrar as NameTakenError, and it keeps serving the rest
    with Registrar([discovery.address], TTL_S, timeout_s=0.5) as registrar:
        registrar.add(other)
        registrar.add(record("daq-9", "i3", address="tcp://127.0.0.2:6001"))
        assert wait_until(
            lambda: registrar.status()[discovery.address]["pm100-a"].startswith("refused"), 3
        )
        assert "already registered" in registrar.status()[discovery.address]["pm100-a"]
        assert registrar.wait_registered(3, ["daq-9"])
        for _ in range(5):  # the holder stays alive; the claim is retried, and logged once
            ask(dealer, {"type": "heartbeat", "name": "pm100-a", "instance": "i1"})
            time.sleep(0.3)
        refusals = [r for r in caplog.records if "refused it" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelname == "ERROR"
    with pytest.raises(NameTakenError, match="on host pc-1"):
        DiscoveryConnection(discovery.address, zmq.Context.instance()).request(
            {"type": "register", "record": other.to_dict()}, 2
        )


def test_records_expire_after_the_ttl_and_the_feed_says_so(discovery, dealer):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"device:")
    watch = ask(dealer, {"type": "watch"})["result"]
    assert watch["pub"] == discovery.pub_address and watch["devices"] == []
    sub.connect(watch["pub"])
    try:
        time.sleep(0.2)  # let the subscription reach the publisher
        started = time.monotonic()
        ask(dealer, {"type": "register", "record": record().to_dict()})
        seen = []
        while time.monotonic() - started < TTL_S + 2 and len(seen) < 2:
            if sub.poll(100):
                topic, body = sub.recv_multipart()
                assert topic == b"device:pm100-a"
                seen.append(json.loads(body))
        elapsed = time.monotonic() - started
    finally:
        sub.close()
    assert [(e["event"], e["reason"]) for e in seen] == [
        ("added", "registered"),
        ("removed", "expired"),
    ]
    assert [e["seq"] for e in seen] == [watch["seq"] + 1, watch["seq"] + 2]
    assert seen[0]["record"]["address"] == "tcp://127.0.0.1:5555"
    assert seen[0]["service"] == discovery.instance
    assert TTL_S <= elapsed < TTL_S + 1.0
    assert ask(dealer, {"type": "lookup", "name": "pm100-a"})["type"] == "UnknownDeviceError"


def test_registrar_keeps_records_alive_and_deregisters_on_stop():
    # a longer TTL than the other tests' (heartbeats every 1 s, 2 s of slack for a loaded
    # machine), slept past once: only heartbeats can have kept the record
    ttl_s = 3.0
    discovery = start_discovery(ttl_s=ttl_s)
    resolver = Resolver(discovery.address)
    registrar = Registrar([discovery.address], ttl_s, timeout_s=0.5).start()
    try:
        registrar.add(record())
        assert registrar.wait_registered(2)
        time.sleep(ttl_s + 0.5)  # past the TTL: heartbeats kept it
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:5555"
        # a changed record of the same instance is sent again
        registrar.add(record(labels={"room": "b12"}))
        assert wait_until(lambda: resolver.lookup("pm100-a")["labels"] == {"room": "b12"}, 2)
        # removing deregisters at once, not after the TTL
        registrar.remove("pm100-a")
        assert wait_until(lambda: not resolver.list(), 1)
        registrar.add(record("daq-1", "i9"))
        assert registrar.wait_registered(2)
        registrar.stop(timeout=2)
        assert resolver.list() == []  # stop deregistered it
    finally:
        registrar.stop(timeout=2)
        resolver.close()
        discovery.stop()


def test_a_restarted_server_replaces_its_old_instance(discovery):
    resolver = Resolver(discovery.address)
    with Registrar([discovery.address], TTL_S, timeout_s=0.5) as registrar:
        registrar.add(record())
        assert registrar.wait_registered(2)
        registrar.add(record(instance="i2", address="tcp://127.0.0.1:5999"))
        assert registrar.wait_registered(2)
        assert resolver.lookup("pm100-a")["instance"] == instance_tag("i2")
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:5999"
    resolver.close()


def test_discovery_restart_is_healed_within_one_heartbeat_interval():
    first = start_discovery()
    address, pub = first.address, first.pub_address
    registrar = Registrar([address], TTL_S, timeout_s=0.3).start()
    second = None
    try:
        registrar.add(record())
        registrar.add(record("daq-1", "i2"))
        assert registrar.wait_registered(2)
        first.stop()
        second = start_discovery(address, pub)  # same ports, empty registry
        restarted = time.monotonic()
        resolver = Resolver(address, timeout_s=0.5)
        assert wait_until(lambda: len(second.devices()) == 2, TTL_S, interval=0.005)
        healed_after = time.monotonic() - restarted
        assert healed_after <= TTL_S / 3 + 0.2, healed_after
        assert resolver.resolve("daq-1") == "tcp://127.0.0.1:5555"
        resolver.close()
    finally:
        registrar.stop()
        if second is not None:
            second.stop()


def test_registrar_tolerates_discovery_being_down_and_logs_once(caplog):
    svc = start_discovery()
    address, pub = svc.address, svc.pub_address
    svc.stop()
    caplog.set_level("INFO", logger="labmesh.discovery")
    registrar = Registrar([address], TTL_S, timeout_s=0.2).start()
    try:
        registrar.add(record())
        assert wait_until(lambda: registrar.status()[address]["pm100-a"] == "unreachable", 2)
        time.sleep(1.0)  # several failed attempts
        # the registrar's own lines (a client left by another test may log its resolver's)
        down = [
            r
            for r in caplog.records
            if r.name == "labmesh.discovery.registrar" and "did not answer" in r.getMessage()
        ]
        assert len(down) == 1, [r.getMessage() for r in caplog.records]
        svc = start_discovery(address, pub)
        assert registrar.wait_registered(3)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        registrar.stop()
        svc.stop()


# ---- malformed input -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("frames", "error_type", "message", "echo"),
    [
        ([b"not json"], "ProtocolError", "not valid JSON", None),
        ([b"\xff\xfe"], "ProtocolError", "not valid UTF-8", None),
        ([b"[1, 2]"], "ProtocolError", "must be a JSON object", None),
        ([b'{"type": "ping"}', b"extra"], "ProtocolError", "exactly one body frame", None),
        ([b'{"type": "ping", "id": [1]}'], "ProtocolError", "id must be a JSON scalar", None),
        ([b'{"type": "query", "id": 5}'], "ProtocolError", "unknown discovery request", 5),
        ([b'{"id": 6}'], "ProtocolError", "unknown discovery request type None", 6),
        ([b'{"type": "lookup", "id": 7}'], "ProtocolError", "lookup needs a string 'name'", 7),
        ([b'{"type": "heartbeat", "id": 8}'], "ProtocolError", "needs string 'name'", 8),
        ([b'{"type": "heartbeat", "records": 3}'], "ProtocolError", "must be a list", None),
        ([b'{"type": "deregister", "records": [1]}'], "ProtocolError", "needs string", None),
        ([b'{"type": "list", "kind": 4}'], "ProtocolError", "filter 'kind'", None),
        ([b'{"type": "register", "id": 9}'], "ValueError", "must be a JSON object", 9),
        (
            [b'{"type": "register", "record": {"name": "x", "instance": "i", "address": 1}}'],
            "ValueError",
            "must be a ZeroMQ endpoint",
            None,
        ),
    ],
)
def test_malformed_requests_are_answered_and_the_service_survives(
    dealer, frames, error_type, message, echo
):
    reply = exchange(dealer, *frames)
    assert reply["status"] == "error" and reply["type"] == error_type
    assert message in reply["error"]
    assert reply.get("id") == echo
    assert ask(dealer, {"type": "ping", "id": "after"})["result"]["pong"] is True


def test_req_peers_and_oversized_requests(discovery):
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(discovery.address)
    try:
        assert exchange(req, b'{"type": "ping", "id": 1}')["id"] == 1  # [id, "", body] framing
    finally:
        req.close()
    small = DiscoveryService(
        "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", http_port=None, max_message_bytes=1000
    ).start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(small.address)
    try:
        reply = exchange(dealer, json.dumps({"type": "ping", "pad": "x" * 1500}).encode())
        assert reply["type"] == "ProtocolError" and "exceeds" in reply["error"]
        assert ask(dealer, {"type": "ping"})["status"] == "ok"
    finally:
        dealer.close()
        small.stop()


# ---- the resolver --------------------------------------------------------------------------
def test_resolver_caches_through_an_outage_and_re_resolves_after_invalidate():
    svc = start_discovery()
    address, pub = svc.address, svc.pub_address
    resolver = Resolver(address, timeout_s=0.3)
    try:
        with _conn(address) as conn:
            conn.request({"type": "register", "record": record().to_dict()}, 2)
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:5555"
        svc.stop()
        # discovery down: the cached address serves, also after a connection failure
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:5555"
        resolver.invalidate("pm100-a")
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:5555"
        with pytest.raises(DiscoveryUnavailableError, match="did not answer within 0.3 s"):
            resolver.resolve("never-seen")
        # back up, and the device has moved: invalidate makes resolve ask again
        svc = start_discovery(address, pub)
        with _conn(address) as conn:
            moved = record(instance="i2", address="tcp://127.0.0.1:6000")
            conn.request({"type": "register", "record": moved.to_dict()}, 2)
        # still invalidated (no discovery confirmed the old address): this resolve asks
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:6000"
        with _conn(address) as conn:  # it moves again: the cache answers until invalidated
            conn.request({"type": "deregister", "name": "pm100-a", "instance": "i2"}, 2)
            moved = record(instance="i3", address="tcp://127.0.0.1:7000")
            conn.request({"type": "register", "record": moved.to_dict()}, 2)
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:6000"
        resolver.invalidate("pm100-a")
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:7000"
        with pytest.raises(UnknownDeviceError, match="did you mean 'pm100-a'"):
            resolver.resolve("pm100-b")
    finally:
        resolver.close()
        svc.stop()


class _conn:
    """A DiscoveryConnection closed on exit."""

    def __init__(self, endpoint: str) -> None:
        self.connection = DiscoveryConnection(endpoint, zmq.Context.instance())

    def __enter__(self) -> DiscoveryConnection:
        return self.connection

    def __exit__(self, *exc: object) -> None:
        self.connection.close()


def test_resolver_tries_endpoints_in_turn():
    a, b = start_discovery(), start_discovery()
    dead = start_discovery()
    dead_address = dead.address
    dead.stop()
    resolver = Resolver([dead_address, a.address, b.address], timeout_s=0.3)
    try:
        with _conn(b.address) as conn:  # only b knows the device (a just restarted, say)
            conn.request({"type": "register", "record": record().to_dict()}, 2)
        assert resolver.resolve("pm100-a") == "tcp://127.0.0.1:5555"
        assert resolver.ping()["instance"] == b.instance  # the one that answered goes first
        with pytest.raises(UnknownDeviceError):
            resolver.lookup("nobody")
    finally:
        resolver.close()
        a.stop()
        b.stop()


def test_resolver_without_configuration_says_what_to_set(monkeypatch):
    monkeypatch.delenv("LABMESH_DISCOVERY", raising=False)
    monkeypatch.setenv("LABMESH_ADDRESS_CACHE", "off")  # no address remembered by other tests
    with (
        Resolver() as resolver,
        pytest.raises(
            DiscoveryUnavailableError,
            match=r"looked at tcp://127.0.0.1:5550 on this machine and for the LAN beacon, as "
            "LABMESH_DISCOVERY is not set; set it to tcp://HOST:5550",
        ),
    ):
        resolver.resolve("pm100-a")
    assert resolver.implicit and resolver.endpoints[0] == "tcp://127.0.0.1:5550"


def test_resolver_reads_the_environment(monkeypatch, discovery):
    monkeypatch.setenv("LABMESH_DISCOVERY", discovery.address)
    with Resolver() as resolver:
        assert resolver.endpoints == [discovery.address]
        assert resolver.ping()["instance"] == discovery.instance


# ---- HTTP ----------------------------------------------------------------------------------
def _register_lab(address: str) -> None:
    with _conn(address) as conn:
        for rec in (
            record("pm100-a", "1", labels={"room": "b12"}),
            record("daq-1", "2", kind="daq", labels={"room": "b12", "owner": "ana"}),
            record("stage", "3", kind="motor", host="pc-2", metrics_url="https://127.0.0.1:9106/m"),
            record("bare", "4", metrics_url=None),
        ):
            conn.request({"type": "register", "record": rec.to_dict()}, 2)


def test_targets_are_prometheus_http_sd(discovery):
    _register_lab(discovery.address)
    status, content_type, body = http_get(discovery.http_url + "/targets")
    assert status == 200 and content_type == "application/json"
    groups = json.loads(body)
    assert groups == [
        {
            "targets": ["127.0.0.1:9105"],
            "labels": {
                "labmesh_host": "pc-1",
                "labmesh_kinds": "daq,powermeter",
                "labmesh_devices": "daq-1,pm100-a",
                "labmesh_label_room": "b12",
            },
        },
        {
            "targets": ["127.0.0.1:9106"],
            "labels": {
                "labmesh_host": "pc-2",
                "labmesh_kinds": "motor",
                "labmesh_devices": "stage",
                "__metrics_path__": "/m",
                "__scheme__": "https",
            },
        },
    ]
    # the http_sd format: a list of {targets: [str], labels: {str: str}}, valid label names
    for group in groups:
        assert set(group) == {"targets", "labels"}
        assert all(isinstance(t, str) and ":" in t for t in group["targets"])
        for name, value in group["labels"].items():
            assert name.replace("_", "a").isalnum() and not name[0].isdigit()
            assert isinstance(value, str)
            assert not name.startswith(("job", "instance", "device", "kind", "type", "host"))


def _promtool() -> str:
    """promtool's path; skipped without it, failed on CI."""
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool not on PATH (apt-get install prometheus)")
    assert promtool is not None
    return promtool


def test_promtool_reads_the_targets_through_http_sd(discovery, tmp_path):
    _register_lab(discovery.address)
    promtool = _promtool()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "scrape_configs:\n"
        "  - job_name: labmesh\n"
        "    http_sd_configs:\n"
        f"      - url: {discovery.http_url}/targets\n"
    )
    result = subprocess.run(
        [promtool, "check", "service-discovery", str(config), "labmesh", "--timeout=1s"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # promtool exits 0 even when it cannot fetch or parse the targets: it logs the error instead
    assert result.returncode == 0 and "level=error" not in result.stderr, result.stderr
    targets = json.loads(result.stdout)
    by_address = {t["labels"]["instance"]: t["labels"] for t in targets}
    assert set(by_address) == {"127.0.0.1:9105", "127.0.0.1:9106"}
    assert by_address["127.0.0.1:9105"]["labmesh_devices"] == "daq-1,pm100-a"
    assert by_address["127.0.0.1:9106"]["__metrics_path__"] == "/m"
    assert by_address["127.0.0.1:9106"]["__scheme__"] == "https"


def test_devices_health_metrics_and_unknown_paths(discovery):
    _register_lab(discovery.address)
    status, _, body = http_get(discovery.http_url + "/devices")
    assert status == 200
    assert [d["name"] for d in json.loads(body)] == ["bare", "daq-1", "pm100-a", "stage"]
    _, _, body = http_get(discovery.http_url + "/devices?kind=daq")
    assert [d["name"] for d in json.loads(body)] == ["daq-1"]
    _, _, body = http_get(discovery.http_url + "/devices?label=room=b12&label=owner=ana")
    assert [d["name"] for d in json.loads(body)] == ["daq-1"]
    status, _, body = http_get(discovery.http_url + "/devices?label=room")
    assert status == 400 and "key=value" in json.loads(body)["error"]

    status, _, body = http_get(discovery.http_url + "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["devices"] == 4
    assert health["address"] == discovery.address

    with _conn(discovery.address) as conn:
        conn.request({"type": "heartbeat", "name": "daq-1", "instance": "2"}, 2)
        conn.request({"type": "heartbeat", "name": "daq-1", "instance": "wrong"}, 2)
        with pytest.raises(UnknownDeviceError):
            conn.request({"type": "lookup", "name": "zzz"}, 2)
    status, content_type, body = http_get(discovery.http_url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("labmesh_discovery_registered_devices", ())] == 4
    assert samples[("labmesh_discovery_heartbeats_total", (("result", "known"),))] >= 1
    assert samples[("labmesh_discovery_heartbeats_total", (("result", "unknown"),))] >= 1
    assert samples[("labmesh_discovery_lookups_total", (("result", "unknown"),))] >= 1
    key = ("labmesh_discovery_requests_total", (("status", "ok"), ("type", "register")))
    assert samples[key] >= 4
    assert ("labmesh_discovery_expiries_total", ()) in samples
    assert ("process_cpu_seconds_total", ()) in samples

    status, _, body = http_get(discovery.http_url + "/nope")
    assert status == 404 and "/targets" in json.loads(body)["error"]
    assert http_get(discovery.http_url + "/")[0] == 200


def test_promtool_accepts_the_metrics_exposition(discovery):
    promtool = _promtool()
    _, _, body = http_get(discovery.http_url + "/metrics")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    # exit 0: parsed and no lint problem; 1: a parse error; 3: lint problems (of any metric,
    # the process_* collectors' included: the whole exposition is labmesh's to keep clean)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_stop_releases_every_port():
    svc = start_discovery()
    address, pub, port = svc.address, svc.pub_address, svc.http_port
    svc.stop()
    again = DiscoveryService(address, pub, http_host="127.0.0.1", http_port=port).start()
    try:
        assert json.loads(http_get(again.http_url + "/health")[2])["status"] == "ok"
    finally:
        again.stop()


def test_nothing_a_lookup_returns_lets_a_stranger_remove_or_take_the_name(discovery, dealer):
    """Issue 15's hijack: lookup used to return the instance id, and that id was all deregister
    needed; a stranger then registered the name at its own address."""
    ask(dealer, {"type": "register", "record": record().to_dict()})
    found = ask(dealer, {"type": "lookup", "name": "pm100-a"})["result"]
    assert found["instance"] == instance_tag("i1") != "i1"
    listed = ask(dealer, {"type": "list"})["result"][0]
    assert listed["instance"] == found["instance"]
    stolen = {"type": "deregister", "name": "pm100-a", "instance": found["instance"]}
    assert ask(dealer, stolen)["result"]["removed"] == []
    attacker = record(instance=found["instance"], address="tcp://127.0.0.9:6666", host="evil")
    taken = ask(dealer, {"type": "register", "record": attacker.to_dict()})
    assert taken["type"] == "NameTakenError"
    assert ask(dealer, {"type": "lookup", "name": "pm100-a"})["result"]["address"] == (
        "tcp://127.0.0.1:5555"
    )
