"""Fixtures shared by every tier."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from labmesh.server import DeviceServer

from support import MemoryMeter, serve

# every `labmesh serve` a test starts (in this process or a child) writes its audit trail here,
# never into the user's ~/.local/state
os.environ.setdefault(
    "LABMESH_AUDIT", os.path.join(tempfile.mkdtemp(prefix="labmesh-test-audit-"), "audit.jsonl")
)


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
