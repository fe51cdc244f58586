"""A device server for the attack tests (tests/integration/test_attacks.py), run as a subprocess.

Serves a MemoryMeter (tests/support.py) with `DeviceServer(meter, fixed_threading=True, ...)` on
127.0.0.1, logs at INFO level to a file (never to a pipe nobody drains), writes the address it
bound to a file, and runs until SIGTERM (or SIGINT).

Usage:
    python tests/attack_server.py LOG_FILE ADDRESS_FILE [OPTIONS_JSON]

ADDRESS_FILE gets two lines: the device server's address and the URL of its Prometheus /metrics
(served on 127.0.0.1, a free port).

OPTIONS_JSON is a JSON object of extra DeviceServer keyword options, e.g. '{"max_waiters": 20}';
without it the server's own defaults apply. `address` defaults to tcp://127.0.0.1:0 (a free port).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labmesh import metrics
from labmesh.server import DeviceServer

from support import MemoryMeter


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    log_file, address_file = argv[1], argv[2]
    options = json.loads(argv[3]) if len(argv) == 4 else {}
    if not isinstance(options, dict):
        print("OPTIONS_JSON must be a JSON object", file=sys.stderr)
        return 2
    logging.basicConfig(
        filename=log_file,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    options.setdefault("address", "tcp://127.0.0.1:0")
    server = DeviceServer(MemoryMeter(), fixed_threading=True, **options).start()
    http = metrics.start_http(0, "127.0.0.1")
    try:
        tmp = f"{address_file}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{server.address}\nhttp://127.0.0.1:{http.server_port}/metrics\n")
        os.replace(tmp, address_file)  # the reader never sees half an address
        while not stop.wait(0.2):
            pass
    finally:
        http.shutdown()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
