"""Issue 15 with real CurveZMQ sockets: keys, roles, the plaintext listener, discovery records
owned by keys, the audit trail. Every server listens on 127.0.0.1; keys are made in tmp_path
by `labmesh.keys` (pyzmq's zmq.auth), the handshakes are libzmq's."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from labmesh import RemoteError, build_async_client, build_client, metrics
from labmesh import client as client_module
from labmesh.audit import AuditLog
from labmesh.compat.laplace import LaplaceAdapter
from labmesh.discovery import DeviceRecord, DiscoveryService, Registrar, Resolver
from labmesh.discovery.registry import NameTakenError
from labmesh.discovery.resolver import DiscoveryUnavailableError
from labmesh.drivers.motor import MotorStage
from labmesh.keys import new_key_pair
from labmesh.protocol import laplace as env
from labmesh.security import RELOAD_S, Keyring, ServerSecurity, load_key_pair
from labmesh.server import DeviceServer

from support import MemoryMeter, free_base, serve, wait_until

_real_dealer_socket = client_module.dealer_socket

pytestmark = pytest.mark.integration

PEOPLE = ("alice", "bob", "carol", "mallory", "host-a", "host-b", "lab-core")


class Lab:
    """Key pairs in `dir`; the public keys of everyone but mallory in `clients`."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "keys"
        self.clients = root / "clients"
        self.clients.mkdir(parents=True)
        for name in PEOPLE:
            public, _ = new_key_pair(self.dir, name)
            if name != "mallory":
                shutil.copy(public, self.clients / public.name)

    def pair(self, name: str):
        return load_key_pair(name, self.dir)

    def keyring(self) -> Keyring:
        return Keyring(directories=[self.clients])


@pytest.fixture
def lab(tmp_path) -> Lab:
    return Lab(tmp_path)


ROLES = {"alice": "operator", "bob": "observer", "carol": "admin"}


def secured(
    lab: Lab, device: Any = None, *, plaintext: str | None = None, audit: AuditLog | None = None
) -> DeviceServer:
    security = ServerSecurity(
        lab.pair("host-a"),
        lab.keyring(),
        ROLES,
        plaintext or "none",
        "tcp://127.0.0.1:0" if plaintext else None,
    )
    return serve(device or MemoryMeter("psu-1"), security=security, audit=audit)


def client(server: DeviceServer, who: str, lab: Lab, **options: Any):
    options.setdefault("timeout", 3000)
    return build_client(server.address, key=lab.pair(who), server_key=server.server_key, **options)


def counted(device: str, event: str, outcome: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == "labmesh_audit_events_total" and sample.labels == {
                "device": device,
                "event": event,
                "outcome": outcome,
            }:
                total += sample.value
    return total


# ---- keys and the handshake ------------------------------------------------------------------
def test_a_wrong_server_key_gets_no_connection_and_says_so(lab):
    srv = secured(lab)
    audit_before = counted("psu-1", "write", "ok")
    try:
        with pytest.raises(ConnectionRefusedError, match="server's key is not the one"):
            build_client(
                srv.address,
                key=lab.pair("alice"),
                server_key=lab.pair("mallory").public,  # an impostor's key
                timeout=800,
                retries=0,
            )
        assert counted("psu-1", "write", "ok") == audit_before
    finally:
        srv.stop()


def test_an_unknown_client_key_is_refused_at_the_handshake(lab):
    srv = secured(lab)
    try:
        started = time.monotonic()
        with pytest.raises(PermissionError, match="refused this client's CurveZMQ key"):
            client(srv, "mallory", lab, timeout=800, retries=0)
        assert time.monotonic() - started < 3
        # and a plaintext peer cannot reach the CurveZMQ port at all
        with pytest.raises(TimeoutError):
            build_client(srv.address, timeout=500, retries=0)
    finally:
        srv.stop()


def test_a_client_without_a_key_is_told_what_to_set(lab, monkeypatch):
    monkeypatch.delenv("LABMESH_KEY", raising=False)
    srv = secured(lab)
    try:
        with pytest.raises(Exception, match="set LABMESH_KEY to your key pair"):
            build_client(srv.address, server_key=srv.server_key, timeout=500)
    finally:
        srv.stop()


def test_roles_observer_reads_operator_writes_and_refusals_are_named_counted_audited(lab, tmp_path):
    trail = tmp_path / "audit.jsonl"
    srv = secured(lab, audit=AuditLog(trail))
    denied_before = counted("psu-1", "write", "denied")
    try:
        with client(srv, "bob", lab) as bob, client(srv, "alice", lab) as alice:
            assert bob.query("WAVELENGTH") == 532.0
            with pytest.raises(PermissionError) as refused:
                bob.write("WAVELENGTH", 700.0)
            text = str(refused.value)
            assert "needs role operator" in text and "'bob' has role observer" in text
            assert refused.value.reply["needed"] == "operator"
            assert bob.query("WAVELENGTH") == 532.0  # nothing changed
            with pytest.raises(PermissionError, match="needs role operator"):
                bob.call("add", 1.0)
            with pytest.raises(PermissionError, match="connect .*needs role operator"):
                client(srv, "bob", lab, resources="Dev1/port0")
            assert alice.write("WAVELENGTH", 700.0) is True
            assert bob.query("WAVELENGTH") == 700.0
        assert counted("psu-1", "write", "denied") == denied_before + 1
        assert srv.audit.flush()
        rows = [json.loads(line) for line in trail.read_text().splitlines()]
        events = [(r["event"], r["client"], r["target"], r["outcome"]) for r in rows]
        assert ("write", "bob", "WAVELENGTH", "denied") in events
        assert ("write", "alice", "WAVELENGTH", "ok") in events
        assert all(r["peer"] == "127.0.0.1" for r in rows if r["event"] == "write")
    finally:
        srv.stop()


def test_admin_force_releases_a_lock_and_nobody_else_can(lab, tmp_path):
    trail = tmp_path / "audit.jsonl"
    srv = secured(lab, audit=AuditLog(trail))
    try:
        holder = client(srv, "alice", lab, resources="Dev1/port0", lease_s=10)
        with client(srv, "alice", lab) as other_operator, client(srv, "carol", lab) as admin:
            with pytest.raises(PermissionError, match="force_release .*needs role admin"):
                other_operator.force_release("Dev1/port0")
            assert len(admin.locks()["holders"]) == 2
            assert admin.locks()["holders"][0]["metadata"]["key"] == "alice"
            freed = admin.force_release(["Dev1/port0"])["released"]
            assert freed[0]["resources"] == ["Dev1/port0/line0", "Dev1/port0/line1"]
            assert admin.locks()["holders"] == []
        with pytest.raises(RemoteError, match="session is unknown here"):
            holder.write("AUTORANGE", True)
        holder.close()
        assert srv.audit.flush()
        rows = [json.loads(line) for line in trail.read_text().splitlines()]
        kinds = [(r["event"], r["client"]) for r in rows]
        assert ("lock_grant", "alice") in kinds
        assert ("force_release", "carol") in kinds
        outcomes = [(r["event"], r["client"], r["outcome"]) for r in rows]
        assert ("force_release", "alice", "denied") in outcomes
    finally:
        srv.stop()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_handshake_refused_before_the_first_send_is_an_error_not_a_hang(
    lab, monkeypatch, flavour
):
    """A DEALER whose CurveZMQ handshake was refused has no connection left (libzmq does not
    reconnect after it), and a plain send then blocks for good. On a loaded machine the refusal
    can come between connecting the socket and sending the first request: the client hung in
    `build_client` (seen as a 15-minute hang of the integration tier beside a CPU burner)."""
    srv = secured(lab)
    real_monitor = client_module.handshake_monitor

    def monitor_then_fall_behind(sock: zmq.Socket) -> zmq.Socket:
        monitor = real_monitor(sock)
        time.sleep(1.0)  # the refusal arrives before the first send
        return monitor

    monkeypatch.setattr(client_module, "handshake_monitor", monitor_then_fall_behind)
    if flavour == "async":  # (its timeouts stay plain: no monitor; the refusal still races)
        monkeypatch.setattr(client_module, "dealer_socket", _dealer_then_fall_behind)
    outcome: dict[str, BaseException] = {}

    def attempt() -> None:
        try:
            if flavour == "sync":
                client(srv, "mallory", lab, timeout=800, retries=0)
            else:
                asyncio.run(
                    build_async_client(
                        srv.address,
                        key=lab.pair("mallory"),
                        server_key=srv.server_key,
                        timeout=800,
                        retries=0,
                    )
                )
        except BaseException as exc:  # what the caller would see
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(20)
    try:
        assert not thread.is_alive(), "the first request's send blocked"
        error = outcome["error"]
        if flavour == "sync":
            assert isinstance(error, PermissionError), error
            assert "refused this client's CurveZMQ key" in str(error)
        else:
            assert isinstance(error, TimeoutError), error
    finally:
        srv.stop()


def _dealer_then_fall_behind(*args: Any, **kwargs: Any) -> zmq.Socket:
    sock = _real_dealer_socket(*args, **kwargs)
    time.sleep(1.0)  # the refusal arrives before the first send
    return sock


def test_a_key_file_added_or_removed_takes_effect_without_a_restart(lab):
    srv = secured(lab)
    dave_public, _ = new_key_pair(lab.dir, "dave")
    try:
        with pytest.raises(PermissionError):
            client(srv, "dave", lab, timeout=600, retries=0)
        shutil.copy(dave_public, lab.clients / "dave.key")
        time.sleep(RELOAD_S + 0.1)
        # known now (the server answers), but dave has no role on this device
        with pytest.raises(PermissionError, match="'dave' has role none"):
            client(srv, "dave", lab)
        (lab.clients / "bob.key").unlink()
        time.sleep(RELOAD_S + 0.1)
        with pytest.raises(PermissionError, match="refused this client's CurveZMQ key"):
            client(srv, "bob", lab, timeout=600, retries=0)
    finally:
        srv.stop()


def test_subscriptions_travel_over_curve(lab):
    srv = secured(lab)
    try:
        with client(srv, "bob", lab) as bob, client(srv, "alice", lab) as alice:
            sub = bob.subscribe("WAVELENGTH")
            assert sub.get(3).value == 532.0
            alice.write("WAVELENGTH", 640.0)
            assert sub.get(3).value == 640.0
            sub.close()
        # a raw SUB without keys hears nothing from the CurveZMQ feed
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(srv.pub_address)
        with client(srv, "alice", lab) as alice:
            for value in (650.0, 660.0):
                alice.write("WAVELENGTH", value)
        assert sock.poll(500) == 0
        sock.close()
    finally:
        srv.stop()


# ---- the plaintext listener ------------------------------------------------------------------
@pytest.mark.parametrize("role", ["observer", "none"])
def test_a_plaintext_client_gets_exactly_its_configured_role(lab, role):
    srv = secured(lab, plaintext=role)
    try:
        assert srv.plaintext_address and srv.plaintext_address != srv.address
        if role == "none":
            with pytest.raises(PermissionError, match="'plaintext' has role none"):
                build_client(srv.plaintext_address, timeout=2000, lease_s=None)
            return
        with build_client(srv.plaintext_address, timeout=2000, lease_s=None) as plain:
            assert plain.query("WAVELENGTH") == 532.0
            with pytest.raises(PermissionError, match="plaintext listener"):
                plain.write("WAVELENGTH", 700.0)
            assert plain.query("WAVELENGTH") == 532.0
    finally:
        srv.stop()


def test_laplace_on_the_plaintext_observer_listener_reads_and_is_refused_writes(lab):
    stage = MotorStage(("x",), limits={"x": (0, 100)}, speed=1000.0, name="stage-sec")
    security = ServerSecurity(
        lab.pair("host-a"), lab.keyring(), ROLES, "observer", "tcp://127.0.0.1:0"
    )
    srv = DeviceServer(
        stage, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter(), security=security
    ).start()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(srv.plaintext_address)
    try:
        for cmd, allowed in (("GET", True), ("SET", False), ("SAVE", False), ("STOP", False)):
            payload = {"x": 5.0} if cmd == "SET" else {"path": "run-1"} if cmd == "SAVE" else {}
            sock.send(json.dumps(env.request(cmd, payload, sender="Master")).encode())
            reply = json.loads(sock.recv())
            assert reply["cmd"] == cmd
            if allowed:
                assert reply["error_msg"] is None
            else:
                need = "admin" if cmd == "STOP" else "operator"
                assert f"needs role {need}" in reply["error_msg"], reply
        assert stage.positions()["x"] == 0.0
    finally:
        sock.close()
        srv.stop()


# ---- discovery: records belong to keys ---------------------------------------------------------
@pytest.fixture
def secured_discovery(lab) -> Iterator[DiscoveryService]:
    security = ServerSecurity(
        lab.pair("lab-core"),
        lab.keyring(),
        {"host-a": "operator", "host-b": "operator", "*": "observer"},
    )
    service = DiscoveryService(
        "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", http_port=None, security=security
    ).start()
    try:
        yield service
    finally:
        service.stop()


def raw_discovery(service: DiscoveryService, lab: Lab, who: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 2000)
    pair = lab.pair(who)
    sock.curve_serverkey = service.server_key.encode()
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.connect(service.address)
    return sock


def ask(sock: zmq.Socket, payload: dict) -> dict:
    sock.send_multipart([b"", json.dumps(payload).encode()])
    return json.loads(sock.recv_multipart()[-1])


def test_the_hijack_sequence_fails_end_to_end(lab, secured_discovery):
    service = secured_discovery
    srv = secured(lab, MemoryMeter("daq-hj"))
    registrar = Registrar(
        [service.address], key=lab.pair("host-a"), server_key=service.server_key
    ).start()
    try:
        registrar.add(
            DeviceRecord(
                name="daq-hj",
                address=srv.address,
                instance=srv.epoch,
                server_key=srv.server_key,
            )
        )
        assert registrar.wait_registered(5)
        # the attacker holds a key discovery knows (host-b), not host-a's
        attacker = raw_discovery(service, lab, "host-b")
        seen = ask(attacker, {"type": "lookup", "name": "daq-hj"})["result"]
        assert seen["instance"].startswith("tag-") and seen["server_key"] == srv.server_key
        for instance in (seen["instance"], srv.epoch):  # the tag, and even the real id
            gone = ask(attacker, {"type": "deregister", "name": "daq-hj", "instance": instance})
            assert gone["result"]["removed"] == []
            beat = ask(attacker, {"type": "heartbeat", "name": "daq-hj", "instance": instance})
            assert beat["result"]["unknown"] == ["daq-hj"]
        fake = {
            "name": "daq-hj",
            "address": "tcp://127.0.0.1:1",
            "instance": "attacker",
            "server_key": lab.pair("host-b").public.decode(),
        }
        taken = ask(attacker, {"type": "register", "record": fake})
        assert taken["status"] == "error" and taken["type"] == NameTakenError.wire_type
        lying = dict(fake, name="daq-lie", server_key=srv.server_key)  # someone else's key
        refused = ask(attacker, {"type": "register", "record": lying})
        assert (
            refused["status"] == "error" and "must be the key it is registered" in refused["error"]
        )
        # an observer key may look up but never register
        nosy = raw_discovery(service, lab, "bob")
        denied = ask(nosy, {"type": "register", "record": dict(fake, name="daq-bob")})
        assert denied["type"] == "PermissionError" and "needs role operator" in denied["error"]
        attacker.close()
        nosy.close()
        # for 100 of 100 lookups the name still leads to the real server, and a client that
        # connects by name gets the real server's key from discovery and works
        resolver = Resolver([service.address], server_key=service.server_key, key=lab.pair("bob"))
        for _ in range(100):
            assert resolver.lookup("daq-hj")["address"] == srv.address
        with build_client("daq-hj", discovery=resolver, key=lab.pair("bob"), timeout=3000) as c:
            assert c.query("WAVELENGTH") == 532.0
        resolver.close()
    finally:
        registrar.stop()
        srv.stop()


def test_a_restarted_host_replaces_its_own_record_at_once(lab, secured_discovery):
    service = secured_discovery
    sock = raw_discovery(service, lab, "host-a")
    try:
        first = {"name": "cam-1", "address": "tcp://127.0.0.1:7001", "instance": "run-1"}
        assert ask(sock, {"type": "register", "record": first})["status"] == "ok"
        second = dict(first, instance="run-2", started=1.0)  # the same host, restarted
        assert ask(sock, {"type": "register", "record": second})["status"] == "ok"
        assert service.devices(name="cam-1")[0]["started"] == 1.0
        # a second live server with the same key elsewhere does not take the name
        elsewhere = dict(first, instance="run-3", address="tcp://127.0.0.1:7002")
        taken = ask(sock, {"type": "register", "record": elsewhere})
        assert taken["status"] == "error" and taken["type"] == NameTakenError.wire_type
    finally:
        sock.close()


def test_a_wrong_discovery_key_is_reported_not_silently_timed_out(lab, secured_discovery):
    resolver = Resolver(
        [secured_discovery.address],
        server_key=lab.pair("mallory").public,
        key=lab.pair("alice"),
        timeout_s=0.8,
    )
    with pytest.raises(DiscoveryUnavailableError, match="handshake failed"):
        resolver.lookup("anything")
    resolver.close()


def test_audit_trail_rotates_within_its_bound(tmp_path):
    from labmesh.server.core import Audit

    trail = AuditLog(tmp_path / "a.jsonl", max_bytes=2000, backups=2)
    for i in range(200):
        trail.write("psu", Audit("write", "alice", "10.0.0.1", "VOLT", i, "ok", 0.0))
        if i % 10 == 0:
            trail.flush()  # several batches, so the rotation runs several times
    trail.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 3 * 2000 + 200
    last = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert last["value"] == 199 and last["client"] == "alice"


def test_audit_values_are_bounded(lab, tmp_path):
    trail = tmp_path / "audit.jsonl"
    srv = secured(lab, audit=AuditLog(trail))
    try:
        with client(srv, "alice", lab) as alice, pytest.raises(RemoteError):
            alice.write("MODE", "x" * 5000)
        assert wait_until(lambda: trail.exists() and trail.read_text())
        row = json.loads(trail.read_text().splitlines()[-1])
        assert row["outcome"] == "ValueError" and len(row["value"]) < 300
    finally:
        srv.stop()


def test_laplace_commands_that_change_things_leave_audit_lines(tmp_path):
    trail = tmp_path / "audit.jsonl"
    stage = MotorStage(("x",), limits={"x": (0, 100)}, speed=1000.0, name="stage-aud")
    srv = DeviceServer(
        stage, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter(), audit=AuditLog(trail)
    ).start()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(srv.address)
    try:
        for cmd, payload in (
            ("GET", {}),
            ("SET", {"positions": {"x": 5.0}}),
            ("SET", {"positions": {"x": 500.0}}),  # past the soft limit: refused
        ):  # (GET changes nothing: no line)
            sock.send(json.dumps(env.request(cmd, payload, sender="Master")).encode())
            sock.recv()
        assert wait_until(lambda: trail.exists() and len(trail.read_text().splitlines()) == 2)
        rows = [json.loads(line) for line in trail.read_text().splitlines()]
        assert [(r["event"], r["target"], r["outcome"]) for r in rows] == [
            ("laplace", "SET", "ok"),
            ("laplace", "SET", "LaplaceError"),
        ]
        assert rows[0]["value"] == {"positions": {"x": 5.0}}
    finally:
        sock.close()
        srv.stop()


def test_the_default_trail_falls_back_to_stdout_where_it_cannot_write(tmp_path, monkeypatch):
    from labmesh import audit

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # the state directory cannot be made below a file (even as root)
    monkeypatch.delenv("LABMESH_AUDIT", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(blocked))
    trail = audit.from_settings(None, "test")
    try:
        assert trail.path is None and trail.enabled  # stdout
    finally:
        trail.close()
    for setting, path in (("off", None), (str(tmp_path / "t.jsonl"), tmp_path / "t.jsonl")):
        made = audit.from_settings(setting, "test")
        assert made.path == path and made.enabled == (path is not None)
        made.close()
    with pytest.raises(ValueError, match="unknown audit option"):
        audit.from_settings({"fil": "x"}, "host.yaml: audit")


def test_a_secured_host_file_registers_keys_and_serves_by_name(lab, secured_discovery, monkeypatch):
    from labmesh.config import parse_host_config
    from labmesh.host import HostServer

    monkeypatch.setenv("LABMESH_KEYS", str(lab.dir))
    port = free_base(1)
    text = f"""\
host: secured-pc
bind: 127.0.0.1
discovery: {secured_discovery.address}
metrics_port: null
security:
  key: host-a
  clients: {lab.clients}
  discovery_key: lab-core
  roles: {{alice: operator, "*": observer}}
audit: off
devices:
  - name: stage-s
    driver: motor
    port: {port}
    options: {{axes: [x], limits: {{x: [0, 10]}}, speed: 1000.0}}
"""
    host = HostServer(parse_host_config(text, "secured.yaml"), sim=True).start()
    try:
        assert host.wait_ready(10)
        assert wait_until(lambda: secured_discovery.devices(name="stage-s"), 10)
        record = secured_discovery.devices(name="stage-s")[0]
        assert record["server_key"] == lab.pair("host-a").public.decode()
        resolver = Resolver(
            [secured_discovery.address],
            server_key=secured_discovery.server_key,
            key=lab.pair("bob"),
        )
        with build_client("stage-s", discovery=resolver, key=lab.pair("alice")) as alice:
            alice.move_abs("x", 2.0)
            assert alice.positions()["x"] == 2.0
        with build_client("stage-s", discovery=resolver, key=lab.pair("bob")) as bob:
            assert bob.positions()["x"] == 2.0
            with pytest.raises(PermissionError, match="'bob' has role observer"):
                bob.move_abs("x", 3.0)
        resolver.close()
    finally:
        host.stop()


def test_force_release_needs_a_secured_device(tmp_path):
    srv = serve(MemoryMeter("psu-open"))
    try:
        holder = build_client(srv.address, resources="Dev1/port0", timeout=2000)
        with build_client(srv.address, timeout=2000) as stranger:
            with pytest.raises(PermissionError, match="needs a secured device"):
                stranger.force_release("Dev1/port0")
            assert len(stranger.locks()["holders"]) == 2  # still held
        holder.close()
    finally:
        srv.stop()


def test_a_key_file_replaced_in_place_is_noticed(lab):
    ring = lab.keyring()
    alice = lab.pair("alice").public.decode()
    assert ring.name_of(alice) == "alice"
    # the admin overwrites alice.key with mallory's public key (same file name)
    shutil.copy(lab.dir / "mallory.key", lab.clients / "alice.key")
    time.sleep(RELOAD_S + 0.1)
    assert ring.name_of(alice) is None
    assert ring.name_of(lab.pair("mallory").public.decode()) == "alice"


def test_an_observer_cannot_borrow_a_read_only_operation_to_write_or_lock(lab):
    """Review finding: `func` naming a read-only operation lowered the role for any request."""
    stage = MotorStage(("x",), limits={"x": (0, 100)}, speed=1000.0, name="stage-ro")
    srv = secured(lab, stage)
    try:
        with client(srv, "bob", lab) as bob:
            assert bob.positions() == {"x": 0.0}  # a read-only call: allowed to an observer
            for payload in (
                {"type": "write", "param": "x/speed", "value": 5.0, "func": "positions"},
                {"type": "call", "func": "move_abs", "args": ["x", 5.0]},
                {"type": "connect", "resources": ["x"], "func": "positions"},
            ):
                with pytest.raises(PermissionError, match="needs role operator"):
                    bob._request(payload, attempts=1)
        assert stage.positions()["x"] == 0.0 and srv.locks.holders(0.0) == []
    finally:
        srv.stop()


def test_a_server_whose_second_endpoint_cannot_be_bound_fails_at_once(lab):
    """Review finding: the wake-up socket kept the context from ending: the constructor hung."""
    import threading

    from labmesh.server import DeviceServer

    outcome: list[BaseException] = []

    def build() -> None:
        try:
            DeviceServer(
                MemoryMeter("twice"), address="inproc://twice", pub_address="inproc://twice"
            )
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "DeviceServer() hung"
    assert outcome and isinstance(outcome[0], OSError) and "cannot publish" in str(outcome[0])


def test_audit_follow_keeps_every_line_across_a_rotation(tmp_path):
    from labmesh.audit import follow

    path = tmp_path / "trail.jsonl"
    path.write_text("a\n")
    lines = follow(path, lines=10, forever=True, poll_s=0.01)
    assert next(lines) == "a"
    with path.open("a") as old:
        old.write("b\n")
    os.replace(path, tmp_path / "trail.jsonl.1")  # the writer rotates
    path.write_text("c\n")
    assert [next(lines), next(lines)] == ["b", "c"]
    lines.close()


def test_audit_lines_beyond_the_queue_bound_are_dropped_and_counted_in_the_trail(monkeypatch):
    """A disk (or pipe) that stalls never makes the server hold unbounded lines: past
    MAX_PENDING_LINES they are dropped, and the trail says how many once it moves again."""
    import threading

    from labmesh import audit
    from labmesh.server.core import Audit

    monkeypatch.setattr(audit, "MAX_PENDING_LINES", 50)
    release = threading.Event()
    written: list[str] = []

    class StalledPipe:
        def write(self, text: str) -> None:
            release.wait(10)
            written.append(text)

        def flush(self) -> None:
            pass

    trail = audit.AuditLog(stream=StalledPipe())
    trail.write("psu", Audit("write", "alice", None, "VOLT", 0, "ok", 0.0))
    assert trail.flush(0.5) is False  # the writer is stuck in the pipe with the first batch
    for i in range(1, 300):
        trail.write("psu", Audit("write", "alice", None, "VOLT", i, "ok", 0.0))
    assert len(trail._pending) == 50  # held, at most
    release.set()
    assert trail.flush(5)
    trail.write("psu", Audit("write", "alice", None, "VOLT", 999, "ok", 0.0))
    trail.close()
    rows = [json.loads(line) for chunk in written for line in chunk.splitlines()]
    dropped = [r for r in rows if r["event"] == "audit_dropped"]
    assert dropped == [dropped[0]] and dropped[0]["value"] == 249
    assert len([r for r in rows if r["event"] == "write"]) == 1 + 50 + 1
