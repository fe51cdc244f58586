"""The device server: a pure core (`core`) under a thin socket loop (`loop`).

`DeviceServer` / `build_server` serve one device on one ZeroMQ ROUTER endpoint;
`ServerLimits` bounds everything a peer can make the server hold. Names load on first use, so
`import labmesh.server.core` stays free of zmq.
"""

from __future__ import annotations

from labmesh.lazy import lazy_names

_LAZY = {
    "CAPABILITIES": "labmesh.server.core",
    "ServerCore": "labmesh.server.core",
    "ServerLimits": "labmesh.server.core",
    "DeviceServer": "labmesh.server.loop",
    "build_server": "labmesh.server.loop",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_names("labmesh.server", _LAZY, globals())
