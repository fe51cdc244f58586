"""LAPLACE-LHC: the GET round trip against the real ServerLHC."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO
from bench.device import Proc, _one_line, _round
from bench.worker import _percentiles

# ---- LAPLACE-LHC: GET round trip against the real ServerLHC --------------------------------
LAPLACE_PEER = REPO / "tests" / "interop" / "laplace_peer_server.py"
LAPLACE_LABMESH = REPO / "tests" / "interop" / "laplace_labmesh_server.py"
#: The LAPLACE master's polling period (it sends PING then GET to every server); the sparse run
#: draws each interval from LAPLACE_POLL_S +- LAPLACE_POLL_JITTER_S, because at exactly 300 ms
#: after its previous request ServerLHC is always inside its 100 ms poll, never in the 10 ms
#: sleep between two polls, which a real master's timer, GUI and other clients do hit.
LAPLACE_POLL_S = 0.3
LAPLACE_POLL_JITTER_S = 0.1
TARGET_LAPLACE_SPARSE_P99_US = 1000.0


@dataclass(frozen=True)
class LaplaceCounts:
    """GETs per server back to back, and ticks of sparse polling (one every LAPLACE_POLL_S)."""

    back_to_back: int
    sparse_ticks: int


DEFAULT_LAPLACE_COUNTS = LaplaceCounts(5000, 300)
QUICK_LAPLACE_COUNTS = LaplaceCounts(300, 10)


def _laplace_message(cmd: str, payload: dict[str, Any], msg: str) -> bytes:
    """A request exactly as the LAPLACE master's laplace_server.protocol builders make it."""
    return json.dumps(
        {
            "from": "Master",
            "to": "peer",
            "cmd": cmd,
            "payload": payload,
            "version": "0.2.2",
            "error_msg": None,
            "msg": msg,
        }
    ).encode()


def _laplace_exchange(sock: Any, body: bytes, cmd: str) -> None:
    sock.send(body)
    reply = json.loads(sock.recv())  # decoded, as the master's recv_json does
    if reply.get("cmd") != cmd or reply.get("error_msg") is not None:
        raise RuntimeError(f"unexpected reply to {cmd}: {str(reply)[:200]}")


def laplace_bench(
    interop_python: str, env: dict[str, str], log_dir: Path, lcounts: LaplaceCounts
) -> dict[str, Any]:
    """GET round trips of laplace-server's ServerLHC and of labmesh, in the same run.

    Each server in its own process on 127.0.0.1, serving {"positions": [0, 0], "unit": "mm"}:
    the real ServerLHC (interop venv; tests/interop/laplace_peer_server.py), labmesh's
    LaplaceServer, and a simulated MotorStage behind a DeviceServer with a LaplaceAdapter (its
    GET reads the stage's four parameters and positions), and the floor: a bare pyzmq REP
    socket answering with a fixed reply (what this machine's sockets and wake-ups cost alone).
    The client is this process with one REQ socket per server, as the master has, sending the
    master's request bytes and decoding every reply. Back to back: sequential GETs, the servers
    interleaved one GET at a time. Sparse: every LAPLACE_POLL_S on average (seeded jitter) each
    server gets a GET alone (even ticks) or the master's PING+GET (odd ticks, the pair timed),
    so it has idled in between as under a real master.
    """
    import random
    import socket

    import zmq

    specs = [
        (
            "floor",
            "floor: bare pyzmq REP, fixed reply",
            [sys.executable, str(LAPLACE_LABMESH), "0", "--floor"],
        ),
        ("labmesh", "labmesh LaplaceServer", [sys.executable, str(LAPLACE_LABMESH), "0"]),
        (
            "labmesh_stage",
            "labmesh MotorStage + LaplaceAdapter",
            [sys.executable, str(LAPLACE_LABMESH), "0", "--stage"],
        ),
    ]
    note = None
    if Path(interop_python).exists():
        with contextlib.closing(socket.socket()) as probe:  # ServerLHC needs a port number
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        specs.insert(
            1,
            (
                "laplace_server",
                "laplace-server ServerLHC",
                [interop_python, str(LAPLACE_PEER), str(port), "--quiet", "--max-lifetime", "600"],
            ),
        )
    else:
        note = f"laplace-server not measured: no interop virtualenv at {interop_python}"
    ctx = zmq.Context()
    procs: list[Proc] = []
    socks: dict[str, Any] = {}
    out: dict[str, Any] = {
        "servers": {},
        "note": note,
        "counts": dataclasses.asdict(lcounts),
        "poll_s": LAPLACE_POLL_S,
        "poll_jitter_s": LAPLACE_POLL_JITTER_S,
    }
    get = _laplace_message("GET", {}, "Get values.")
    ping = _laplace_message("PING", {"PING": None}, "Alive?")
    try:
        for key, label, argv in specs:
            proc = Proc(argv, f"laplace-{key}", log_dir, env=env)
            procs.append(proc)
            out["servers"][key] = {"label": label}
            try:
                line = proc.readline(30.0)
                if not line.startswith("READY "):
                    raise RuntimeError(f"{label} said {line!r} instead of READY")
            except (TimeoutError, RuntimeError) as exc:
                out["servers"][key]["error"] = str(exc)
                continue
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 2000)  # the master's timeout
            sock.connect(line.split(" ", 1)[1].strip())
            socks[key] = sock
        samples: dict[str, dict[str, list[int]]] = {
            key: {"back_to_back": [], "sparse_get": [], "sparse_ping_get": []} for key in socks
        }
        clock = time.perf_counter_ns

        def timed(key: str, series: str | None, *bodies: tuple[bytes, str]) -> None:
            if key not in socks:
                return
            try:
                started = clock()
                for body, cmd in bodies:
                    _laplace_exchange(socks[key], body, cmd)
                if series is not None:
                    samples[key][series].append(clock() - started)
            except (zmq.ZMQError, RuntimeError, ValueError) as exc:
                out["servers"][key]["error"] = f"{series}: {exc}"
                socks.pop(key).close(0)

        keys = list(socks)
        for key in keys:
            for _ in range(200):
                timed(key, None, (get, "GET"))  # warm-up
        print(
            f"LAPLACE: {lcounts.back_to_back} GETs back to back per server ...",
            file=sys.stderr,
            flush=True,
        )
        for i in range(lcounts.back_to_back):
            for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                timed(key, "back_to_back", (get, "GET"))
        print(
            f"LAPLACE: {lcounts.sparse_ticks} sparse polls, one every {LAPLACE_POLL_S} s ...",
            file=sys.stderr,
            flush=True,
        )
        jitter = random.Random(0)
        tick = time.monotonic()
        for i in range(lcounts.sparse_ticks):
            tick += LAPLACE_POLL_S + jitter.uniform(-LAPLACE_POLL_JITTER_S, LAPLACE_POLL_JITTER_S)
            time.sleep(max(0.0, tick - time.monotonic()))
            for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                if i % 2 == 0:
                    timed(key, "sparse_get", (get, "GET"))
                else:
                    timed(key, "sparse_ping_get", (ping, "PING"), (get, "GET"))
        for key, series in samples.items():
            for name, values in series.items():
                if values:
                    out["servers"][key][name] = _percentiles(values)
            sparse = series["sparse_get"]
            out["servers"][key]["sparse_get_over_1ms"] = sum(v > 1_000_000 for v in sparse)
    finally:
        for sock in socks.values():
            sock.close(0)
        ctx.term()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)  # both servers stop on SIGTERM
            proc.stop()
    return out


def laplace_report(lap: dict[str, Any]) -> str:
    """The LAPLACE section as a markdown table (us)."""

    def cell(run: dict[str, Any], series: str) -> str:
        s = run.get(series)
        return f"{s['p50_us']:.0f} / {s['p99_us']:.0f} / {s['max_us']:.0f}" if s else "n/a"

    counts = lap["counts"]
    lines = [
        f"LAPLACE-LHC GET round trip (us, p50 / p99 / max), one REQ client sending the "
        f"master's bytes: {counts['back_to_back']} GETs back to back per server, then "
        f"{counts['sparse_ticks']} polls one every {lap['poll_s']:g} +- "
        f"{lap['poll_jitter_s']:g} s (GET alone, or the master's PING+GET timed as a "
        "pair):",
        "",
        "| server | back to back | sparse GET | sparse PING+GET | sparse GETs > 1 ms |",
        "|---|---|---|---|---|",
    ]
    for run in lap["servers"].values():
        if "error" in run:
            lines.append(f"| {run['label']} | failed: {_one_line(run['error'])} | | | |")
            continue
        n = run.get("sparse_get", {}).get("n", 0)
        lines.append(
            f"| {run['label']} | {cell(run, 'back_to_back')} | "
            f"{cell(run, 'sparse_get')} | {cell(run, 'sparse_ping_get')} | "
            f"{run['sparse_get_over_1ms']} of {n} |"
        )
    if lap.get("note"):
        lines += ["", lap["note"]]
    return "\n".join(lines)


def laplace_targets(lap: dict[str, Any]) -> list[dict[str, Any]]:
    """labmesh's GET p50 <= the real ServerLHC's (back to back), for the LaplaceServer and
    the MotorStage + LaplaceAdapter; sparse GET p99 < 1 ms."""
    servers = lap["servers"]
    real = servers.get("laplace_server", {}).get("back_to_back")
    targets = []
    for key in ("labmesh", "labmesh_stage"):
        run = servers.get(key, {})
        mine = run.get("back_to_back")
        # both the LaplaceServer and a MotorStage through the adapter (issue 18)
        ratio = mine["p50_us"] / real["p50_us"] if mine and real else None
        targets.append(
            {
                "server": run.get("label", key),
                "measured_by": "LAPLACE GET, back to back",
                "target": "p50 <= laplace-server ServerLHC's p50",
                "ratio": _round(ratio),
                "measured": f"{mine['p50_us']:.0f} vs {real['p50_us']:.0f} us"
                if mine and real
                else "n/a",
                "met": ratio is not None and ratio <= 1.0,
            }
        )
        sparse = run.get("sparse_get")
        floor = servers.get("floor", {}).get("sparse_get")
        targets.append(
            {
                "server": run.get("label", key),
                "measured_by": f"LAPLACE GET, polled every {lap['poll_s']:g} s",
                "target": f"p99 < {TARGET_LAPLACE_SPARSE_P99_US / 1000:g} ms",
                "ratio": None,
                "measured": (f"{sparse['p99_us']:.0f} us" if sparse else "n/a")
                + (f" (floor {floor['p99_us']:.0f} us)" if floor else ""),
                "met": bool(sparse) and sparse["p99_us"] < TARGET_LAPLACE_SPARSE_P99_US,
            }
        )
    return targets
