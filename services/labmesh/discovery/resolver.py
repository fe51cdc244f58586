"""Device name -> address through the discovery service, as clients need it.

`Resolver` asks the configured discovery endpoints in turn and remembers the last known address
of every name, so a discovery outage does not break a client that is connected or reconnecting;
after a connection failure the client calls `invalidate(name)` and the next `resolve` asks
discovery again (the device may have moved to another PC), falling back to the last known
address only if no discovery service answers.

`DiscoveryConnection` is the request/reply channel to one discovery endpoint, shared with the
registrar.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from labmesh.discovery.beacon import BeaconSettings, beacon_disabled, find_discovery
from labmesh.discovery.registry import InvalidRecordError, NameTakenError, UnknownDeviceError
from labmesh.protocol.errors import LabmeshError
from labmesh.protocol.exchange import Action, Channel, Done, Send, Wait, result
from labmesh.security import (
    ClientCurve,
    KeyPair,
    client_security,
    discovery_key_from_environment,
)
from labmesh.transport import (
    close_monitored,
    dealer_socket,
    handshake_failure,
    handshake_monitor,
)
from labmesh.userstate import read_json, write_private_json

log = logging.getLogger("labmesh.discovery")

#: Environment variable naming the discovery endpoints (comma-separated) or `auto`.
ENV_VAR = "LABMESH_DISCOVERY"
AUTO = "auto"
DEFAULT_DISCOVERY_PORT = 5550
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_BEACON_TIMEOUT_S = 3.0
#: Where a client looks first when nothing is configured: a discovery on this machine.
LOCAL_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_DISCOVERY_PORT}"
#: $LABMESH_ADDRESS_CACHE: the file of last known addresses (default: the user's cache
#: directory), or `off`.
ADDRESS_CACHE_ENV = "LABMESH_ADDRESS_CACHE"
#: With nothing configured, how long before the LAN beacon is listened for again (s).
BEACON_RETRY_S = 30.0
#: Names the address book keeps, at most (the most recently seen).
MAX_REMEMBERED = 1000

# error replies of the discovery service raised as the local exception of the same wire type
_LOCAL_ERRORS: dict[str, type[LabmeshError]] = {
    cls.wire_type: cls for cls in (NameTakenError, UnknownDeviceError, InvalidRecordError)
}


class DiscoveryUnavailableError(LabmeshError, ConnectionError):
    """No discovery service answered (or none is configured)."""

    wire_type = "DiscoveryUnavailableError"


def normalize_endpoint(text: str) -> str:
    """`lab-core` -> `tcp://lab-core:5550`; `lab-core:6000` -> `tcp://lab-core:6000`."""
    text = text.strip()
    if "://" in text:
        return text
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and not host.endswith(":"):
        return f"tcp://{text}"
    return f"tcp://{text}:{DEFAULT_DISCOVERY_PORT}"


def parse_endpoints(spec: list[str] | str | None) -> tuple[bool, list[str]]:
    """(auto, endpoints) from a list, a comma-separated string, or None (LABMESH_DISCOVERY).

    `auto` means: find the discovery service through the LAN beacon.
    """
    if spec is None:
        spec = os.environ.get(ENV_VAR, "")
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip() for item in items if item and item.strip()]
    auto = any(item.lower() == AUTO for item in items)
    endpoints = [normalize_endpoint(item) for item in items if item.lower() != AUTO]
    return auto, list(dict.fromkeys(endpoints))


def beacon_endpoints(beacon: BeaconSettings | None, timeout_s: float) -> list[str]:
    """Endpoints announced on the LAN; DiscoveryUnavailableError saying why if none."""
    settings = beacon or BeaconSettings()
    try:
        found = find_discovery(timeout_s, settings.group, settings.port, settings.interface)
    except OSError as exc:
        raise DiscoveryUnavailableError(
            f"cannot listen for the discovery beacon: {exc}; set {ENV_VAR}=tcp://HOST:5550"
        ) from None
    if not found:
        raise DiscoveryUnavailableError(
            f"no discovery service announced itself on the LAN within {timeout_s:g} s "
            f"(multicast {settings.group}:{settings.port}); multicast may be blocked "
            f"(Kubernetes, Wi-Fi, routed networks): set {ENV_VAR}=tcp://HOST:5550"
        )
    return found


class DiscoveryConnection:
    """Requests to one discovery endpoint over a DEALER socket. Not thread-safe.

    It drives the same exchange as the device clients (labmesh.protocol.exchange), with one
    attempt: a request that gets no reply in time closes the socket (a new one is made for
    the next request, so nothing stale is delivered later) and raises
    DiscoveryUnavailableError; the Resolver then asks the next endpoint.

    Parameters:
        endpoint: the discovery API endpoint (`tcp://lab-core:5550`).
        context: the ZeroMQ context to make sockets in.
        role: a word for the socket identity (`resolver`, `registrar`), seen in service logs.
    """

    def __init__(
        self,
        endpoint: str,
        context: zmq.Context,
        role: str = "client",
        curve: ClientCurve | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._ctx = context
        self._role = role
        self._curve = curve
        self._monitor: zmq.Socket | None = None
        self._sock: zmq.Socket | None = None
        self._channel = Channel(endpoint, log)

    def request(self, payload: dict[str, Any], timeout_s: float) -> Any:
        """Send one request and return its result; raise the error it was answered with."""
        if self._sock is None:
            identity = f"{self._role}-{secrets.token_hex(6)}".encode()
            self._sock = dealer_socket(self._ctx, self.endpoint, identity, self._curve)
            if self._curve is not None:
                self._monitor = handshake_monitor(self._sock)
        exchange = self._channel.exchange(payload, wait_ms=max(1, int(timeout_s * 1000)))
        action: Action = exchange.start(time.monotonic())
        while True:
            if isinstance(action, Send):
                try:
                    self._sock.send(action.body, zmq.NOBLOCK)
                except zmq.Again:
                    self.close()
                    raise DiscoveryUnavailableError(
                        f"discovery at {self.endpoint} is not accepting requests"
                    ) from None
                action = Wait(action.wait_ms)
            elif isinstance(action, Wait):
                body = self._receive(action.ms)
                action = exchange.after_wait(body, time.monotonic())
            elif isinstance(action, Done):
                return result(action.reply, _LOCAL_ERRORS)
            else:  # GiveUp (one attempt; a discovery request never reconnects)
                failure = handshake_failure(self._monitor)
                self.close()
                why = f": {failure}" if failure is not None else ""
                raise DiscoveryUnavailableError(
                    f"discovery at {self.endpoint} did not answer within {timeout_s:g} s{why}"
                ) from None

    def _receive(self, wait_ms: int) -> bytes | None:
        if wait_ms <= 0:
            return None
        # a receive timeout costs less than a poll (no Poller object per call)
        self._sock.setsockopt(zmq.RCVTIMEO, wait_ms)
        try:
            return self._sock.recv()
        except zmq.Again:
            return None

    def close(self) -> None:
        close_monitored(self._sock, self._monitor)  # the monitor stopped first (see there)
        self._sock = self._monitor = None
        self._channel.new_route()  # the next socket has a fresh random routing id


def discovery_curve(
    server_key: str | bytes | None, key: KeyPair | str | None
) -> ClientCurve | None:
    """The CurveZMQ settings for talking to discovery: its key given, else
    $LABMESH_DISCOVERY_KEY (None: plaintext)."""
    if server_key is None:
        server_key = discovery_key_from_environment()
    return client_security(server_key, key, "discovery")


class AddressBook:
    """Last known addresses (and server keys) of device names, in a small JSON file per user,
    so a new process reaches a known device while discovery is down (and says so).

    Written only when a record changed, atomically (a temporary file renamed over it),
    owner-only, at most MAX_REMEMBERED names (the most recently seen).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] | None = None

    @classmethod
    def default(cls) -> AddressBook | None:
        configured = os.environ.get(ADDRESS_CACHE_ENV, "").strip()
        if configured.lower() == "off":
            return None
        if configured:
            return cls(Path(configured))
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return cls(Path(base) / "labmesh" / "addresses.json")

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._load().get(name)

    def remember(self, records: list[dict[str, Any]]) -> None:
        with self._lock:
            entries = self._load()
            changed = False
            for record in records:
                entry = {"address": record["address"], "server_key": record.get("server_key")}
                if entries.get(record["name"], {}).get("address") != entry["address"] or (
                    entries[record["name"]].get("server_key") != entry["server_key"]
                ):
                    entries.pop(record["name"], None)
                    entries[record["name"]] = {**entry, "seen": round(time.time())}
                    changed = True
            if not changed:
                return
            while len(entries) > MAX_REMEMBERED:
                entries.pop(next(iter(entries)))
            self._save(entries)

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            data = read_json(self.path)
            entries = data.get("devices") if isinstance(data, dict) else None
            self._entries = {
                k: v
                for k, v in (entries if isinstance(entries, dict) else {}).items()
                if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("address"), str)
            }
        return self._entries

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        try:
            write_private_json(self.path, {"devices": entries})
        except OSError as exc:  # a read-only home: the book is a convenience, never an error
            log.debug("address book %s not written: %s", self.path, exc)


_default: Resolver | None = None
_default_lock = threading.Lock()


def default_resolver() -> Resolver:
    """The process-wide Resolver, configured by LABMESH_DISCOVERY (made on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Resolver()
        return _default


class Resolver:
    """Resolves device names to addresses through one or more discovery services.

    Thread-safe; one Resolver can serve every client of a process.

    Parameters:
        endpoints: discovery endpoints (a list, or a comma-separated string), or `auto` (the
            LAN beacon); None reads LABMESH_DISCOVERY. `host:port` means `tcp://host:port`.
        timeout_s: how long each endpoint gets to answer.
        context: ZeroMQ context (default: the process-wide one).
        beacon: multicast group, port and interface for `auto`.
        beacon_timeout_s: how long `auto` listens for an announcement.
        server_key: discovery's CurveZMQ public key (default: $LABMESH_DISCOVERY_KEY; None
            there too: plaintext).
        key: this process's key pair for a secured discovery (default: $LABMESH_KEY).
    """

    def __init__(
        self,
        endpoints: list[str] | str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context | None = None,
        beacon: BeaconSettings | None = None,
        beacon_timeout_s: float = DEFAULT_BEACON_TIMEOUT_S,
        server_key: str | bytes | None = None,
        key: KeyPair | str | None = None,
    ) -> None:
        self.auto, self._configured = parse_endpoints(endpoints)
        #: nothing configured: this machine first, then the LAN beacon (`source` says which)
        self.implicit = not self.auto and not self._configured
        if self.implicit:
            self._configured = [LOCAL_ENDPOINT]
        #: where the last answer came from, for people: `tcp://... (this machine ...)`
        self.source: str | None = None
        self._beacon_due = 0.0  # when, with nothing configured, the beacon may be tried again
        self._book = AddressBook.default()
        self._server_key = server_key
        self._key = key
        self._curve: ClientCurve | bool | None = False  # worked out on first use
        self.timeout_s = timeout_s
        self.beacon = beacon
        self.beacon_timeout_s = beacon_timeout_s
        self._ctx = context or zmq.Context.instance()
        self._found: list[str] = []  # from the beacon
        self._connections: dict[str, DiscoveryConnection] = {}
        self._preferred: str | None = None
        self._request_lock = threading.Lock()  # one request at a time over the sockets
        self._cache_lock = threading.Lock()
        self._cache: dict[str, str] = {}
        self._keys: dict[str, str | None] = {}
        self._stale: set[str] = set()

    @property
    def endpoints(self) -> list[str]:
        """The endpoints asked: the configured ones, then any the beacon found."""
        return [*self._configured, *(e for e in self._found if e not in self._configured)]

    @property
    def configured(self) -> bool:
        """Whether any discovery service is configured (explicitly or `auto`)."""
        return self.auto or bool(self._configured)

    def resolve(self, name: str) -> str:
        """The address of device `name`.

        A cached address is returned without asking discovery unless `invalidate(name)` was
        called; then discovery is asked, and if no discovery service answers the last known
        address is returned. Raises UnknownDeviceError if discovery does not know the name,
        DiscoveryUnavailableError if no service answers and nothing is cached.
        """
        with self._cache_lock:
            cached = self._cache.get(name)
            if cached is not None and name not in self._stale:
                return cached
        try:
            return self.lookup(name)["address"]
        except DiscoveryUnavailableError as exc:
            if cached is None and self._book is not None:
                remembered = self._book.get(name)
                if remembered is not None:
                    cached = remembered["address"]
                    with self._cache_lock:
                        self._cache[name] = cached
                        self._keys[name] = remembered.get("server_key")
                    self.source = f"the address book {self._book.path}"
            if cached is None:
                raise
            log.warning(
                "%s: %s; using its last known address %s (from %s)",
                name,
                exc,
                cached,
                self.source if self.source and "address book" in self.source else "memory",
            )
            return cached

    def lookup(self, name: str) -> dict[str, Any]:
        """The full record of `name`, always asked of discovery (and cached)."""
        record = self._ask({"type": "lookup", "name": name})
        self._remember([record])
        return record

    def invalidate(self, name: str) -> None:
        """Make the next `resolve(name)` ask discovery (after a connection failure)."""
        with self._cache_lock:
            if name in self._cache:
                self._stale.add(name)

    def server_key(self, name: str) -> str | None:
        """The CurveZMQ public key discovery published for `name` (None: a plaintext server,
        or never looked up)."""
        with self._cache_lock:
            return self._keys.get(name)

    def cached(self, name: str) -> str | None:
        """The last known address of `name`, without asking anyone."""
        with self._cache_lock:
            return self._cache.get(name)

    def list(
        self,
        *,
        name: str | None = None,
        kind: str | None = None,
        host: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Registered devices matching the filters (`name` is a glob such as `pm100-*`)."""
        filters = {"name": name, "kind": kind, "host": host, "labels": labels}
        records = self._ask({"type": "list", **{k: v for k, v in filters.items() if v}})
        self._remember(records)
        return records

    def watch(self) -> dict[str, Any]:
        """Where to subscribe for changes: `{pub, seq, devices}` from the first answering
        service, with a wildcard host in `pub` replaced by the host that answered."""
        result = self._ask({"type": "watch"})
        pub = result["pub"]
        scheme, _, rest = pub.partition("://")
        host, _, port = rest.rpartition(":")
        if host in ("*", "0.0.0.0", "[::]", "") and self._preferred:
            answered = self._preferred.partition("://")[2].rpartition(":")[0]
            result["pub"] = f"{scheme}://{answered}:{port}"
        return result

    def ping(self) -> dict[str, Any]:
        """The first answering discovery service's status."""
        return self._ask({"type": "ping"})

    def close(self) -> None:
        with self._request_lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()

    def __enter__(self) -> Resolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remember(self, records: list[dict[str, Any]]) -> None:
        with self._cache_lock:
            for record in records:
                self._cache[record["name"]] = record["address"]
                self._keys[record["name"]] = record.get("server_key")
                self._stale.discard(record["name"])
        if self._book is not None:
            self._book.remember(records)

    def _ask(self, payload: dict[str, Any]) -> Any:
        """Ask the endpoints in turn (the last one that answered first).

        An endpoint that does not know a name may have just restarted, so the others are
        asked too; UnknownDeviceError is raised only if no endpoint knows it. With nothing
        configured, the LAN beacon is tried once this machine's discovery did not answer.
        """
        with self._request_lock:
            failures: list[str] = []
            unknown: list[UnknownDeviceError] = []
            endpoints = self._endpoints_to_ask()
            found, result = self._ask_each(endpoints, payload, failures, unknown)
            if (
                not found
                and self.implicit
                and time.monotonic() >= self._beacon_due
                and not unknown
                and not beacon_disabled()
            ):
                # listen again after a while: a discovery may have come up on the LAN since
                self._beacon_due = time.monotonic() + BEACON_RETRY_S
                try:
                    self._found = beacon_endpoints(self.beacon, self.beacon_timeout_s)
                except DiscoveryUnavailableError as exc:
                    failures.append(f"LAN beacon: {exc}")
                found, result = self._ask_each(self._found, payload, failures, unknown)
            if found:
                return result
            if unknown:
                raise unknown[0]
            if not self.implicit:
                self._found = []  # with `auto`, listen to the beacon again next time
            where = (
                f" (looked at {LOCAL_ENDPOINT} on this machine and for the LAN beacon, as "
                f"{ENV_VAR} is not set; set it to tcp://HOST:5550)"
                if self.implicit
                else " (is `labmesh discovery` running there and reachable?)"
            )
            raise DiscoveryUnavailableError(
                "no discovery service answered: " + "; ".join(failures) + where
            )

    def _ask_each(
        self,
        endpoints: list[str],
        payload: dict[str, Any],
        failures: list[str],
        unknown: list[UnknownDeviceError],
    ) -> tuple[bool, Any]:
        endpoints = list(endpoints)
        if self._preferred in endpoints:
            endpoints.remove(self._preferred)
            endpoints.insert(0, self._preferred)
        for endpoint in endpoints:
            connection = self._connections.get(endpoint)
            if connection is None:
                if self._curve is False:
                    self._curve = discovery_curve(self._server_key, self._key)
                connection = DiscoveryConnection(
                    endpoint, self._ctx, "resolver", self._curve or None
                )
                self._connections[endpoint] = connection
            try:
                result = connection.request(payload, self.timeout_s)
            except DiscoveryUnavailableError as exc:
                failures.append(str(exc))
                continue
            except UnknownDeviceError as exc:
                unknown.append(exc)
                continue
            self._preferred = endpoint
            self.source = self._describe_source(endpoint)
            return True, result
        return False, None

    def _describe_source(self, endpoint: str) -> str:
        if not self.implicit:
            return endpoint
        if endpoint == LOCAL_ENDPOINT:
            return f"{endpoint} (this machine; {ENV_VAR} is not set)"
        return f"{endpoint} (found by the LAN beacon; {ENV_VAR} is not set)"

    def _endpoints_to_ask(self) -> list[str]:
        if self.implicit:
            return self.endpoints
        if not self.configured:
            raise DiscoveryUnavailableError(
                f"no discovery service configured: set {ENV_VAR}=tcp://HOST:5550 (or 'auto' "
                "on a LAN with multicast), or connect with a tcp:// address instead of a name"
            )
        if self.auto and not self._found:
            try:
                self._found = beacon_endpoints(self.beacon, self.beacon_timeout_s)
            except DiscoveryUnavailableError:
                if not self._configured:
                    raise
        return self.endpoints
