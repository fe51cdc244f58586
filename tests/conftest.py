"""Fixtures shared by every tier."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator

import pytest

from labmesh.server import DeviceServer

from support import MemoryMeter, serve

# every `labmesh serve` a test starts (in this process or a child) writes its audit trail in a
# temporary directory, never into the user's ~/.local/state
_STATE = tempfile.mkdtemp(prefix="labmesh-test-state-")
os.environ.setdefault("LABMESH_AUDIT", os.path.join(_STATE, "audit.jsonl"))
# ... and every client remembers the addresses it resolved here, not in ~/.cache
os.environ.setdefault("LABMESH_ADDRESS_CACHE", os.path.join(_STATE, "addresses.json"))
os.environ.setdefault("LABMESH_STATE_DIR", _STATE)  # hosts' registration ids
# ... and a client with no discovery configured does not listen for the LAN beacon, so no test
# joins a multicast group on a real interface (the beacon's own tests run in network
# namespaces they made, with `auto` or explicit settings, which this does not affect)
os.environ.setdefault("LABMESH_BEACON", "off")
# A runner that starts pytest in the background (`cmd &` in a script, without job control)
# makes it ignore SIGINT, and every child inherits that: the tests that press Ctrl+C on a CLI
# or server would then press it on a process that ignores it. They stand for a user at a
# terminal, so the tests run with Python's default handler (children start with SIG_DFL).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def meter() -> MemoryMeter:
    return MemoryMeter()


@pytest.fixture(params=[True, False], ids=["dedicated", "pool"])
def server(request, meter) -> Iterator[DeviceServer]:
    srv = serve(meter, fixed_threading=request.param)
    try:
        yield srv
    finally:
        srv.stop()
