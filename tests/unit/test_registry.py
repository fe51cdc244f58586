"""The discovery registry, beacon datagrams and advertised addresses, with plain data."""

from __future__ import annotations

import random

import pytest

from labmesh.discovery.beacon import (
    MAX_DATAGRAM_BYTES,
    decode_announcement,
    encode_announcement,
    substitute_wildcard,
)
from labmesh.discovery.registrar import advertised_address
from labmesh.discovery.registry import (
    DeviceRecord,
    InvalidRecordError,
    NameTakenError,
    Registry,
    UnknownDeviceError,
    instance_tag,
)
from labmesh.discovery.resolver import normalize_endpoint, parse_endpoints

pytestmark = pytest.mark.unit


def record(name: str = "pm100-a", instance: str = "i1", **fields) -> DeviceRecord:
    fields.setdefault("address", "tcp://10.0.0.5:5555")
    fields.setdefault("host", "lab-pc-3")
    fields.setdefault("kind", "powermeter")
    return DeviceRecord(name=name, instance=instance, **fields)


def events(registry: Registry) -> list[tuple[str, str, str]]:
    return [(c.event, c.reason, c.record.name) for c in registry.drain_changes()]


# ---- records -----------------------------------------------------------------------------
def test_record_round_trips_through_the_wire_form():
    original = record(
        metrics_url="http://10.0.0.5:9105/metrics",
        labels={"room": "b12"},
        resources={"Dev1": ["line0"]},
        protocols=["labmesh/1", "laplace"],
        version="0.1.0",
        started=1700000000.5,
    )
    assert DeviceRecord.from_dict(original.to_dict()) == original


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "bad name"}, "not a valid device name"),
        ({"name": ""}, "not a valid device name"),
        ({"address": "10.0.0.5:5555"}, "must be a ZeroMQ endpoint"),
        ({"address": "udp://10.0.0.5:5555"}, "must use one of"),
        ({"address": "tcp://0.0.0.0:5555"}, "listening wildcard"),
        ({"address": "tcp://*:5555"}, "listening wildcard"),
        ({"address": "tcp://10.0.0.5"}, "has no port"),
        ({"instance": ""}, "'instance' is required"),
        ({"labels": {"room": 12}}, "'labels' must map strings to strings"),
        ({"protocols": "labmesh/1"}, "'protocols' must be a list of strings"),
        ({"started": "yesterday"}, "'started' must be epoch seconds"),
        ({"metrics_url": "10.0.0.5:9105"}, "must look like http://HOST:PORT/metrics"),
        ({"metrics_url": "http://0.0.0.0:9105/metrics"}, "wildcard host"),
        ({"kind": 3}, "'kind' must be a string"),
    ],
)
def test_invalid_records_are_refused_naming_the_field(change, message):
    with pytest.raises(InvalidRecordError, match=message):
        DeviceRecord.from_dict({**record().to_dict(), **change})
    assert isinstance(InvalidRecordError("x"), ValueError)


def test_ipc_addresses_need_no_port():
    assert DeviceRecord.from_dict({**record().to_dict(), "address": "ipc:///tmp/pm"}).address


# ---- registration, uniqueness, TTL --------------------------------------------------------
def test_register_lookup_and_expiry_after_ttl():
    reg = Registry(ttl_s=10)
    reg.register(record(), now=100.0)
    assert reg.lookup("pm100-a", 109.9).address == "tcp://10.0.0.5:5555"
    assert reg.expire(109.9) == []
    # past the TTL the record is invisible at once, and expire() removes it
    with pytest.raises(UnknownDeviceError):
        reg.lookup("pm100-a", 110.0)
    assert [r.name for r in reg.expire(110.0)] == ["pm100-a"]
    assert reg.expire(200.0) == []
    assert events(reg) == [
        ("added", "registered", "pm100-a"),
        ("removed", "expired", "pm100-a"),
    ]


def test_heartbeat_renews_and_reports_unknown_records():
    reg = Registry(ttl_s=10)
    reg.register(record(), 0.0)
    assert reg.heartbeat("pm100-a", "i1", 9.0) is True
    assert reg.lookup("pm100-a", 18.0).name == "pm100-a"  # alive until 19
    assert reg.heartbeat("pm100-a", "other-instance", 18.0) is False
    assert reg.heartbeat("nobody", "i1", 18.0) is False
    assert reg.heartbeat("pm100-a", "i1", 19.0) is False  # too late: it has expired
    assert reg.get("pm100-a", 19.0) is None


def test_a_second_live_claimant_is_refused_naming_the_holder():
    reg = Registry(ttl_s=10)
    reg.register(record(), 0.0)
    reg.heartbeat("pm100-a", "i1", 4.0)
    with pytest.raises(NameTakenError) as info:
        reg.register(record(instance="i2", address="tcp://10.0.0.9:5555", host="pc-9"), 6.0)
    message = str(info.value)
    assert "'pm100-a' is already registered by the server at tcp://10.0.0.5:5555" in message
    assert "on host lab-pc-3" in message
    assert "last heartbeat 2.0 s ago" in message and "expires in 8.0 s" in message
    assert info.value.details["holder"] == {
        "address": "tcp://10.0.0.5:5555",
        "host": "lab-pc-3",
        "instance": instance_tag("i1"),  # never the id itself: it would remove the record
    }
    assert "i1" not in message.replace(instance_tag("i1"), "")
    assert reg.lookup("pm100-a", 6.0).instance == "i1"  # the holder is untouched
    # once the holder's record has expired, the name is free
    reg.register(record(instance="i2", address="tcp://10.0.0.9:5555"), 14.0)
    assert reg.lookup("pm100-a", 14.0).address == "tcp://10.0.0.9:5555"
    assert events(reg) == [
        ("added", "registered", "pm100-a"),
        ("removed", "expired", "pm100-a"),
        ("added", "registered", "pm100-a"),
    ]


def test_same_instance_re_registering_refreshes_and_reports_changes_only():
    reg = Registry(ttl_s=10)
    reg.register(record(), 0.0)
    reg.register(record(), 5.0)  # a refresh: no event
    assert reg.get("pm100-a", 14.0) is not None
    reg.register(record(labels={"room": "b12"}), 6.0)
    assert reg.lookup("pm100-a", 6.0).labels == {"room": "b12"}
    assert events(reg) == [("added", "registered", "pm100-a"), ("updated", "changed", "pm100-a")]


def test_re_registration_after_a_discovery_restart():
    """A fresh registry knows nothing: heartbeats say so, and the server registers again."""
    reg = Registry(ttl_s=10)
    assert reg.heartbeat("pm100-a", "i1", 50.0) is False
    reg.register(record(), 50.0)
    assert reg.heartbeat("pm100-a", "i1", 53.0) is True


def test_deregister_needs_the_holding_instance():
    reg = Registry(ttl_s=10)
    reg.register(record(), 0.0)
    assert reg.deregister("pm100-a", "someone-else", 1.0) is None
    assert reg.deregister("nobody", "i1", 1.0) is None
    assert reg.deregister("pm100-a", "i1", 1.0).name == "pm100-a"
    assert reg.count(1.0) == 0
    assert events(reg)[-1] == ("removed", "deregistered", "pm100-a")


def test_unknown_name_suggests_close_names_and_explains_recent_removal():
    reg = Registry(ttl_s=10)
    for name in ("pm100-a", "pm100-b", "daq-1"):
        reg.register(record(name, instance=name), 0.0)
    with pytest.raises(UnknownDeviceError, match=r"'pm100-c' is registered; did you mean") as info:
        reg.lookup("pm100-c", 1.0)
    assert info.value.details["name"] == "pm100-c"
    assert sorted(info.value.details["close"]) == ["pm100-a", "pm100-b"]
    assert isinstance(info.value, LookupError)
    with pytest.raises(UnknownDeviceError, match=r"3 device\(s\) registered"):
        reg.lookup("zzz", 1.0)
    reg.deregister("daq-1", "daq-1", 2.0)
    with pytest.raises(UnknownDeviceError, match=r"daq-1 at .* was removed 3.0 s ago"):
        reg.lookup("daq-1", 5.0)
    with pytest.raises(UnknownDeviceError, match="stopped heartbeating"):
        reg.lookup("pm100-a", 10.5)  # expired, not yet purged


def test_queries_by_name_kind_host_and_labels():
    reg = Registry(ttl_s=10)
    reg.register(record("pm100-a", "1", labels={"room": "b12", "owner": "ana"}), 0.0)
    reg.register(record("pm100-b", "2", host="pc-2", labels={"room": "b14"}), 0.0)
    reg.register(record("daq-1", "3", kind="daq", labels={"room": "b12"}), 0.0)
    reg.register(record("old", "4"), -9.0)  # expires at 1.0

    def names(**filters):
        return [e.record.name for e in reg.query(2.0, **filters)]

    assert names() == ["daq-1", "pm100-a", "pm100-b"]
    assert names(name="pm100-*") == ["pm100-a", "pm100-b"]
    assert names(kind="daq") == ["daq-1"]
    assert names(host="pc-2") == ["pm100-b"]
    assert names(labels={"room": "b12"}) == ["daq-1", "pm100-a"]
    assert names(labels={"room": "b12", "owner": "ana"}) == ["pm100-a"]
    assert names(kind="powermeter", labels={"room": "b12"}) == ["pm100-a"]
    assert names(name="nothing*") == []
    assert reg.count(2.0) == 3


def test_change_log_sequence_and_wire_form():
    reg = Registry(ttl_s=10)
    reg.register(record(), 0.0)
    reg.deregister("pm100-a", "i1", 1.0)
    changes = reg.drain_changes()
    assert [c.seq for c in changes] == [1, 2] and reg.seq == 2
    wire = changes[1].to_dict()
    assert wire["event"] == "removed" and wire["reason"] == "deregistered"
    assert wire["name"] == "pm100-a" and wire["record"]["address"] == "tcp://10.0.0.5:5555"
    assert reg.drain_changes() == []


def test_pending_changes_are_bounded():
    reg = Registry(ttl_s=10, max_pending_changes=3)
    for i in range(5):
        reg.register(record(f"d{i}", str(i)), 0.0)
    assert [c.seq for c in reg.drain_changes()] == [3, 4, 5]  # the gap shows what was lost


def test_views_carry_ttl_bookkeeping():
    reg = Registry(ttl_s=10)
    reg.register(record(), 0.0)
    reg.heartbeat("pm100-a", "i1", 4.0)
    view = reg.get("pm100-a", 6.0).view(6.0)
    assert view["registered_for_s"] == 6.0
    assert view["last_seen_s"] == 2.0
    assert view["expires_in_s"] == 8.0
    assert view["instance"] == instance_tag("i1") != "i1"


def test_ttl_must_be_positive():
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        Registry(ttl_s=0)


def test_random_operations_keep_names_unique_and_expiry_exact():
    """Thousands of random operations against a simple model of what must be true."""
    rng = random.Random(5)
    reg = Registry(ttl_s=5)
    model: dict[str, tuple[str, float]] = {}  # name -> (instance, expires_at)
    now = 0.0
    for _ in range(5000):
        now += rng.random()
        name = f"d{rng.randrange(8)}"
        instance = f"i{rng.randrange(3)}"
        live = {n: v for n, v in model.items() if v[1] > now}
        op = rng.randrange(4)
        if op == 0:
            if name in live and live[name][0] != instance:
                with pytest.raises(NameTakenError):
                    reg.register(record(name, instance), now)
            else:
                reg.register(record(name, instance), now)
                model[name] = (instance, now + 5)
        elif op == 1:
            known = name in live and live[name][0] == instance
            assert reg.heartbeat(name, instance, now) is known
            if known:
                model[name] = (instance, now + 5)
        elif op == 2:
            removed = reg.deregister(name, instance, now)
            if name in model and model[name][0] == instance:
                assert removed is not None
                del model[name]
            else:
                assert removed is None
        else:
            expired = {r.name for r in reg.expire(now)}
            assert expired == {n for n, v in model.items() if v[1] <= now}
            model = {n: v for n, v in model.items() if v[1] > now}
        assert {e.record.name: e.record.instance for e in reg.query(now)} == {
            n: v[0] for n, v in model.items() if v[1] > now
        }


# ---- beacon datagrams (pure: the network test is in tests/system) ---------------------------
def test_announcement_round_trip_substitutes_wildcards_with_the_sender():
    data = encode_announcement(
        ["tcp://0.0.0.0:5550", "tcp://10.1.1.1:5560"],
        instance="abc",
        pub="tcp://0.0.0.0:5551",
        http="http://0.0.0.0:5552",
    )
    announcement = decode_announcement(data, "10.9.8.7")
    assert announcement.endpoints == ("tcp://10.9.8.7:5550", "tcp://10.1.1.1:5560")
    assert announcement.pub == "tcp://10.9.8.7:5551"
    assert announcement.http == "http://10.9.8.7:5552"
    assert announcement.instance == "abc" and announcement.source == "10.9.8.7"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe",
        b"[1, 2]",
        b'{"service": "something-else", "endpoints": ["tcp://a:1"]}',
        b'{"service": "labmesh-discovery", "endpoints": []}',
        b'{"service": "labmesh-discovery", "endpoints": ["not an endpoint"]}',
        b'{"service": "labmesh-discovery", "endpoints": ["tcp://a:1"], "http": 5}',
    ],
)
def test_foreign_or_broken_datagrams_are_rejected(data):
    with pytest.raises(ValueError):
        decode_announcement(data, "10.0.0.1")


def test_announcements_fit_one_datagram():
    with pytest.raises(ValueError, match="exceeds"):
        encode_announcement([f"tcp://host-{i}.example:5550" for i in range(100)], instance="x")
    assert len(encode_announcement(["tcp://0.0.0.0:5550"], instance="x")) < MAX_DATAGRAM_BYTES


def test_substitute_wildcard():
    assert substitute_wildcard("tcp://*:5550", "10.0.0.1") == "tcp://10.0.0.1:5550"
    assert substitute_wildcard("tcp://[::]:5550", "fe80::1") == "tcp://[fe80::1]:5550"
    assert substitute_wildcard("http://0.0.0.0:80/x", "h") == "http://h:80/x"
    assert substitute_wildcard("tcp://lab-core:5550", "10.0.0.1") == "tcp://lab-core:5550"


# ---- endpoints and advertised addresses ----------------------------------------------------
def test_endpoint_lists_from_config_or_environment(monkeypatch):
    assert parse_endpoints("lab-core, tcp://10.0.0.2:6000,lab-core") == (
        False,
        ["tcp://lab-core:5550", "tcp://10.0.0.2:6000"],
    )
    assert parse_endpoints(["auto"]) == (True, [])
    monkeypatch.setenv("LABMESH_DISCOVERY", "auto,lab-core:7000")
    assert parse_endpoints(None) == (True, ["tcp://lab-core:7000"])
    monkeypatch.delenv("LABMESH_DISCOVERY")
    assert parse_endpoints(None) == (False, [])
    assert normalize_endpoint("[::1]:5550") == "tcp://[::1]:5550"


def test_advertised_address_is_never_a_wildcard():
    toward = "tcp://127.0.0.1:5550"
    assert advertised_address("tcp://*:5555", toward) == "tcp://127.0.0.1:5555"
    assert advertised_address("tcp://0.0.0.0:5555", toward) == "tcp://127.0.0.1:5555"
    assert advertised_address("http://0.0.0.0:9105/metrics", toward) == (
        "http://127.0.0.1:9105/metrics"
    )
    assert advertised_address("tcp://10.0.0.5:5555", toward) == "tcp://10.0.0.5:5555"
    assert advertised_address("tcp://*:5555", toward, advertise="pc-3.lab") == (
        "tcp://pc-3.lab:5555"
    )
    assert advertised_address("ipc:///tmp/pm", toward) == "ipc:///tmp/pm"
    # no route to compute (no discovery endpoint, or an unusable one): this host's address
    for toward in (None, "tcp://127.0.0.1:not-a-port"):
        fallback = advertised_address("tcp://*:5555", toward)
        assert fallback.startswith("tcp://") and fallback.endswith(":5555")
        assert fallback[len("tcp://") : -len(":5555")] not in ("*", "0.0.0.0", "::", "")


def test_one_key_two_live_servers_one_name_the_second_is_refused_a_restart_replaces():
    registry = Registry(ttl_s=9.0)
    first = DeviceRecord(name="cam", address="tcp://10.0.0.1:5555", instance="a", owner="K" * 40)
    registry.register(first, 0.0)
    elsewhere = DeviceRecord(
        name="cam", address="tcp://10.0.0.2:5555", instance="b", owner="K" * 40
    )
    with pytest.raises(NameTakenError):
        registry.register(elsewhere, 1.0)  # the first is alive (last heard 1 s ago)
    assert registry.lookup("cam", 1.0).address == "tcp://10.0.0.1:5555"
    restarted = DeviceRecord(
        name="cam", address="tcp://10.0.0.1:5555", instance="c", owner="K" * 40
    )
    registry.register(restarted, 2.0)  # the same address: the host restarted
    assert registry.lookup("cam", 2.0).instance == "c"
    registry.register(elsewhere, 6.0)  # 4 s without a heartbeat (> TTL/3): it moved
    assert registry.lookup("cam", 6.0).address == "tcp://10.0.0.2:5555"
