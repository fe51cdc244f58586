"""Discovery: where every device of the lab is served, found by name.

- `registry`: the pure record table (TTLs, unique names, queries, change log).
- `service`: `DiscoveryService`, the registry behind ZeroMQ, a PUB change feed, HTTP and a beacon.
- `beacon`: LAN announcements by UDP multicast (`LABMESH_DISCOVERY=auto`).
- `resolver`: `Resolver`, name -> address for clients, with a last-known-address cache.
- `registrar`: `Registrar`, which keeps an instrument host's devices registered.
"""

from labmesh.discovery.beacon import BeaconSettings, find_discovery
from labmesh.discovery.registrar import Registrar, advertised_address
from labmesh.discovery.registry import (
    DEFAULT_TTL_S,
    DeviceRecord,
    InvalidRecordError,
    NameTakenError,
    Registry,
    UnknownDeviceError,
)
from labmesh.discovery.resolver import ENV_VAR, DiscoveryUnavailableError, Resolver

__all__ = [
    "DEFAULT_TTL_S",
    "ENV_VAR",
    "BeaconSettings",
    "DeviceRecord",
    "DiscoveryService",
    "DiscoveryUnavailableError",
    "InvalidRecordError",
    "NameTakenError",
    "Registrar",
    "Registry",
    "Resolver",
    "UnknownDeviceError",
    "advertised_address",
    "find_discovery",
]


def __getattr__(name: str) -> object:
    # the service pulls in http.server and prometheus_client; clients only need the resolver
    if name == "DiscoveryService":
        from labmesh.discovery.service import DiscoveryService

        return DiscoveryService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
