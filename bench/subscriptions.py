"""Subscriptions: many parameters updating into one client process (issue 14's scenario).

1,000 parameters, each updated 10 times a second (10,000 updates/s), pushed by the device and
received by one client process that wants every one of them, for a fixed window:
- floor: a raw pyzmq PUB publishing one JSON message per update (the labmesh update shape),
  and a raw SUB decoding each one;
- labmesh: a DeviceServer whose driver publishes with `Device.publish`, and a labmesh client
  subscribed to the 1,000 names with a callback.
Reported per system: client CPU and server CPU (% of one core, from /proc and process_time over
the window), updates lost (by sequence numbers), and the p99 delay from the server's timestamp
to the client's callback. Every process runs on 127.0.0.1 and ends by itself.

    python -m bench.subscriptions [--params 1000] [--rate 10] [--seconds 10]

Where the peers' virtualenv exists (`.cache/peers-venv`, built from PyPI by scripts/peers_env.py
or `python -m bench --build-peers`; the older `.cache/epics-venv` is used for Channel Access
alone when only it exists), the same run measures the best-known Python stacks too, each server
and client run by that virtualenv's Python:
- Channel Access: a caproto server with the same PVs, monitored by pyepics (the C libca) and by
  caproto's client, kept on 127.0.0.1 (address lists, beacons and the repeater on free ports);
- PyTango: a device server without a database (`-nodb`, ORB endpoint giop:tcp:127.0.0.1:PORT)
  with the same 1,000 attributes (`set_change_event(name, True, False)`), pushed with
  `push_change_event` from a thread, and a client subscribed to CHANGE_EVENT on every one
  (the pushed value is the tick number, so gaps count as lost).
Every server is checked (from /proc) to listen on loopback addresses only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, PeerStacks, check_loopback_only, find_peer_stacks, stop_child

#: labmesh's targets (client CPU %, server CPU %); the report also prints what the issue
#: measured for the peers on this machine as anchors (the peers' rows, when their virtualenv
#: exists, are this run's own figures).
TARGET_CLIENT_CPU = 20.0
TARGET_SERVER_CPU = 25.0
#: (params, rate, seconds) of `--quick`.
QUICK_SUBSCRIPTIONS = (200, 10.0, 2.0)
FLOOR, LABMESH = (
    "floor: raw pyzmq PUB/SUB, one JSON message per update",
    "labmesh: Device.publish -> client.subscribe callback",
)
LABMESH_CURVE = "labmesh over CurveZMQ (keys, roles): the same"
PYEPICS, CAPROTO = (
    "pyepics (libca) monitors, caproto server",
    "caproto client monitors, caproto server",
)
PYTANGO = "PyTango change events: push_change_event -> subscribe_event callback"
TANGO_DEVICE = "bench/many/1"


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the servers (each its own process) -------------------------------------------------------
def _publish_loop(publish: Any, params: int, rate: float, seconds: float) -> None:
    names = [f"p{i:04d}" for i in range(params)]
    period = 1.0 / rate
    due = time.perf_counter()
    for tick in range(int(rate * seconds)):
        for name in names:
            publish(name, float(tick))
        due += period
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def serve_floor(params: int) -> None:
    import zmq

    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.bind("tcp://127.0.0.1:0")
    print("ADDRESS " + pub.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
    seq: dict[str, int] = {}

    def publish(name: str, value: float) -> None:
        topic = f"{name}\0\0"
        seq[name] = seq.get(name, 0) + 1
        body = {"topic": topic, "name": name, "value": value, "ts": time.time(), "seq": seq[name]}
        pub.send_multipart((topic.encode(), json.dumps(body).encode()))

    _serve_commands(lambda rate, seconds: _publish_loop(publish, params, rate, seconds))


def serve_labmesh(params: int, curve: bool = False) -> None:
    from labmesh import Device, Parameter, build_server

    class Many(Device):
        kind = "bench"

        def __init__(self) -> None:
            super().__init__("many")
            for i in range(params):
                self.declare(Parameter(float, read_only=True, name=f"p{i:04d}"))

        def _query_(self, name: str) -> float:
            return 0.0

    device = Many()
    security = None
    if curve:  # the keys bench.security made for this run
        from bench.security import CLIENT, _keys
        from labmesh.security import Keyring, ServerSecurity

        server_pair, _client, directory = _keys()
        security = ServerSecurity(
            server_pair, Keyring(directories=[directory]), {CLIENT: "observer"}
        )
    server = build_server(device, address="tcp://127.0.0.1:0", security=security).start()
    print("ADDRESS " + server.address, flush=True)
    try:
        _serve_commands(lambda rate, seconds: _publish_loop(device.publish, params, rate, seconds))
    finally:
        server.stop()


def _serve_commands(run: Any) -> None:
    """Read `go RATE SECONDS` lines from stdin (publish), until stdin closes."""
    for line in sys.stdin:
        parts = line.split()
        if parts and parts[0] == "go":
            run(float(parts[1]), float(parts[2]))
            print("DONE", flush=True)


def serve_caproto(params: int) -> None:
    """A caproto Channel Access server with `params` float PVs (run by the EPICS virtualenv)."""
    import asyncio

    from caproto.asyncio.server import Context
    from caproto.server import PVGroup, pvproperty

    names = [f"p{i:04d}" for i in range(params)]
    group_class = type(
        "Many", (PVGroup,), {name: pvproperty(value=0.0, name=name) for name in names}
    )
    group = group_class(prefix="bench:")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                parts = line.split()
                if parts and parts[0] == "go":
                    loop.call_soon_threadsafe(commands.put_nowait, parts[1:])
            loop.call_soon_threadsafe(commands.put_nowait, None)

        threading.Thread(target=read_stdin, daemon=True).start()
        context = Context(group.pvdb, ["127.0.0.1"])
        serving = asyncio.create_task(context.run(log_pv_names=False))
        await asyncio.sleep(1.0)
        print("ADDRESS ca", flush=True)
        pvs = [getattr(group, name) for name in names]
        while (command := await commands.get()) is not None:
            rate, seconds = float(command[0]), float(command[1])
            due = loop.time()
            for tick in range(int(rate * seconds)):
                for pv in pvs:
                    await pv.write(float(tick + 1))
                due += 1.0 / rate
                await asyncio.sleep(max(0.0, due - loop.time()))
            print("DONE", flush=True)
        serving.cancel()

    asyncio.run(main())


def serve_tango(params: int) -> None:
    """A PyTango device server (no database, 127.0.0.1) with `params` float attributes whose
    change events are pushed by the code (run by the peers' virtualenv)."""
    import tango
    from tango.server import Device

    from bench.stacks import free_port, run_tango, tango_address

    port = free_port()
    names = [f"p{i:04d}" for i in range(params)]

    class Many(Device):
        def init_device(self) -> None:
            super().init_device()
            for name in names:
                attr = tango.Attr(name, tango.DevDouble, tango.AttrWriteType.READ)
                self.add_attribute(attr, self.read_value)
                self.set_change_event(name, True, False)  # pushed by the code, not checked

        def read_value(self, attr: Any) -> None:
            attr.set_value(0.0)

    def ready(out: Any) -> None:
        time.sleep(0.2)
        device = tango.Util.instance().get_device_by_name(TANGO_DEVICE)
        valid = tango.AttrQuality.ATTR_VALID

        def publish(name: str, value: float) -> None:
            device.push_change_event(name, value, time.time(), valid)

        print(f"ADDRESS {tango_address(port, TANGO_DEVICE)}", file=out, flush=True)
        for line in sys.stdin:
            parts = line.split()
            if parts and parts[0] == "go":
                _publish_loop(publish, params, float(parts[1]), float(parts[2]))
                print("DONE", file=out, flush=True)
        os._exit(0)

    run_tango(Many, port, TANGO_DEVICE, ready)


def _free_port_pair() -> int:
    """A port P with P and P+1 free on 127.0.0.1 (TCP and UDP), for CA's server and repeater."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            for offset in (0, 1):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as probe:
                        probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports on 127.0.0.1")


def ca_env(env: dict[str, str], port: int) -> dict[str, str]:
    """Channel Access kept on 127.0.0.1: searches, beacons and the repeater, on free ports."""
    return {
        **env,
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CA_REPEATER_PORT": str(port + 1),
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CA_MAX_ARRAY_BYTES": "100000",
    }


# ---- the clients (each its own process) -------------------------------------------------------
class _Tally:
    def __init__(self) -> None:
        self.count = 0
        self.lost = 0
        self.delays: list[float] = []
        self.last: dict[str, int] = {}
        self.first_at: float | None = None
        self.cpu_start = 0.0

    def add(self, name: str, ts: float, seq: int) -> None:
        now = time.time()
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.cpu_start = time.process_time()
        self.count += 1
        last = self.last.get(name)
        if last is not None and seq > last + 1:
            self.lost += seq - last - 1
        self.last[name] = seq
        if self.count % 10 == 0:  # a sample of the delays is enough for a p99
            self.delays.append(now - ts)

    def add_unnumbered(self, name: str, ts: float) -> None:
        """An update without a sequence number (Channel Access): lost = expected - received."""
        now = time.time()
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.cpu_start = time.process_time()
        self.count += 1
        if self.count % 10 == 0:
            self.delays.append(now - ts)

    def summary(self, expected: int, window: float) -> dict[str, Any]:
        delays = sorted(self.delays)
        cpu = time.process_time() - self.cpu_start
        return {
            "received": self.count,
            "lost": self.lost + max(0, expected - self.count - self.lost),
            "p99_ms": delays[int(len(delays) * 0.99)] * 1000 if delays else None,
            "client_cpu_pct": 100 * cpu / window,
        }


def client_floor(address: str, params: int, expected: int, window: float) -> None:
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    for i in range(params):
        sub.setsockopt(zmq.SUBSCRIBE, f"p{i:04d}\0\0".encode())
    sub.connect(address)
    time.sleep(0.5)
    tally = _Tally()
    print("READY", flush=True)
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        if not sub.poll(200):
            if tally.first_at is not None and time.monotonic() - tally.first_at > window + 2:
                break
            continue
        _topic, body = sub.recv_multipart()
        update = json.loads(body)
        tally.add(update["name"], update["ts"], update["seq"])
        if deadline is None:
            deadline = time.monotonic() + window + 2
        if tally.count >= expected:
            break
    print(json.dumps(tally.summary(expected, window)), flush=True)


def client_labmesh(
    address: str, params: int, expected: int, window: float, curve: bool = False
) -> None:
    from labmesh import build_client

    tally = _Tally()
    done = threading.Event()

    def on_update(update: Any) -> None:
        tally.add(update.name, update.timestamp, update.seq)
        if tally.count >= expected:
            done.set()

    keys: dict[str, Any] = {}
    if curve:
        from bench.security import _keys

        server_pair, client_pair, _ = _keys()
        keys = {"key": client_pair, "server_key": server_pair.public}
    with build_client(address, timeout=30_000, **keys) as client:
        names = [f"p{i:04d}" for i in range(params)]
        ready = []
        sub = client.subscribe(names, lambda u: ready.append(u) if len(ready) < params else None)
        deadline = time.monotonic() + 10
        while len(ready) < params and time.monotonic() < deadline:  # the current values
            time.sleep(0.05)
        sub.callback = on_update
        print("READY", flush=True)
        done.wait(window + 10)
        print(json.dumps(tally.summary(expected, window)), flush=True)
        sub.close()


def client_pyepics(_address: str, params: int, expected: int, window: float) -> None:
    """pyepics (the C libca) monitoring every PV with a callback."""
    import epics

    tally = _Tally()
    counting = threading.Event()
    lock = threading.Lock()

    def on_change(pvname: str = "", timestamp: float = 0.0, **_kw: Any) -> None:
        if counting.is_set():
            with lock:
                tally.add_unnumbered(pvname, timestamp)

    names = [f"bench:p{i:04d}" for i in range(params)]
    pvs = [epics.PV(name, callback=on_change, auto_monitor=True) for name in names]
    deadline = time.monotonic() + 30
    while not all(pv.connected for pv in pvs) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the initial values arrive and are not counted
    counting.set()
    print("READY", flush=True)
    _wait_for(tally, expected, window)
    print(json.dumps(tally.summary(expected, window)), flush=True)


def client_caproto(_address: str, params: int, expected: int, window: float) -> None:
    """caproto's threading client subscribing to every PV."""
    from caproto.threading.client import Context

    tally = _Tally()
    counting = threading.Event()
    lock = threading.Lock()

    def on_update(sub: Any, response: Any) -> None:
        if counting.is_set():
            with lock:
                tally.add_unnumbered(sub.pv.name, response.metadata.timestamp)

    context = Context()
    pvs = context.get_pvs(*(f"bench:p{i:04d}" for i in range(params)), timeout=30)
    subs = []
    for pv in pvs:
        pv.wait_for_connection(timeout=30)
        sub = pv.subscribe(data_type="time")
        sub.add_callback(on_update)
        subs.append(sub)
    time.sleep(1.0)
    counting.set()
    print("READY", flush=True)
    _wait_for(tally, expected, window)
    print(json.dumps(tally.summary(expected, window)), flush=True)
    context.disconnect()


def client_tango(address: str, params: int, expected: int, window: float) -> None:
    """A PyTango DeviceProxy subscribed to CHANGE_EVENT on every attribute, with a callback."""
    import tango

    tally = _Tally()
    counting = threading.Event()
    lock = threading.Lock()
    errors: list[str] = []

    def on_event(event: Any) -> None:
        if not counting.is_set():
            return
        if event.err:  # e.g. a missed heartbeat: reported with the figures
            errors.append(event.errors[0].desc if event.errors else "?")
            return
        value = event.attr_value
        with lock:
            tally.add(value.name, value.time.totime(), int(value.value))

    proxy = tango.DeviceProxy(address)
    proxy.set_timeout_millis(10_000)
    for i in range(params):
        proxy.subscribe_event(f"p{i:04d}", tango.EventType.CHANGE_EVENT, on_event)
    time.sleep(1.0)  # the current values, sent on subscribing, are not counted
    counting.set()
    print("READY", flush=True)
    _wait_for(tally, expected, window)
    summary = tally.summary(expected, window)
    if errors:
        summary["event_errors"] = len(errors)
        summary["first_event_error"] = errors[0][:300]
    print(json.dumps(summary), flush=True)
    os._exit(0)  # not waiting for 1,000 unsubscriptions and the ORB's shutdown


def _wait_for(tally: _Tally, expected: int, window: float) -> None:
    deadline = time.monotonic() + window + 30
    while time.monotonic() < deadline:
        if tally.count >= expected:
            return
        started = tally.first_at
        if started is not None and time.monotonic() - started > window + 3:
            return
        time.sleep(0.05)


# ---- the coordinator -------------------------------------------------------------------------
def measure(
    system: tuple[str, str, str],
    params: int,
    rate: float,
    seconds: float,
    env: dict[str, str],
) -> dict:
    """One system (server role, client role, Python): its server, its client, the publishing
    window; the figures."""
    server_kind, client_kind, python = system
    module = [python, "-m", "bench.subscriptions"]
    logs = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally; children write to it
    server = subprocess.Popen(
        [*module, f"serve-{server_kind}", "--params", str(params)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=logs,
        text=True,
        env=env,
        cwd=REPO,
    )
    client = None
    try:
        address = server.stdout.readline().split()[1]
        expected = int(rate * seconds) * params
        client = subprocess.Popen(
            [*module, f"client-{client_kind}", address, str(params), str(expected), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=logs,
            text=True,
            env=env,
            cwd=REPO,
        )
        if client.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{client_kind} client did not get ready")
        before = _cpu(server.pid)
        server.stdin.write(f"go {rate} {seconds}\n")
        server.stdin.flush()
        if server.stdout.readline().strip() != "DONE":
            raise RuntimeError(f"{server_kind} server did not publish")
        server_cpu = _cpu(server.pid) - before
        result = json.loads(client.stdout.readline())
        result["server_cpu_pct"] = 100 * server_cpu / seconds
        result["expected"] = expected
        result["listening"] = check_loopback_only(server.pid, f"the {server_kind} server")
        return result
    except Exception as exc:
        logs.seek(0)
        tail = logs.read()[-600:].decode(errors="replace").strip().replace("\n", " | ")
        raise RuntimeError(f"{exc} ({tail})") from None
    finally:
        for proc in (client, server):
            stop_child(proc)
        logs.close()


def subscription_report(run: dict[str, Any]) -> str:
    results, params, rate, seconds = run["systems"], run["params"], run["rate"], run["seconds"]
    lines = [
        f"subscriptions: {params} parameters x {rate:g} Hz = {params * rate:,.0f} updates/s "
        f"into one client process for {seconds:g} s (every update wanted); CPU in % of one "
        "core over the window; delay = server timestamp to client callback:",
        "",
        "| system | client CPU | server CPU | lost | received | p99 delay ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| {label} | error: {r['error']} | | | | |")
            continue
        p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
        errors = f" ({r['event_errors']} error events)" if r.get("event_errors") else ""
        lines.append(
            f"| {label} | {r['client_cpu_pct']:.0f}% | {r['server_cpu_pct']:.0f}% | "
            f"{r['lost']} of {r['expected']}{errors} | {r['received']} | {p99} |"
        )
    note = (run.get("peers") or {}).get("note")
    lines += [
        "",
        *([note, ""] if note else []),
        "anchors measured by the issue on this machine (same scenario): raw pyzmq one JSON "
        "message per update 9-10% / 12% / 0 lost; pyepics + caproto server 30% / 86% / 0; "
        "PyTango 10.3 change events 35-37% / 17-18% / 0.1-0.3%; caproto client + server 54% / "
        "88-96% / 0. Targets: labmesh client <= "
        f"{TARGET_CLIENT_CPU:.0f}%, server <= {TARGET_SERVER_CPU:.0f}%, nothing lost.",
    ]
    return "\n".join(lines)


def run(
    env: dict[str, str],
    params: int = 1000,
    rate: float = 10.0,
    seconds: float = 10.0,
    peers: PeerStacks | None = None,
) -> dict[str, Any]:
    """Measure the floor, labmesh and the peer stacks (those `peers` offers; by default those
    of the peers' virtualenv, if any), one after the other, in the same run."""
    systems = {
        FLOOR: ("floor", "floor", sys.executable),
        LABMESH: ("labmesh", "labmesh", sys.executable),
        LABMESH_CURVE: ("labmesh-curve", "labmesh-curve", sys.executable),
    }
    if peers is None:
        peers = find_peer_stacks()
    if peers.python and peers.caproto:
        if peers.pyepics:
            systems[PYEPICS] = ("caproto", "pyepics", peers.python)
        systems[CAPROTO] = ("caproto", "caproto", peers.python)
    if peers.python and peers.tango:
        systems[PYTANGO] = ("tango", "tango", peers.python)
    if peers.note:
        print(f"subscriptions: {peers.note}", file=sys.stderr, flush=True)
    results = {}
    keys = tempfile.TemporaryDirectory(prefix="labmesh-bench-keys-")
    from bench.security import KEYS_ENV, make_keys

    make_keys(Path(keys.name))
    for label, system in systems.items():
        print(f"subscriptions: {label} ...", file=sys.stderr, flush=True)
        system_env = ca_env(env, _free_port_pair()) if system[0] == "caproto" else env
        if system[0] == "labmesh-curve":
            system_env = {**env, KEYS_ENV: keys.name}
        try:
            results[label] = measure(system, params, rate, seconds, system_env)
        except Exception as exc:  # reported, not fatal: the other figures stand
            results[label] = {"error": f"{type(exc).__name__}: {exc}"}
    keys.cleanup()
    return {
        "params": params,
        "rate": rate,
        "seconds": seconds,
        "peers": peers.as_dict(),
        "systems": results,
    }


def subscription_targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    mine = run["systems"].get(LABMESH, {})
    if "error" in mine or not mine:
        return []
    scenario = f"subscriptions, {run['params']} x {run['rate']:g} Hz into one client"
    return [
        {
            "server": "labmesh subscriptions",
            "measured_by": scenario,
            "target": f"client CPU <= {TARGET_CLIENT_CPU:.0f}% of a core",
            "measured": f"{mine['client_cpu_pct']:.0f}%",
            "met": mine["client_cpu_pct"] <= TARGET_CLIENT_CPU,
        },
        {
            "server": "labmesh subscriptions",
            "measured_by": scenario,
            "target": f"server CPU <= {TARGET_SERVER_CPU:.0f}% of a core",
            "measured": f"{mine['server_cpu_pct']:.0f}%",
            "met": mine["server_cpu_pct"] <= TARGET_SERVER_CPU,
        },
        {
            "server": "labmesh subscriptions",
            "measured_by": scenario,
            "target": "no update lost",
            "measured": f"{mine['lost']} lost",
            "met": mine["lost"] == 0,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.role == "serve-floor":
        serve_floor(args.params)
    elif args.role == "serve-labmesh":
        serve_labmesh(args.params)
    elif args.role == "serve-labmesh-curve":
        serve_labmesh(args.params, curve=True)
    elif args.role == "serve-caproto":
        serve_caproto(args.params)
    elif args.role == "serve-tango":
        serve_tango(args.params)
    elif args.role.startswith("client-"):
        address, params, expected, window = args.rest
        runner = {
            "client-floor": client_floor,
            "client-labmesh": client_labmesh,
            "client-labmesh-curve": lambda *a: client_labmesh(*a, curve=True),
            "client-pyepics": client_pyepics,
            "client-caproto": client_caproto,
            "client-tango": client_tango,
        }[args.role]
        runner(address, int(params), int(expected), float(window))
    else:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO)])}
        print(subscription_report(run(env, args.params, args.rate, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
