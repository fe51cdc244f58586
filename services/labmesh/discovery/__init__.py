"""Discovery: where every device of the lab is served, found by name.

- `registry`: the pure record table (TTLs, unique names, queries, change log).
- `service`: `DiscoveryService`, the registry behind ZeroMQ, a PUB change feed, HTTP and a beacon.
- `beacon`: LAN announcements by UDP multicast (`LABMESH_DISCOVERY=auto`).
- `resolver`: `Resolver`, name -> address for clients, with a last-known-address cache.
- `registrar`: `Registrar`, which keeps an instrument host's devices registered.
"""

from __future__ import annotations

from labmesh.lazy import lazy_names

# names load on first use: the registry stays pure, the service pulls in http.server and
# prometheus_client, and clients only need the resolver
_LAZY = {
    "BeaconSettings": "labmesh.discovery.beacon",
    "find_discovery": "labmesh.discovery.beacon",
    "Registrar": "labmesh.discovery.registrar",
    "advertised_address": "labmesh.discovery.registrar",
    "DEFAULT_TTL_S": "labmesh.discovery.registry",
    "DeviceRecord": "labmesh.discovery.registry",
    "InvalidRecordError": "labmesh.discovery.registry",
    "NameTakenError": "labmesh.discovery.registry",
    "Registry": "labmesh.discovery.registry",
    "UnknownDeviceError": "labmesh.discovery.registry",
    "ENV_VAR": "labmesh.discovery.resolver",
    "DiscoveryUnavailableError": "labmesh.discovery.resolver",
    "Resolver": "labmesh.discovery.resolver",
    "DiscoveryService": "labmesh.discovery.service",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_names("labmesh.discovery", _LAZY, globals())
