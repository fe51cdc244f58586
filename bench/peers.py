"""The servers the bench measures, each run alone in its own process (run as a file, not as
part of the bench package: the `plesty` mode runs under another Python).

    python bench/peers.py echo               # raw pyzmq ROUTER echo (the floor)
    python bench/peers.py labmesh --fixed    # labmesh server, in-memory device
    INTEROP_PYTHON bench/peers.py plesty     # PLESTY's server (plesty_lib), same device

Each binds tcp://127.0.0.1 on a free port, prints `ADDRESS <endpoint>` on stdout once it
serves, and stops when its stdin closes or after `--max-seconds`, whichever comes first.
Imports are per mode, so the `plesty` mode runs under the interop virtualenv's Python without
labmesh installed, and `echo` needs nothing but pyzmq.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import sys
import time

LOCALHOST = "tcp://127.0.0.1:0"
#: The in-memory device's only parameter and its starting value (same for both devices).
PARAM = "X"
START_VALUE = 1.5


def _announce(address: str) -> None:
    print(f"ADDRESS {address}", flush=True)


def _wait_for_stdin_eof(deadline: float) -> None:
    """Block until the parent closes our stdin (or dies) or `deadline` (monotonic) passes."""
    fd = sys.stdin.fileno()
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready and not os.read(fd, 4096):
            return


def serve_echo(max_seconds: float) -> None:
    """ROUTER that sends every message straight back: the transport floor."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.bind(LOCALHOST)
    _announce(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    deadline = time.monotonic() + max_seconds
    try:
        while time.monotonic() < deadline:
            events = dict(poller.poll(200))
            if sock in events:
                # Drain what is queued, as a real server loop would, then poll again.
                for _ in range(256):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    sock.send_multipart(frames)
            if sys.stdin.fileno() in events and not os.read(sys.stdin.fileno(), 4096):
                return
    finally:
        sock.close(linger=0)
        ctx.term()


def serve_labmesh(fixed_threading: bool, max_seconds: float) -> None:
    """labmesh's DeviceServer with an in-memory device."""
    from labmesh import Device, Parameter, build_server

    class Mem(Device):
        X = Parameter(float)

        def __init__(self) -> None:
            super().__init__("bench-mem")
            self.values = {PARAM: START_VALUE}

        def _query_(self, name: str) -> float:
            return self.values[name]

        def _write_(self, name: str, value: float) -> None:
            self.values[name] = value

    server = build_server(Mem(), fixed_threading=fixed_threading, address=LOCALHOST)
    server.start()
    try:
        _announce(server.address)
        _wait_for_stdin_eof(time.monotonic() + max_seconds)
    finally:
        server.stop()


def serve_plesty(fixed_threading: bool, max_seconds: float, log_level: str | None) -> None:
    """PLESTY's DeviceTCPIPServer (from the installed plesty_lib) with an in-memory device.

    `log_level` None keeps PLESTY's own logging setup (INFO: a line per query plus a traffic
    line per request, to the console and `logs/`); a level name raises the root logger to it
    after the device is built, so the server pays for no per-request log output.
    """
    import plesty.lib.device.base_device_sync as plesty_device
    import plesty.lib.service.tcp_ip_server as plesty_server
    from plesty.lib.service import build_server

    # PLESTY asks the routing table for "its" address (a UDP connect towards 8.8.8.8) for its
    # log lines and resource keys; the bench stays on 127.0.0.1, so answer that directly.
    plesty_device.get_local_ip = lambda: "127.0.0.1"
    plesty_server.get_local_ip = lambda: "127.0.0.1"

    class MemPlesty(plesty_device.BaseDeviceSyncModel):
        def __init__(self) -> None:
            super().__init__("bench-mem")
            self.register_config(key=PARAM, dtype=float, default=START_VALUE)
            self.values = {PARAM: START_VALUE}

        def init(self, main: object = None) -> None:
            pass

        def connect(self) -> bool:
            return True

        def disconnect(self) -> bool:
            return True

        def identity(self) -> str:
            return "bench,MemPlesty,0"

        def check_errors(self) -> list[str]:
            return []

        def check_operatability(self) -> bool:
            return True

        def _query_(self, key: str) -> float:
            return self.values[key]

        def _write_(self, key: str, value: float) -> bool:
            self.values[key] = value
            return True

    device = MemPlesty()
    if log_level is not None:
        logging.getLogger().setLevel(log_level.upper())

    async def main() -> None:
        server = build_server(device, fixed_threading=fixed_threading, address=LOCALHOST)
        task = asyncio.create_task(server.run())
        loop = asyncio.get_running_loop()
        stdin_closed = asyncio.Event()
        fd = sys.stdin.fileno()

        def on_stdin() -> None:
            if not os.read(fd, 4096):
                loop.remove_reader(fd)
                stdin_closed.set()

        loop.add_reader(fd, on_stdin)
        # Let run() enter the device first; a request sent earlier would only wait in the
        # already bound socket.
        await asyncio.sleep(0.05)
        _announce(server.address)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stdin_closed.wait(), max_seconds)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 3.0)

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["echo", "labmesh", "plesty"])
    parser.add_argument("--fixed", action="store_true", help="fixed_threading=True")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="stop serving after this long even if stdin stays open",
    )
    parser.add_argument(
        "--plesty-log-level",
        default=None,
        help="raise the root log level of PLESTY's server (e.g. WARNING)",
    )
    args = parser.parse_args(argv)
    if args.kind == "echo":
        serve_echo(args.max_seconds)
    elif args.kind == "labmesh":
        serve_labmesh(args.fixed, args.max_seconds)
    else:
        serve_plesty(args.fixed, args.max_seconds, args.plesty_log_level)


if __name__ == "__main__":
    main()
