"""A device server in its own process for subscription tests: `Ticker` publishes a counter.

    python tests/ticker_server.py [--max-lifetime S]

Prints `ADDRESS <endpoint>` once it serves on 127.0.0.1 (a free port), then serves until stdin
closes, SIGTERM, or --max-lifetime seconds. `burst(rate_hz, seconds)` makes the device publish
COUNT (1, 2, 3, ...) at that rate from its own thread, as a driver pushing readings would.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))

from labmesh import Device, Parameter, build_server, operation


class Ticker(Device):
    """Publishes COUNT at a rate for a while (`burst`); polled values are the count too."""

    kind = "ticker"
    COUNT = Parameter(int, read_only=True, description="the last value published")
    BLOB = Parameter(str, read_only=True, description="the count, padded to `pad` bytes")

    def __init__(self) -> None:
        super().__init__("ticker")
        self.count = 0

    def _query_(self, name: str) -> int | str:
        return self.count if name == "COUNT" else f"{self.count}:"

    @operation(resources=())
    def burst(self, rate_hz: float, seconds: float, pad: int = 0) -> int:
        """Publish COUNT `rate_hz` times a second for `seconds` (in the background); with
        `pad`, BLOB instead: the count and `pad` bytes."""
        period = 1.0 / rate_hz
        total = int(rate_hz * seconds)

        def run() -> None:
            due = time.perf_counter()
            for _ in range(total):
                self.count += 1
                if pad:
                    self.publish("BLOB", f"{self.count}:" + "x" * pad)
                else:
                    self.publish("COUNT", self.count)
                due += period
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

        threading.Thread(target=run, daemon=True).start()
        return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-lifetime", type=float, default=120.0)
    args = parser.parse_args()
    server = build_server(Ticker(), address="tcp://127.0.0.1:0").start()
    print(f"ADDRESS {server.address}", flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    try:
        done.wait(args.max_lifetime)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
