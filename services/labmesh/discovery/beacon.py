"""LAN beacon: the discovery service announces itself by UDP multicast; clients listen for it.

With `LABMESH_DISCOVERY=auto` a client or instrument host finds the discovery service on a flat
LAN with no configuration: the service sends a small JSON datagram every few seconds to a
multicast group (default 239.255.76.77:5553, an organisation-local address) with IP TTL 1, so it
never leaves the local link, and `find_discovery()` listens for it.

Multicast does not cross routers, and Kubernetes pod networks (most CNI plugins) and many cloud
or Wi-Fi networks drop it: there, give the discovery address explicitly
(`LABMESH_DISCOVERY=tcp://labmesh-discovery:5550`, the chart's Service name).

An announcement may carry wildcard endpoints (`tcp://0.0.0.0:5550`, when the service listens on
every interface); the listener replaces a wildcard host with the address the datagram came from.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from labmesh.discovery.registry import WILDCARD_HOSTS

log = logging.getLogger("labmesh.discovery.beacon")

DEFAULT_GROUP = "239.255.76.77"
DEFAULT_PORT = 5553
DEFAULT_INTERVAL_S = 2.0
#: The `service` field of an announcement; datagrams without it are ignored.
SERVICE_TAG = "labmesh-discovery"
BEACON_VERSION = 1
#: Announcements stay below a typical MTU so they are never fragmented.
MAX_DATAGRAM_BYTES = 1400
#: After the first announcement, how long find_discovery keeps listening for others.
SETTLE_S = 0.3


@dataclass(frozen=True)
class BeaconSettings:
    """Where and how often the discovery service announces itself.

    Attributes:
        group: the IPv4 multicast group.
        port: the UDP port.
        interval_s: seconds between announcements.
        interface: send (and listen) on this interface, given as its IPv4 address or its name
            (`eth0`); None lets the routing table choose (needs a multicast or default route).
        ttl: the IP TTL of announcements; 1 keeps them on the local link.
    """

    group: str = DEFAULT_GROUP
    port: int = DEFAULT_PORT
    interval_s: float = DEFAULT_INTERVAL_S
    interface: str | None = field(default_factory=lambda: environment_interface())
    ttl: int = 1


#: $LABMESH_BEACON: the interface the beacon uses unless told otherwise (an address or a name),
#: or `off`: clients with nothing configured then do not listen for it.
BEACON_ENV = "LABMESH_BEACON"


def environment_interface() -> str | None:
    value = os.environ.get(BEACON_ENV, "").strip()
    return value if value and value.lower() != "off" else None


def beacon_disabled() -> bool:
    """Whether $LABMESH_BEACON says `off`."""
    return os.environ.get(BEACON_ENV, "").strip().lower() == "off"


@dataclass(frozen=True)
class Announcement:
    """A decoded announcement, wildcard hosts already replaced by the sender's address.

    Attributes:
        endpoints: the discovery service's ZeroMQ API endpoints.
        pub: its change feed endpoint, or None.
        http: its HTTP base URL (/targets, /devices, /health), or None.
        instance: the service's id for this start (a new one after a restart).
        source: the IP address the datagram came from.
    """

    endpoints: tuple[str, ...]
    pub: str | None
    http: str | None
    instance: str
    source: str


def encode_announcement(
    endpoints: list[str], *, instance: str, pub: str | None = None, http: str | None = None
) -> bytes:
    """The datagram announcing a discovery service; ValueError if it would not fit one packet."""
    body = json.dumps(
        {
            "service": SERVICE_TAG,
            "version": BEACON_VERSION,
            "instance": instance,
            "endpoints": list(endpoints),
            "pub": pub,
            "http": http,
        },
        separators=(",", ":"),
    ).encode()
    if len(body) > MAX_DATAGRAM_BYTES:
        raise ValueError(
            f"beacon announcement of {len(body)} bytes exceeds {MAX_DATAGRAM_BYTES}; "
            "announce fewer or shorter endpoints"
        )
    return body


def decode_announcement(data: bytes, source: str) -> Announcement:
    """Decode a datagram received from `source`; ValueError if it is not an announcement."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"beacon datagram from {source} is not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("service") != SERVICE_TAG:
        raise ValueError(f"datagram from {source} is not a labmesh discovery announcement")
    endpoints = obj.get("endpoints")
    if (
        not isinstance(endpoints, list)
        or not endpoints
        or not all(isinstance(e, str) and "://" in e for e in endpoints)
    ):
        raise ValueError(f"announcement from {source} has no valid 'endpoints' list")
    optional = {}
    for key in ("pub", "http"):
        value = obj.get(key)
        if value is not None and not (isinstance(value, str) and "://" in value):
            raise ValueError(f"announcement from {source}: {key!r} is not an endpoint")
        optional[key] = None if value is None else substitute_wildcard(value, source)
    instance = obj.get("instance")
    return Announcement(
        endpoints=tuple(substitute_wildcard(e, source) for e in endpoints),
        pub=optional["pub"],
        http=optional["http"],
        instance=instance if isinstance(instance, str) else "",
        source=source,
    )


def substitute_wildcard(endpoint: str, host: str) -> str:
    """`tcp://0.0.0.0:5550` -> `tcp://HOST:5550`; endpoints with a real host are unchanged."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint
    hostport, slash, path = rest.partition("/")
    name, colon, port = hostport.rpartition(":")
    if not colon or name not in WILDCARD_HOSTS:
        return endpoint
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{slash}{path}"


# ---- sockets ----------------------------------------------------------------------------
def _interface_option(interface: str | None) -> tuple[bytes, int]:
    """(IPv4 address bytes, interface index) for an address, a name, or None (any)."""
    if interface is None:
        return socket.inet_aton("0.0.0.0"), 0
    try:
        return socket.inet_aton(str(ipaddress.IPv4Address(interface))), 0
    except ValueError:
        pass
    try:
        return socket.inet_aton("0.0.0.0"), socket.if_nametoindex(interface)
    except OSError:
        raise ValueError(
            f"beacon interface {interface!r} is neither an IPv4 address nor an interface name "
            "of this host (see `ip -br addr`)"
        ) from None


def _mreqn(group: str | None, interface: str | None) -> bytes:
    """struct ip_mreqn (Linux): group, local address, interface index."""
    address, index = _interface_option(interface)
    group_bytes = socket.inet_aton(group) if group else socket.inet_aton("0.0.0.0")
    return struct.pack("=4s4si", group_bytes, address, index)


def sender_socket(settings: BeaconSettings) -> socket.socket:
    """A UDP socket that sends to the beacon group with TTL `settings.ttl`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, settings.ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        if settings.interface is not None:
            sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, _mreqn(None, settings.interface)
            )
    except BaseException:
        sock.close()
        raise
    return sock


def listener_socket(group: str, port: int, interface: str | None) -> socket.socket:
    """A UDP socket that has joined `group` and receives its datagrams on `port`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # bound to the group address, the socket sees only this group's datagrams (Linux)
        sock.bind((group, port))
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, _mreqn(group, interface))
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot join multicast group {group} on "
                f"{interface or 'the default interface'}: {exc.strerror} (no multicast or "
                "default route? pass the interface, or give the discovery address instead)",
            ) from None
    except BaseException:
        sock.close()
        raise
    return sock


class BeaconAnnouncer:
    """Sends one announcement every `settings.interval_s` from a background thread.

    Parameters:
        payload: the datagram (see `encode_announcement`).
        settings: group, port, interval, interface and TTL.
    """

    def __init__(self, payload: bytes, settings: BeaconSettings | None = None) -> None:
        self.payload = payload
        self.settings = settings or BeaconSettings()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self) -> BeaconAnnouncer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="beacon", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        settings = self.settings
        target = (settings.group, settings.port)
        failing = False
        with sender_socket(settings) as sock:
            while not self._stop.is_set():
                try:
                    sock.sendto(self.payload, target)
                    self.sent += 1
                    if failing:
                        log.info("beacon: announcing to %s:%d again", *target)
                    failing = False
                except OSError as exc:
                    if not failing:  # once per outage, not every interval
                        log.warning(
                            "beacon: cannot send to %s:%d (%s); clients must be given the "
                            "discovery address until this is fixed",
                            *target,
                            exc,
                        )
                    failing = True
                self._stop.wait(settings.interval_s)


def find_announcements(
    timeout_s: float = 3.0,
    group: str = DEFAULT_GROUP,
    port: int = DEFAULT_PORT,
    interface: str | None = None,
    *,
    wait_all: bool = False,
) -> list[Announcement]:
    """Listen for discovery announcements, one per service instance, in order of arrival.

    Returns shortly after the first announcement (SETTLE_S, to catch a second service),
    or after `timeout_s` with whatever arrived (an empty list if nothing did). With
    `wait_all`, listens for the whole `timeout_s` (at least one announcement interval finds
    every service).
    """
    found: dict[str, Announcement] = {}
    deadline = time.monotonic() + timeout_s
    with listener_socket(group, port, interface) as sock:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data, (source, _) = sock.recvfrom(MAX_DATAGRAM_BYTES + 1)
            except TimeoutError:
                break
            try:
                announcement = decode_announcement(data, source)
            except ValueError as exc:
                log.debug("beacon: ignored %s", exc)
                continue
            key = announcement.instance or ",".join(announcement.endpoints)
            found.setdefault(key, announcement)
            if not wait_all:
                deadline = min(deadline, time.monotonic() + SETTLE_S)
    return list(found.values())


def find_discovery(
    timeout_s: float = 3.0,
    group: str = DEFAULT_GROUP,
    port: int = DEFAULT_PORT,
    interface: str | None = None,
) -> list[str]:
    """The ZeroMQ endpoints of the discovery services announcing on this LAN ([] if none)."""
    endpoints: list[str] = []
    for announcement in find_announcements(timeout_s, group, port, interface):
        endpoints.extend(e for e in announcement.endpoints if e not in endpoints)
    return endpoints
