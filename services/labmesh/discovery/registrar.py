"""Keeps an instrument host's devices registered with discovery, whatever discovery does.

`labmesh serve` hands its records to a `Registrar`. One background thread per discovery
endpoint reconciles what that service knows with what this host serves: it registers new
records, heartbeats every TTL/3 (in one batched request), registers again whatever a heartbeat
reports unknown (discovery restarted, or the record expired during an outage), deregisters what
was removed, and logs an unreachable discovery service once per outage. Serving devices never
depends on discovery being up.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass

import zmq

from labmesh.discovery.beacon import BeaconSettings
from labmesh.discovery.registry import (
    DEFAULT_TTL_S,
    WILDCARD_HOSTS,
    DeviceRecord,
    InvalidRecordError,
    NameTakenError,
)
from labmesh.discovery.resolver import (
    DEFAULT_BEACON_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    DiscoveryConnection,
    DiscoveryUnavailableError,
    beacon_endpoints,
    discovery_curve,
    parse_endpoints,
)
from labmesh.security import KeyPair

log = logging.getLogger("labmesh.discovery.registrar")

#: Longest wait before retrying an unreachable discovery service (s).
RETRY_MAX_S = 1.0
#: How often `auto` listens for the beacon again while no discovery service was found (s).
BEACON_RETRY_S = 5.0


@dataclass
class _Wanted:
    record: DeviceRecord
    generation: int  # bumped by every add(), so a changed record is sent again


class Registrar:
    """Registers records with every configured discovery service and keeps them alive.

    Parameters:
        endpoints: discovery endpoints (list or comma-separated), `auto` (the LAN beacon), or
            None for LABMESH_DISCOVERY. With none configured the registrar does nothing.
        ttl_s: the registration lifetime this host wants; heartbeats go every
            min(ttl_s, the service's TTL) / 3.
        timeout_s: how long a discovery service gets to answer one request.
        context: ZeroMQ context (default: the process-wide one).
        beacon: multicast settings for `auto`.
        beacon_timeout_s: how long `auto` listens per attempt.
        server_key: discovery's CurveZMQ public key (default: $LABMESH_DISCOVERY_KEY).
        key: the host's key pair, which registers (and so owns) the records (default:
            $LABMESH_KEY); needed when discovery is secured.
    """

    def __init__(
        self,
        endpoints: list[str] | str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context | None = None,
        beacon: BeaconSettings | None = None,
        beacon_timeout_s: float = DEFAULT_BEACON_TIMEOUT_S,
        server_key: str | bytes | None = None,
        key: KeyPair | str | None = None,
    ) -> None:
        self.auto, configured = parse_endpoints(endpoints)
        self._curve = discovery_curve(server_key, key) if self.auto or configured else None
        self.ttl_s = float(ttl_s)
        self.timeout_s = timeout_s
        self.beacon = beacon
        self.beacon_timeout_s = beacon_timeout_s
        self._ctx = context or zmq.Context.instance()
        self._cond = threading.Condition()
        self._wanted: dict[str, _Wanted] = {}
        self._generation = 0
        self._stopping = False
        self._stop_deadline = math.inf
        self._workers: dict[str, _EndpointWorker] = {
            e: _EndpointWorker(self, e) for e in configured
        }
        self._finder: threading.Thread | None = None
        self._started = False

    @property
    def endpoints(self) -> list[str]:
        """The discovery endpoints in use (for `auto`: those found so far)."""
        return list(self._workers)

    def route_target(self) -> str | None:
        """An endpoint to compute the advertised address toward (None until one is known)."""
        return next(iter(self._workers), None)

    def wait_route_target(self, timeout: float) -> str | None:
        """Like route_target, but with `auto` waits up to `timeout` s for the beacon."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._workers or self._stopping or not self.auto, max(0.0, timeout)
            )
        return self.route_target()

    # ---- what to register -----------------------------------------------------------------
    def add(self, record: DeviceRecord) -> None:
        """Register `record` (replacing any record of that name); InvalidRecordError at once
        if a discovery service would refuse it (e.g. a 0.0.0.0 address)."""
        checked = DeviceRecord.from_dict(record.to_dict())
        with self._cond:
            self._generation += 1
            self._wanted[checked.name] = _Wanted(checked, self._generation)
            self._cond.notify_all()

    def remove(self, name: str) -> None:
        """Deregister `name` (in the background); unknown names are ignored."""
        with self._cond:
            if self._wanted.pop(name, None) is not None:
                self._generation += 1
                self._cond.notify_all()

    def _snapshot(self) -> tuple[int, dict[str, _Wanted]]:
        with self._cond:
            return self._generation, dict(self._wanted)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> Registrar:
        with self._cond:
            if self._started:
                return self
            self._started = True
        if not self._workers and not self.auto:
            log.info("no discovery service configured: devices are reachable by address only")
        for worker in self._workers.values():
            worker.start()
        if self.auto:
            self._finder = threading.Thread(
                target=self._find_discovery, name="registrar:beacon", daemon=True
            )
            self._finder.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Deregister everything and stop, within about `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._stop_deadline = deadline
            self._cond.notify_all()
        threads = [w.thread for w in list(self._workers.values())]
        if self._finder is not None:
            threads.append(self._finder)
        for thread in threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Registrar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait(self, seen: int, timeout: float) -> None:
        """Sleep up to `timeout` s, waking early on add/remove/stop."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._stopping or self._generation != seen, max(0.0, timeout)
            )

    def _find_discovery(self) -> None:
        logged = False
        while not self._stopping:
            try:
                found = beacon_endpoints(self.beacon, self.beacon_timeout_s)
            except DiscoveryUnavailableError as exc:
                if not logged:
                    log.warning("%s; still listening", exc)
                    logged = True
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, BEACON_RETRY_S)
                continue
            with self._cond:
                if self._stopping:
                    return
                new = [e for e in found if e not in self._workers]
                for endpoint in new:
                    self._workers[endpoint] = _EndpointWorker(self, endpoint)
                self._cond.notify_all()
            for endpoint in new:
                log.info("found discovery at %s by its beacon", endpoint)
                self._workers[endpoint].start()
            return

    # ---- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, dict[str, str]]:
        """Per endpoint, per device: `registered`, `pending`, `refused: ...`, `unreachable`."""
        _, wanted = self._snapshot()
        out = {}
        for endpoint, worker in list(self._workers.items()):
            out[endpoint] = {name: worker.state_of(name, w) for name, w in wanted.items()}
        return out

    def wait_registered(self, timeout: float, names: list[str] | None = None) -> bool:
        """Wait until every record (or those named) is registered with every endpoint."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.status()
            done = bool(states) and all(
                state == "registered"
                for per_name in states.values()
                for name, state in per_name.items()
                if names is None or name in names
            )
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(0.01)


class _EndpointWorker:
    """The thread that keeps one discovery endpoint in step with the registrar's records."""

    def __init__(self, owner: Registrar, endpoint: str) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.thread = threading.Thread(target=self._run, name=f"registrar:{endpoint}", daemon=True)
        # name -> (instance, generation) this endpoint has confirmed; touched by self.thread
        self.registered: dict[str, tuple[str, int]] = {}
        # name -> (generation, retry at, message, cause) for refused registrations
        self.refused: dict[str, tuple[int, float, str, object]] = {}
        self.interval_s = owner.ttl_s / 3
        self.next_beat = 0.0
        self.down_since: float | None = None

    def start(self) -> None:
        self.thread.start()

    def state_of(self, name: str, wanted: _Wanted) -> str:
        if self.registered.get(name) == (wanted.record.instance, wanted.generation):
            return "registered"
        refused = self.refused.get(name)
        if refused is not None and refused[0] == wanted.generation:
            return f"refused: {refused[2]}"
        return "unreachable" if self.down_since is not None else "pending"

    def _run(self) -> None:
        owner = self.owner
        connection = DiscoveryConnection(self.endpoint, owner._ctx, "registrar", owner._curve)
        try:
            while not owner._stopping:
                generation, wanted = owner._snapshot()
                attempt = time.monotonic()
                try:
                    self._sync(connection, wanted)
                    wait = self._next_due(wanted) - time.monotonic()
                    self._reachable()
                except DiscoveryUnavailableError as exc:
                    self._unreachable(exc)
                    # keep the heartbeat cadence: the time spent waiting for a reply counts
                    wait = attempt + min(self.interval_s, RETRY_MAX_S) - time.monotonic()
                owner._wait(generation, min(wait, self.interval_s))
        except Exception:  # a bug of ours: say so; the devices stay served
            log.exception("registrar for %s stopped", self.endpoint)
        finally:
            self._deregister_all(connection)
            connection.close()

    def _sync(self, connection: DiscoveryConnection, wanted: dict[str, _Wanted]) -> None:
        timeout = self.owner.timeout_s
        stale = [
            (name, instance)
            for name, (instance, _) in self.registered.items()
            if name not in wanted or wanted[name].record.instance != instance
        ]
        if stale:
            connection.request(
                {"type": "deregister", "records": [{"name": n, "instance": i} for n, i in stale]},
                timeout,
            )
            for name, _ in stale:
                del self.registered[name]
        now = time.monotonic()
        if self.registered and now >= self.next_beat:
            result = connection.request(
                {
                    "type": "heartbeat",
                    "records": [
                        {"name": n, "instance": i} for n, (i, _) in self.registered.items()
                    ],
                },
                timeout,
            )
            self._adopt_ttl(result.get("ttl_s"))
            self.next_beat = now + self.interval_s
            for name in result.get("unknown", []):
                if self.registered.pop(name, None) is not None:
                    log.info(
                        "discovery at %s does not know %s (restarted, or it expired); "
                        "registering again",
                        self.endpoint,
                        name,
                    )
        for name, want in wanted.items():
            if self.registered.get(name) == (want.record.instance, want.generation):
                continue
            refused = self.refused.get(name)
            if refused is not None and refused[0] == want.generation and refused[1] > now:
                continue
            try:
                result = connection.request(
                    {"type": "register", "record": want.record.to_dict()}, timeout
                )
            except NameTakenError as exc:
                # retried every interval (the holder may be gone); logged once per holder
                holder = exc.details.get("holder")
                self._refuse(name, want, time.monotonic() + self.interval_s, str(exc), holder)
                continue
            except InvalidRecordError as exc:
                self._refuse(name, want, math.inf, str(exc), str(exc))
                continue
            self._adopt_ttl(result.get("ttl_s"))
            if not self.registered:
                self.next_beat = time.monotonic() + self.interval_s
            self.registered[name] = (want.record.instance, want.generation)
            if self.refused.pop(name, None) is not None:
                log.info("%s: registered with %s after all", name, self.endpoint)
            else:
                log.debug("%s: registered with %s", name, self.endpoint)

    def _refuse(
        self, name: str, want: _Wanted, retry_at: float, message: str, cause: object
    ) -> None:
        previous = self.refused.get(name)
        if previous is None or previous[3] != cause:
            log.error("%s: discovery at %s refused it: %s", name, self.endpoint, message)
        self.refused[name] = (want.generation, retry_at, message, cause)

    def _adopt_ttl(self, service_ttl: object) -> None:
        ttl = self.owner.ttl_s
        if isinstance(service_ttl, (int, float)) and service_ttl > 0:
            ttl = min(ttl, float(service_ttl))
        self.interval_s = max(0.05, ttl / 3)

    def _next_due(self, wanted: dict[str, _Wanted]) -> float:
        due = [self.next_beat] if self.registered else []
        for name, want in wanted.items():
            refused = self.refused.get(name)
            if refused is not None and refused[0] == want.generation:
                due.append(refused[1])
        return min(due, default=time.monotonic() + self.interval_s)

    def _reachable(self) -> None:
        if self.down_since is not None:
            log.info(
                "discovery at %s reachable again after %.1f s",
                self.endpoint,
                time.monotonic() - self.down_since,
            )
            self.down_since = None

    def _unreachable(self, exc: DiscoveryUnavailableError) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s; devices stay served, registration retried until it answers", exc)

    def _deregister_all(self, connection: DiscoveryConnection) -> None:
        if not self.registered or self.down_since is not None:
            return
        remaining = self.owner._stop_deadline - time.monotonic()
        if remaining <= 0.01:
            return
        records = [{"name": n, "instance": i} for n, (i, _) in self.registered.items()]
        try:
            connection.request(
                {"type": "deregister", "records": records}, min(self.owner.timeout_s, remaining)
            )
            self.registered.clear()
        except DiscoveryUnavailableError as exc:
            log.info(
                "could not deregister from %s at shutdown (%s); the records expire instead",
                self.endpoint,
                exc,
            )


# ---- the address to advertise -------------------------------------------------------------
def advertised_address(
    bind_address: str, toward: str | None = None, advertise: str | None = None
) -> str:
    """A reachable form of a bound endpoint or URL: never `*` or 0.0.0.0.

    `tcp://*:5555` -> `tcp://10.0.0.5:5555`, where the host is `advertise` if given (the lab
    file's `advertise`), else the local address on the route toward `toward` (a discovery
    endpoint; found with a UDP connect, which sends nothing), else this machine's address by
    its host name. Specific hosts (`tcp://10.0.0.5:5555`) and ipc:// endpoints are returned
    unchanged unless `advertise` is given. Works for http:// URLs too (the metrics URL).
    """
    scheme, sep, rest = bind_address.partition("://")
    if not sep or scheme in ("ipc", "inproc"):
        return bind_address
    hostport, slash, path = rest.partition("/")
    host, colon, port = hostport.rpartition(":")
    if not colon:
        host, port = hostport, ""
    if advertise:
        host = advertise
    elif host in WILDCARD_HOSTS:
        host = (toward and local_address_toward(toward)) or _host_address()
    else:
        return bind_address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}{colon}{port}{slash}{path}"


def local_address_toward(endpoint: str) -> str | None:
    """This host's address on the route toward `endpoint` (None if there is no route)."""
    _, _, rest = endpoint.rpartition("://")
    hostport = rest.split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port or 9), type=socket.SOCK_DGRAM)
    except (OSError, ValueError):
        return None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(address)  # UDP: picks the route and source address, sends nothing
                local = sock.getsockname()[0]
        except OSError:
            continue
        if local not in WILDCARD_HOSTS:
            return local
    return None


def _host_address() -> str:
    """This machine's first non-loopback address by its host name, else the host name."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return name
    for *_, address in infos:
        ip = address[0]
        if not ipaddress.ip_address(ip.split("%")[0]).is_loopback:
            return ip
    return name
