"""Serve a small in-memory device with the real PLESTY server (run with the interop venv).

    <interop-venv>/bin/python peer_plesty_server.py PORT [--max-lifetime S]

Binds `tcp://127.0.0.1:PORT` (0 = any free port) with `plesty.lib.service.build_server`, prints
`READY <bound address>` on stdout once the socket is bound, and serves until SIGTERM (or SIGINT,
or --max-lifetime seconds, so a test runner that died cannot leave it behind). On the way out
PLESTY closes the device, which prints `DEVICE CLOSED`.

The device is not a subclass of PLESTY's BaseDeviceSyncModel (that one writes log files under
the working directory and registers host-wide locks): it is the minimal object PLESTY's server
serves, i.e. `query`/`write` methods, operations marked with PLESTY's own `expose_to_api`,
`summary()` for `help`, `_resources` for locks and `__enter__`/`__exit__`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import plesty.lib.service.tcp_ip_server as plesty_tcp_ip_server
from plesty.lib.device.device_utils import expose_to_api
from plesty.lib.service import build_server

LIMITS = {"WAVELENGTH": (400.0, 1100.0)}
READ_ONLY = {"POWER"}


class PeerLaser:
    """An in-memory laser: WAVELENGTH (nm, 400-1100), POWER (W, read-only), fire()."""

    _resources = {"Dev1": {"port0": ["line0", "line1"]}}

    def __init__(self) -> None:
        self.values: dict[str, float] = {"WAVELENGTH": 633.0, "POWER": 0.002}
        self.total_shots = 0
        self.connected = False

    def __enter__(self) -> PeerLaser:
        self.connected = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.connected = False
        print("DEVICE CLOSED", flush=True)

    @expose_to_api
    def query(self, key: str, **kwargs: Any) -> float:
        """Read a parameter."""
        if key not in self.values:
            raise KeyError(f"no parameter {key!r}; known: {sorted(self.values)}")
        return self.values[key]

    @expose_to_api
    def write(self, key: str, value: Any, **kwargs: Any) -> bool:
        """Write a parameter after checking its limits."""
        if key not in self.values:
            raise KeyError(f"no parameter {key!r}; known: {sorted(self.values)}")
        if key in READ_ONLY:
            raise ValueError(f"{key} is read-only")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} takes a number, got {value!r}")
        low, high = LIMITS.get(key, (float("-inf"), float("inf")))
        if not low <= value <= high:
            raise ValueError(f"{key} = {value} is outside [{low}, {high}]")
        self.values[key] = float(value)
        return True

    @expose_to_api(kind="acquire", budget_s=2.0)
    def fire(self, shots: int = 1, resources: Any = None) -> dict[str, Any]:
        """Fire `shots` pulses; reports the running total and the caller's resources."""
        self.total_shots += int(shots)
        return {"shots": int(shots), "total": self.total_shots, "resources": resources}

    @expose_to_api
    def identity(self, **kwargs: Any) -> str:
        """The identity string."""
        # PLESTY's server adds `resources=<the caller's grant>` to the kwargs of every call
        # from a client holding resources, so every operation must accept it.
        return "PLESTY-peer,PeerLaser,0,plesty_lib-0.6.0"

    def summary(self, style: str = "short", filename: Any = None) -> str:
        return "PeerLaser: in-memory laser (WAVELENGTH nm, POWER W, fire)"


async def serve(port: int, max_lifetime_s: float, device: Any = None) -> None:
    """Serve `device` (default: a PeerLaser) with PLESTY's server on 127.0.0.1:`port` until
    SIGTERM or `max_lifetime_s`; prints READY <address> once serving."""
    # PLESTY's server asks the OS which local address routes to 8.8.8.8 (a UDP connect, which
    # sends nothing) only to label its log lines. Tests must not depend on a default route.
    plesty_tcp_ip_server.get_local_ip = lambda: "127.0.0.1"
    server = build_server(device or PeerLaser(), address=f"tcp://127.0.0.1:{port}")
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    loop.call_later(max_lifetime_s, main_task.cancel)
    print(f"READY {server.address}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await server.run()  # PLESTY ends its loop (and closes the device) on cancellation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="TCP port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--max-lifetime", type=float, default=300.0, metavar="S")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args.port, args.max_lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
