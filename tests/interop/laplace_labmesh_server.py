"""Serve LAPLACE-LHC with labmesh in a process of its own (counterpart of laplace_peer_server.py).

    python laplace_labmesh_server.py PORT [--stage | --floor] [--name N] [--data JSON]
        [--max-lifetime S]

Binds `tcp://127.0.0.1:PORT` (0 = any free port) and prints `READY <address>` once serving:
a `LaplaceServer` (MOTOR, freedom 2) serving `--data`, or with `--stage` a simulated two-axis
`MotorStage` behind a `DeviceServer` with a `LaplaceAdapter`. `--floor` is no LAPLACE server at
all but the floor to compare with: a bare pyzmq REP socket answering every message with one
fixed GET reply. Serves until SIGTERM/SIGINT or --max-lifetime seconds. scripts/bench.py runs
it to time GET against the real ServerLHC.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

import zmq

from labmesh.drivers.motor import MotorStage
from labmesh.laplace import LaplaceAdapter, LaplaceServer
from labmesh.server import DeviceServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--stage", action="store_true", help="serve a simulated MotorStage")
    kind.add_argument("--floor", action="store_true", help="a bare REP socket, fixed reply")
    parser.add_argument("--name", default="peer")
    parser.add_argument("--data", default='{"positions": [0.0, 0.0], "unit": "mm"}')
    parser.add_argument("--max-lifetime", type=float, default=600.0)
    args = parser.parse_args()

    address = f"tcp://127.0.0.1:{args.port}"
    if args.floor:
        return floor(address, args.name, json.loads(args.data), args.max_lifetime)
    if args.stage:
        stage = MotorStage(("x", "y"), name=args.name)
        server = DeviceServer(stage, address=address, laplace=LaplaceAdapter())
    else:
        server = LaplaceServer(args.name, address, 2, "MOTOR", json.loads(args.data))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"READY {server.address}", flush=True)
    try:
        stop.wait(args.max_lifetime)
    finally:
        server.stop()
    return 0


def floor(address: str, name: str, data: dict, max_lifetime: float) -> int:
    """Answer GET and PING with fixed replies from a bare REP socket, for max_lifetime s."""

    def reply(cmd: str, payload: dict, msg: str) -> bytes:
        return json.dumps(
            {
                "from": name,
                "to": "Master",
                "cmd": cmd,
                "payload": payload,
                "version": "0.2.2",
                "error_msg": None,
                "msg": msg,
            }
        ).encode()

    replies = {
        "GET": reply("GET", {"data": data}, "Data sent."),
        "PING": reply("PING", {"PING": "PONG"}, "Still alive."),
    }
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 100)
    sock.bind(address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"READY {sock.getsockopt(zmq.LAST_ENDPOINT).decode()}", flush=True)
    deadline = threading.Timer(max_lifetime, stop.set)
    deadline.daemon = True
    deadline.start()
    while not stop.is_set():
        try:
            message = json.loads(sock.recv())  # decoded, as any server must
        except zmq.Again:
            continue
        sock.send(replies.get(message.get("cmd"), replies["GET"]))
    sock.close(0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
