"""labmesh: networked lab instruments over ZeroMQ, with locks, discovery and metrics.

from labmesh import Device, operation, build_server, build_client, RemoteError

Names are loaded on first use (PEP 562), so importing a pure layer (`labmesh.locks`,
`labmesh.server.core`, `labmesh.protocol.native`) loads no zmq or prometheus_client.
"""

from __future__ import annotations

from labmesh.lazy import lazy_names
from labmesh.version import __version__

_LAZY = {
    "AsyncDeviceClient": "labmesh.client",
    "DeviceClient": "labmesh.client",
    "build_async_client": "labmesh.client",
    "build_client": "labmesh.client",
    "Device": "labmesh.device",
    "Parameter": "labmesh.device",
    "operation": "labmesh.device",
    "LabmeshError": "labmesh.protocol.errors",
    "RemoteError": "labmesh.protocol.errors",
    "DeviceServer": "labmesh.server",
    "ServerLimits": "labmesh.server",
    "build_server": "labmesh.server",
}

__all__ = [*sorted(_LAZY), "__version__"]


__getattr__ = lazy_names("labmesh", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
