"""labmesh: networked lab instruments over ZeroMQ, with locks, discovery and metrics.

from labmesh import Device, operation, build_server, build_client, RemoteError
"""

from labmesh.client import AsyncDeviceClient, DeviceClient, build_async_client, build_client
from labmesh.device import Device, Parameter, operation
from labmesh.protocol.errors import LabmeshError, RemoteError
from labmesh.server import DeviceServer, build_server
from labmesh.version import __version__

__all__ = [
    "AsyncDeviceClient",
    "Device",
    "DeviceClient",
    "DeviceServer",
    "LabmeshError",
    "Parameter",
    "RemoteError",
    "__version__",
    "build_async_client",
    "build_client",
    "build_server",
    "operation",
]
