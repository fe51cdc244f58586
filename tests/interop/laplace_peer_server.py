"""Serve data with the real LAPLACE-LHC ServerLHC (laplace-server 0.2.0; run with the interop venv).

    <interop-venv>/bin/python laplace_peer_server.py PORT [--name N] [--device KIND]
        [--freedom F] [--data JSON] [--quiet] [--advertise IP] [--stop-after S]
        [--max-lifetime S]

Binds `tcp://127.0.0.1:PORT`, prints `READY <address>` once its thread runs, and prints one
`CALLBACK <name> <json arguments>` line per callback laplace-server calls. When the server's
thread ends (a STOP, or a crash on a malformed message) it prints `THREAD ENDED`; the process
itself stays until SIGTERM/SIGINT or --max-lifetime seconds, so a test can read what happened.

laplace-server looks up the host's outward address when built (`get_ip`: a UDP socket "connected"
to 8.8.8.8) and its `stop()` sends STOP to that address. Tests touch nothing but 127.0.0.1, so
`get_ip` is replaced by one answering `--advertise` (default 127.0.0.1): nothing else of the
server changes. `--stop-after S` calls `ServerLHC.stop()` after S seconds and prints `STOPPED`
when it returns; with `--advertise 127.0.0.2` (as on a host whose outward address is not the one
the server listens on) it never returns.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

import laplace_server.server_lhc as server_lhc
from laplace_server import ServerLHC

CALLBACKS = (
    "on_saving_path_changed",
    "on_position_changed",
    "on_get",
    "on_opt",
    "on_scan",
    "on_set_actuators",
    "on_set_diagnostics",
    "on_update_actuator_positions",
)


def report(name: str) -> Any:
    def callback(*args: Any) -> None:
        print(f"CALLBACK {name} {json.dumps(list(args), sort_keys=True)}", flush=True)

    return callback


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--name", default="peer")
    parser.add_argument("--device", default="MOTOR")
    parser.add_argument("--freedom", type=int, default=2)
    parser.add_argument("--data", default='{"positions": [0.0, 0.0], "unit": "mm"}')
    parser.add_argument("--quiet", action="store_true", help="no CALLBACK lines (benchmarks)")
    parser.add_argument("--advertise", default="127.0.0.1", help="what get_ip answers")
    parser.add_argument("--stop-after", type=float, help="call stop() after this many seconds")
    parser.add_argument("--max-lifetime", type=float, default=120.0)
    args = parser.parse_args()

    server_lhc.get_ip = lambda name: args.advertise
    server = ServerLHC(
        args.name,
        f"tcp://127.0.0.1:{args.port}",
        args.freedom,
        args.device,
        json.loads(args.data),
        name_list=["first", "second"],
        plottables_list=["positions"],
    )
    if not args.quiet:
        for name in CALLBACKS:
            setattr(server, name, report(name))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"READY tcp://127.0.0.1:{args.port}", flush=True)
    deadline = time.monotonic() + args.max_lifetime
    if args.stop_after is not None:
        stop.wait(args.stop_after)
        server.stop()
        print("STOPPED", flush=True)
    ended = False
    while not stop.is_set() and time.monotonic() < deadline:
        if not ended and not server.is_alive():
            ended = True
            print("THREAD ENDED", flush=True)
        stop.wait(0.05)
    server.stop()  # returns at once when its thread already ended
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
