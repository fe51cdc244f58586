"""The discovery registry: which device is served where, kept alive by heartbeats.

Pure state (no sockets, no threads, no clock reads): every method that needs the time takes
`now`, a monotonic number of seconds. The discovery service owns one Registry, drives it from its
request loop and publishes the change log; tests drive it with plain numbers.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import math
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from labmesh.protocol.errors import LabmeshError

DEFAULT_TTL_S = 10.0
#: A device name: what `labmesh serve` accepts in a lab file.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: Address schemes a device server may advertise.
ADDRESS_SCHEMES = frozenset({"tcp", "ipc", "ws", "wss"})
#: Hosts that mean "every interface": fine to bind, useless to connect to.
WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})
#: How many removed records are remembered to explain a failed lookup.
_GONE_MEMORY = 1000


class NameTakenError(LabmeshError):
    """A server tried to register a name another live server holds (names are unique per lab)."""

    wire_type = "NameTakenError"


class UnknownDeviceError(LabmeshError, LookupError):
    """No live registration for the name looked up."""

    wire_type = "UnknownDeviceError"


class InvalidRecordError(LabmeshError, ValueError):
    """A registration whose fields are missing or malformed."""

    wire_type = "ValueError"


def instance_tag(instance: str) -> str:
    """A public stand-in for a secret instance id: the same for one server start, useless for
    renewing or removing its record."""
    return "tag-" + hashlib.sha256(instance.encode()).hexdigest()[:12]


@dataclass(slots=True)
class DeviceRecord:
    """What a device server tells discovery about one device.

    Attributes:
        name: the device's unique name in the lab (`pm100-a`).
        address: the ZeroMQ endpoint clients connect to (`tcp://10.0.0.5:5555`); never a
            wildcard host such as 0.0.0.0.
        kind: the device kind (`powermeter`, `daq`, ...).
        metrics_url: the Prometheus endpoint of the serving process
            (`http://10.0.0.5:9105/metrics`), or None.
        host: the name of the instrument host that serves it.
        labels: free-form string labels (room, owner, ...), queried by equality.
        resources: the device's lockable resources (list or tree), as `describe` reports them.
        protocols: wire protocols spoken at `address` (`labmesh/1`, `laplace`).
        version: the labmesh version of the server.
        started: when the server started (wall-clock epoch seconds, for display).
        instance: a fresh random id per server start; only this instance may renew or remove
            the registration.
        server_key: the server's CurveZMQ public key (Z85 text), for clients connecting by
            name; on a secured discovery service it is the key that registered the record.
        owner: the CurveZMQ key that registered the record (set by a secured discovery service
            from the handshake, never from the wire; None on a plaintext one). Only that key
            renews, changes or removes it.
    """

    name: str
    address: str
    instance: str
    kind: str = ""
    metrics_url: str | None = None
    host: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    resources: Any = None
    protocols: list[str] = field(default_factory=list)
    version: str = ""
    started: float = 0.0
    server_key: str | None = None
    owner: str | None = None

    def public_dict(self) -> dict[str, Any]:
        """The record as anyone may see it (lookup, list, the change feed, /devices): the
        instance id, which renews and removes the record, is replaced by a tag of it, so
        nothing a lookup returns lets a stranger deregister or take over the name."""
        out = self.to_dict()
        out["instance"] = instance_tag(self.instance)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The record as its registrar sends it (with the secret instance id)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "address": self.address,
            "metrics_url": self.metrics_url,
            "host": self.host,
            "labels": dict(self.labels),
            "resources": self.resources,
            "protocols": list(self.protocols),
            "version": self.version,
            "started": self.started,
            "instance": self.instance,
            "server_key": self.server_key,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> DeviceRecord:
        """Validate a record as sent on the wire; InvalidRecordError names the bad field."""
        if not isinstance(obj, dict):
            raise InvalidRecordError(
                f"a device record must be a JSON object, got {type(obj).__name__}"
            )
        name = obj.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise InvalidRecordError(
                f"record name {name!r} is not a valid device name: 1-63 letters, digits, '.', "
                "'_' or '-', starting with a letter or digit"
            )
        where = f"record {name!r}"
        instance = _text(obj, "instance", where)
        if not instance:
            raise InvalidRecordError(
                f"{where}: 'instance' is required: a fresh random id per server start"
            )
        labels = obj.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise InvalidRecordError(
                f"{where}: 'labels' must map strings to strings, got {labels!r}"
            )
        protocols = obj.get("protocols") or []
        if not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols):
            raise InvalidRecordError(
                f"{where}: 'protocols' must be a list of strings, got {protocols!r}"
            )
        started = obj.get("started", 0.0)
        if isinstance(started, bool) or not isinstance(started, (int, float)):
            raise InvalidRecordError(f"{where}: 'started' must be epoch seconds, got {started!r}")
        if not math.isfinite(started):
            raise InvalidRecordError(f"{where}: 'started' must be finite, got {started!r}")
        metrics_url = obj.get("metrics_url")
        if metrics_url is not None:
            metrics_url = _checked_metrics_url(metrics_url, where)
        server_key = obj.get("server_key")
        if server_key is not None and not (
            isinstance(server_key, str) and _Z85_KEY.fullmatch(server_key)
        ):
            raise InvalidRecordError(
                f"{where}: 'server_key' must be a CurveZMQ public key (40 Z85 characters) or "
                f"null, got {_clip_text(server_key)}"
            )
        return cls(
            name=name,
            address=_checked_address(obj.get("address"), where),
            instance=instance,
            kind=_text(obj, "kind", where),
            metrics_url=metrics_url,
            host=_text(obj, "host", where),
            labels=dict(labels),
            resources=obj.get("resources"),
            protocols=list(protocols),
            version=_text(obj, "version", where),
            started=float(started),
            server_key=server_key,
        )

    def describe(self) -> str:
        """`pm100-a at tcp://10.0.0.5:5555 on lab-pc-3`, for messages."""
        return f"{self.name} at {self.address}" + (f" on {self.host}" if self.host else "")


_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


def _clip_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRecordError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def _checked_address(address: Any, where: str) -> str:
    if not isinstance(address, str) or "://" not in address:
        raise InvalidRecordError(
            f"{where}: 'address' must be a ZeroMQ endpoint such as tcp://10.0.0.5:5555, "
            f"got {address!r}"
        )
    scheme, _, rest = address.partition("://")
    if scheme not in ADDRESS_SCHEMES or not rest:
        raise InvalidRecordError(
            f"{where}: address {address!r} must use one of {sorted(ADDRESS_SCHEMES)}"
        )
    if scheme != "ipc":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.split("/", 1)[0].isdigit():
            raise InvalidRecordError(f"{where}: address {address!r} has no port")
        if host in WILDCARD_HOSTS:
            raise InvalidRecordError(
                f"{where}: address {address!r} is a listening wildcard, not a reachable "
                "address; advertise this host's address (the lab file's 'advertise')"
            )
    return address


def _checked_metrics_url(url: Any, where: str) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    try:
        port = parts.port if parts is not None else None
    except ValueError:
        port = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise InvalidRecordError(
            f"{where}: 'metrics_url' must look like http://HOST:PORT/metrics, got {url!r}"
        )
    if parts.hostname in WILDCARD_HOSTS:
        raise InvalidRecordError(
            f"{where}: metrics_url {url!r} names a wildcard host; Prometheus needs this "
            "host's reachable address"
        )
    return url


@dataclass(slots=True)
class Registration:
    """A record as the registry holds it: the record plus its TTL bookkeeping (monotonic s)."""

    record: DeviceRecord
    registered_at: float
    last_seen: float
    expires_at: float

    def view(self, now: float) -> dict[str, Any]:
        """The record as the API and /devices show it, with its age and remaining TTL."""
        return {
            **self.record.public_dict(),
            "registered_for_s": round(now - self.registered_at, 3),
            "last_seen_s": round(now - self.last_seen, 3),
            "expires_in_s": round(max(0.0, self.expires_at - now), 3),
        }


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change log.

    Attributes:
        seq: position in the log (1, 2, 3, ... per registry).
        event: `added`, `updated` or `removed`.
        reason: why: `registered`, `changed`, `deregistered`, `expired`, `replaced`.
        record: the record after the change (before it, for `removed`).
    """

    seq: int
    event: str
    reason: str
    record: DeviceRecord

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "event": self.event,
            "reason": self.reason,
            "name": self.record.name,
            "record": self.record.public_dict(),
        }


class Registry:
    """Live device records with TTLs, unique names and a change log.

    A record lives `ttl_s` after its last register or heartbeat. A name belongs to one server
    instance while its record lives; once it has expired (or was deregistered) anyone may claim
    it. Records past their TTL are invisible at once and removed by `expire(now)`.

    Parameters:
        ttl_s: seconds a record lives without a heartbeat.
        max_pending_changes: how many undrained changes are kept (the oldest are dropped
            beyond it; consumers notice the gap in `seq`).
    """

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, *, max_pending_changes: int = 100_000):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
        self.ttl_s = float(ttl_s)
        self._entries: dict[str, Registration] = {}
        self._changes: deque[Change] = deque(maxlen=max_pending_changes)
        self._seq = 0
        # name -> (record, when removed, why): explains lookups of devices that just went away
        self._gone: OrderedDict[str, tuple[DeviceRecord, float, str]] = OrderedDict()

    @property
    def seq(self) -> int:
        """The sequence number of the latest change (0 before any)."""
        return self._seq

    # ---- changes --------------------------------------------------------------------------
    def register(self, record: DeviceRecord, now: float) -> Registration:
        """Add or refresh `record`; its TTL restarts from `now`.

        The same instance registering again refreshes (an `updated` change if a field
        differs). Raises NameTakenError, naming the holder's address and host, if another
        instance holds the name and its record is still live.
        """
        entry = self._entries.get(record.name)
        if entry is not None and entry.expires_at <= now:
            self._remove(entry, now, "expired")
            entry = None
        if entry is None:
            entry = Registration(record, now, now, now + self.ttl_s)
            self._entries[record.name] = entry
            self._gone.pop(record.name, None)
            self._log("added", "registered", record)
            return entry
        holder = entry.record
        if (
            holder.instance != record.instance
            and holder.owner is not None
            and holder.owner == record.owner
            and (holder.address == record.address or now - entry.last_seen > self.ttl_s / 3)
        ):
            # the same key, a new server start (the host restarted after a crash): its own
            # stale record must not lock it out for a TTL. Only a record at the same address,
            # or one that missed a heartbeat: two live servers sharing a key and a name must
            # not take the name from each other at every heartbeat (the second is refused)
            self._remove(entry, now, "replaced")
            return self.register(record, now)
        if holder.instance != record.instance:
            raise NameTakenError(
                f"device name {record.name!r} is already registered by the server at "
                f"{holder.address} on host {holder.host or '(unnamed)'} (instance "
                f"{instance_tag(holder.instance)}, last heartbeat {now - entry.last_seen:.1f} s "
                "ago); stop "
                "that server or give this device another name (if that server is gone, its "
                f"registration expires in {entry.expires_at - now:.1f} s)",
                holder={
                    "address": holder.address,
                    "host": holder.host,
                    "instance": instance_tag(holder.instance),
                },
            )
        entry.last_seen = now
        entry.expires_at = now + self.ttl_s
        if record != holder:
            entry.record = record
            self._log("updated", "changed", record)
        return entry

    def heartbeat(self, name: str, instance: str, now: float, owner: str | None = None) -> bool:
        """Renew a registration; False if this instance holds no live record of `name`.

        False tells the server to register again (discovery restarted, or the record
        expired); a name held by another instance also answers False, and the register that
        follows is refused with NameTakenError.
        """
        entry = self._entries.get(name)
        if (
            entry is None
            or entry.record.instance != instance
            or entry.record.owner != owner
            or entry.expires_at <= now
        ):
            return False
        entry.last_seen = now
        entry.expires_at = now + self.ttl_s
        return True

    def deregister(
        self, name: str, instance: str, now: float, owner: str | None = None
    ) -> DeviceRecord | None:
        """Remove `name` if `instance` (registered by `owner`) holds it; the removed record, or
        None."""
        entry = self._entries.get(name)
        if entry is None or entry.record.instance != instance or entry.record.owner != owner:
            return None
        self._remove(entry, now, "deregistered")
        return entry.record

    def expire(self, now: float) -> list[DeviceRecord]:
        """Remove and return every record whose TTL has run out."""
        dead = [e for e in self._entries.values() if e.expires_at <= now]
        for entry in dead:
            self._remove(entry, now, "expired")
        return [e.record for e in dead]

    def drain_changes(self) -> list[Change]:
        """The changes since the last drain, oldest first (the owner publishes them)."""
        changes = list(self._changes)
        self._changes.clear()
        return changes

    def _remove(self, entry: Registration, now: float, reason: str) -> None:
        del self._entries[entry.record.name]
        self._gone[entry.record.name] = (entry.record, now, reason)
        self._gone.move_to_end(entry.record.name)
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)
        self._log("removed", reason, entry.record)

    def _log(self, event: str, reason: str, record: DeviceRecord) -> None:
        self._seq += 1
        self._changes.append(Change(self._seq, event, reason, record))

    # ---- queries --------------------------------------------------------------------------
    def get(self, name: str, now: float) -> Registration | None:
        """The live registration of `name`, or None."""
        entry = self._entries.get(name)
        return entry if entry is not None and entry.expires_at > now else None

    def lookup(self, name: str, now: float) -> DeviceRecord:
        """The live record of `name`; UnknownDeviceError says why not and suggests names."""
        entry = self.get(name, now)
        if entry is not None:
            return entry.record
        live = sorted(n for n, e in self._entries.items() if e.expires_at > now)
        close = difflib.get_close_matches(name, live, n=3, cutoff=0.6)
        message = f"no device named {name!r} is registered"
        gone = self._gone.get(name)
        current = self._entries.get(name)
        if current is not None:  # past its TTL, not yet purged
            gone = (current.record, current.expires_at, "expired")
        if gone is not None:
            record, when, reason = gone
            why = "its server stopped heartbeating" if reason == "expired" else "it deregistered"
            message += f": {record.describe()} was removed {now - when:.1f} s ago ({why})"
        if close:
            message += f"; did you mean {', '.join(map(repr, close))}?"
        elif gone is None:
            message += (
                f" ({len(live)} device(s) registered); check the name, and that its server "
                "runs (labmesh serve) and uses this discovery service"
            )
        raise UnknownDeviceError(message, name=name, close=close)

    def query(
        self,
        now: float,
        *,
        name: str | None = None,
        kind: str | None = None,
        host: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[Registration]:
        """Live registrations matching every filter given, sorted by name.

        `name` is a shell-style pattern (`pm100-*`); `labels` must all be equal.
        """
        out = []
        for entry in self._entries.values():
            record = entry.record
            if entry.expires_at <= now:
                continue
            if name is not None and not fnmatch.fnmatchcase(record.name, name):
                continue
            if kind is not None and record.kind != kind:
                continue
            if host is not None and record.host != host:
                continue
            if labels and any(record.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(entry)
        out.sort(key=lambda e: e.record.name)
        return out

    def size(self) -> int:
        """How many records are held (live ones, plus expired ones until `expire` runs)."""
        return len(self._entries)

    def count(self, now: float) -> int:
        """How many records are live."""
        return sum(1 for e in self._entries.values() if e.expires_at > now)
