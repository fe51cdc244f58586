"""Peer stacks: the query round trip of PyTango and Channel Access, next to the floor's.

Run from the peers' virtualenv (`.cache/peers-venv`, built by scripts/peers_env.py or
`python -m bench --build-peers`), each server and each client in its own process:
- PyTango: a `tango.server.Device` with one float attribute, served without a Tango database
  (`-nodb`, its ORB endpoint giop:tcp:127.0.0.1:PORT, so it and its ZMQ event sockets listen on
  127.0.0.1 only), read by one client process with `DeviceProxy.read_attribute`;
- caproto: the caproto server of bench.subscriptions with one PV (Channel Access on 127.0.0.1,
  free ports), read by caproto's threading client (`PV.read`) and by pyepics (`PV.get` with
  `use_monitor=False`, a real `ca_get` round trip through the C libca).
Each client makes untimed warm-up calls, then the same number of sequential timed calls as the
floor's latency run, and reports p50/p99 as bench.worker does; the report gives the ratio to
the floor's query p50/p99 measured in the same run. Every server is checked (from /proc) to
listen on loopback addresses only; every process ends by itself or is ended by its PID.

    python -m bench.stacks [--calls 3000] [--rounds 1]      # alone (no floor ratio)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Labels of the rows, by key.
TANGO_READ = "PyTango read_attribute (nodb device server)"
CAPROTO_READ = "caproto threading client PV.read, caproto server"
PYEPICS_GET = "pyepics (libca) PV.get(use_monitor=False), caproto server"
TANGO_DEVICE = "bench/mem/1"
#: The attribute (PyTango) / PV (Channel Access) read, and the value each server gives.
TANGO_ATTR, TANGO_VALUE = "X", 1.5
CA_PV, CA_VALUE = "bench:p0000", 0.0
#: Hard lifetime of every child of this module (seconds), whatever happens to its parent.
MAX_LIFETIME_S = 900.0


def _die_after(seconds: float) -> None:
    killer = threading.Timer(seconds, os._exit, (3,))
    killer.daemon = True
    killer.start()


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- PyTango servers (run by the peers' Python) ----------------------------------------------
def run_tango(device_class: Any, port: int, device: str, on_ready: Any) -> None:
    """Serve one instance of `device_class` without a database on 127.0.0.1:`port`.

    cppTango prints to stdout ("Ready to accept request"), so our own stdout is kept aside for
    the protocol lines and fd 1 goes to stderr. `on_ready(out)` runs once the server serves, in
    a thread of its own; the process ends (os._exit) when stdin closes or after MAX_LIFETIME_S.
    """
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _die_after(MAX_LIFETIME_S)

    def started() -> None:
        threading.Thread(target=on_ready, args=(out,), daemon=True).start()

    device_class.run_server(
        args=[
            "bench",
            "-nodb",
            "-dlist",
            device,
            "-ORBendPoint",
            f"giop:tcp:127.0.0.1:{port}",
        ],
        post_init_callback=started,
    )


def tango_address(port: int, device: str) -> str:
    return f"tango://127.0.0.1:{port}/{device}#dbase=no"


def serve_tango(port: int) -> None:
    """A PyTango device with one float attribute, read by `client_tango`."""
    from tango.server import Device, attribute

    class BenchMem(Device):
        @attribute(dtype=float)
        def X(self) -> float:
            return TANGO_VALUE

    def ready(out: Any) -> None:
        time.sleep(0.2)  # run_server calls back just before its "Ready to accept request"
        print(f"ADDRESS {tango_address(port, TANGO_DEVICE)}", file=out, flush=True)
        sys.stdin.read()  # until the parent closes it
        os._exit(0)

    run_tango(BenchMem, port, TANGO_DEVICE, ready)


# ---- clients (each its own process) -----------------------------------------------------------
def _tango_reader(address: str) -> Any:
    import tango

    proxy = tango.DeviceProxy(address)
    proxy.set_timeout_millis(5000)

    def read() -> None:
        value = proxy.read_attribute(TANGO_ATTR).value
        if value != TANGO_VALUE:
            raise RuntimeError(f"read_attribute returned {value!r}, expected {TANGO_VALUE}")

    return read


def _caproto_reader(_address: str) -> Any:
    from caproto.threading.client import Context

    (pv,) = Context().get_pvs(CA_PV, timeout=10)
    pv.wait_for_connection(timeout=10)

    def read() -> None:
        value = pv.read(timeout=5).data[0]
        if value != CA_VALUE:
            raise RuntimeError(f"PV.read returned {value!r}, expected {CA_VALUE}")

    return read


def _pyepics_reader(_address: str) -> Any:
    import epics

    pv = epics.PV(CA_PV, auto_monitor=False)
    if not pv.wait_for_connection(timeout=10):
        raise RuntimeError(f"pyepics could not connect to {CA_PV}")

    def read() -> None:
        value = pv.get(use_monitor=False, timeout=5)
        if value != CA_VALUE:
            raise RuntimeError(f"PV.get returned {value!r}, expected {CA_VALUE}")

    return read


READERS = {"tango": _tango_reader, "caproto": _caproto_reader, "pyepics": _pyepics_reader}


def client(kind: str, address: str, calls: int, warmup: int) -> None:
    """Connect, warm up, say READY, wait for a line on stdin, then time `calls` reads."""
    from bench.worker import _percentiles

    _die_after(MAX_LIFETIME_S)
    try:
        read = READERS[kind](address)
        for _ in range(warmup):
            read()
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    print("READY", flush=True)
    sys.stdin.readline()
    clock = time.perf_counter_ns
    samples = []
    cpu0 = time.process_time()
    try:
        for _ in range(calls):
            start = clock()
            read()
            samples.append(clock() - start)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    cpu = time.process_time() - cpu0
    result = {"latency": _percentiles(samples), "client_cpu_us_per_call": cpu / calls * 1e6}
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no waiting on the stacks' own shutdown (libca, omniORB threads)


# ---- the coordinator ---------------------------------------------------------------------------
def _measure_one(
    kind: str, python: str, env: dict[str, str], log_dir: Path, calls: int, warmup: int
) -> dict[str, Any]:
    from bench.common import check_loopback_only
    from bench.device import Proc
    from bench.subscriptions import _free_port_pair, ca_env

    module = [python, "-m", "bench.stacks"]
    if kind == "tango":
        server_argv = [*module, "serve-tango", str(free_port())]
    else:
        env = ca_env(env, _free_port_pair())
        server_argv = [python, "-m", "bench.subscriptions", "serve-caproto", "--params", "1"]
    server = Proc(server_argv, f"stack-{kind}-server", log_dir, env=env)
    reader: Proc | None = None
    try:
        line = server.readline(60.0)
        if not line.startswith("ADDRESS "):
            raise RuntimeError(f"{kind} server said {line!r} instead of ADDRESS")
        address = line.split(" ", 1)[1].strip()
        reader = Proc(
            [*module, f"client-{kind}", address, str(calls), str(warmup)],
            f"stack-{kind}-client",
            log_dir,
            env=env,
        )
        line = reader.readline(60.0)
        if line != "READY":
            raise RuntimeError(f"{kind} client: {line[:300]}")
        cpu0 = server.cpu_seconds()
        reader.popen.stdin.write(b"go\n")  # type: ignore[union-attr]
        reader.popen.stdin.flush()  # type: ignore[union-attr]
        result = json.loads(reader.readline(max(60.0, calls * 0.05)))
        if "error" in result:
            raise RuntimeError(f"{kind} client: {result['error']}")
        result["server_cpu_us_per_call"] = (server.cpu_seconds() - cpu0) / calls * 1e6
        result["listening"] = check_loopback_only(server.pid, f"the {kind} server")
        return result
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        return {"error": f"{exc} [server stderr: {server.stderr_tail(300)}]"}
    finally:
        if reader is not None:
            reader.stop()
        server.stop()


def run(
    peers: Any,
    env: dict[str, str],
    log_dir: Path,
    calls: int,
    warmup: int,
    rounds: int = 1,
) -> dict[str, Any]:
    """Each available stack's query round trip, `rounds` times (servers taking turns); the
    median of each figure. `peers` is a bench.common.PeerStacks."""
    kinds = []
    if peers.tango:
        kinds.append(("tango", TANGO_READ, f"PyTango {peers.tango}"))
    if peers.caproto:
        kinds.append(("caproto", CAPROTO_READ, f"caproto {peers.caproto}"))
    if peers.pyepics and peers.caproto:
        kinds.append(("pyepics", PYEPICS_GET, f"pyepics {peers.pyepics}"))
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind, _, _ in kinds}
    for round_no in range(rounds):
        for kind, label, _ in kinds:
            print(
                f"peer stacks, round {round_no + 1}/{rounds}: {label} ...",
                file=sys.stderr,
                flush=True,
            )
            runs[kind].append(_measure_one(kind, peers.python, env, log_dir, calls, warmup))
    from bench.device import _median_percentiles  # the parent side only (children: stdlib)

    systems: dict[str, Any] = {}
    for kind, label, version in kinds:
        done = [r for r in runs[kind] if "error" not in r]
        if len(done) < len(runs[kind]):
            failed = next(r for r in runs[kind] if "error" in r)
            systems[kind] = {"label": label, "version": version, "error": failed["error"]}
            continue

        def med(values: list[float]) -> float:
            return round(statistics.median(values), 1)

        systems[kind] = {
            "label": label,
            "version": version,
            "p50_us": med([r["latency"]["p50_us"] for r in done]),
            "p99_us": med([r["latency"]["p99_us"] for r in done]),
            "p50_us_per_round": [r["latency"]["p50_us"] for r in done],
            "percentiles_us": _median_percentiles([r["latency"] for r in done]),
            "server_cpu_us_per_call": med([r["server_cpu_us_per_call"] for r in done]),
            "client_cpu_us_per_call": med([r["client_cpu_us_per_call"] for r in done]),
            "listening": sorted({a for r in done for a in r["listening"]}),
        }
    return {
        "calls": calls,
        "warmup": warmup,
        "rounds": rounds,
        "peers": peers.as_dict(),
        "systems": systems,
    }


def add_floor(stacks: dict[str, Any], floor_latency: dict[str, float] | None) -> None:
    """Record the floor's p50/p99 of the same run and each stack's ratio to them."""
    stacks["floor"] = (
        {"p50_us": floor_latency["p50_us"], "p99_us": floor_latency["p99_us"]}
        if floor_latency
        else None
    )
    for system in stacks["systems"].values():
        if "error" in system or not floor_latency:
            continue
        system["p50_vs_floor"] = round(system["p50_us"] / floor_latency["p50_us"], 2)
        system["p99_vs_floor"] = round(system["p99_us"] / floor_latency["p99_us"], 2)


def report(stacks: dict[str, Any]) -> str:
    floor = stacks.get("floor")
    lines = [
        f"peer stacks: query round trip, 1 client process, {stacks['calls']} sequential reads "
        f"after {stacks['warmup']} untimed ones, median of {stacks['rounds']} round(s); (x) = "
        "ratio to the floor's query p50/p99 of this run (raw pyzmq echo, first table):",
        "",
        "| system | version | p50 us | p99 us | server CPU us/call | client CPU us/call |",
        "|---|---|---|---|---|---|",
    ]
    if floor:
        lines.append(
            f"| floor: raw pyzmq ROUTER echo | | {floor['p50_us']:.0f} (1.00x) | "
            f"{floor['p99_us']:.0f} (1.00x) | | |"
        )
    for s in stacks["systems"].values():
        if "error" in s:
            lines.append(f"| {s['label']} | {s['version']} | failed: {s['error'][:160]} | | | |")
            continue
        p50x = f" ({s['p50_vs_floor']:.2f}x)" if "p50_vs_floor" in s else ""
        p99x = f" ({s['p99_vs_floor']:.2f}x)" if "p99_vs_floor" in s else ""
        lines.append(
            f"| {s['label']} | {s['version']} | {s['p50_us']:.0f}{p50x} | {s['p99_us']:.0f}{p99x} "
            f"| {s['server_cpu_us_per_call']:.0f} | {s['client_cpu_us_per_call']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--peers-python", default=None)
    args = parser.parse_args(argv)
    if args.role == "serve-tango":
        serve_tango(int(args.rest[0]))
    elif args.role.startswith("client-"):
        address, calls, warmup = args.rest
        client(args.role.removeprefix("client-"), address, int(calls), int(warmup))
    else:
        import tempfile

        from bench.common import REPO, find_peer_stacks

        peers = find_peer_stacks(args.peers_python)
        print(peers.note, file=sys.stderr)
        if peers.python is None:
            return 0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO)])}
        with tempfile.TemporaryDirectory(prefix="labmesh-stacks-") as logs:
            out = run(peers, env, Path(logs), args.calls, max(1, args.calls // 10), args.rounds)
        print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
