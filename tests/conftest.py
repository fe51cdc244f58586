"""Fixtures shared by every tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labmesh.server import DeviceServer

from support import MemoryMeter, serve


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
