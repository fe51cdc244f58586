"""The real PLESTY server with a device whose `SLOW` parameter answers late (interop venv).

    <interop-venv>/bin/python peer_plesty_slow_server.py PORT SLOW_S [--max-lifetime S]

As peer_plesty_server.py (binds `tcp://127.0.0.1:PORT`, prints `READY <address>`, serves until
SIGTERM, SIGINT or --max-lifetime), with a device whose `query("SLOW")` sleeps SLOW_S seconds
before answering `"slow-reply"`; every other parameter answers at once with its own name and a
counter (`"FAST-1"`, `"FAST-2"`, ...), so a test can tell which question a reply answers, and
`query("SLOWRUNS")` says how often SLOW ran (without counting itself). PLESTY runs device calls
one at a time, so a question asked during the sleep is answered after it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

from peer_plesty_server import serve  # the sibling script: same directory
from plesty.lib.device.device_utils import expose_to_api


class SlowDevice:
    """`query("SLOW")` takes `slow_s` seconds; `query(NAME)` answers `"NAME-<n>"` at once."""

    _resources = {"Dev1": {"port0": ["line0"]}}

    def __init__(self, slow_s: float) -> None:
        self.slow_s = slow_s
        self.asked = 0
        self.slow_runs = 0

    def __enter__(self) -> SlowDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        print("DEVICE CLOSED", flush=True)

    @expose_to_api
    def query(self, key: str, **kwargs: Any) -> str:
        """Read a parameter."""
        if key == "SLOW":
            self.slow_runs += 1
            time.sleep(self.slow_s)
            return "slow-reply"
        if key == "SLOWRUNS":
            return self.slow_runs
        self.asked += 1
        return f"{key}-{self.asked}"

    @expose_to_api
    def write(self, key: str, value: Any, **kwargs: Any) -> bool:
        """Accept any write."""
        return True

    def summary(self, style: str = "short", filename: Any = None) -> str:
        return "SlowDevice: SLOW answers late"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="TCP port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("slow_s", type=float, help="how long query('SLOW') takes (s)")
    parser.add_argument("--max-lifetime", type=float, default=300.0, metavar="S")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args.port, args.max_lifetime, SlowDevice(args.slow_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
