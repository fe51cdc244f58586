"""Resource locks as leases: a pure table (no sockets, no threads; the clock is passed in).

A device registers its lockable resources as a flat list or a nested tree; each leaf is a
`/`-separated path (`Dev1/port0/line0`). A session (the token connect returns) holds a grant: a
set of leaves, all-or-nothing. A grant with a lease runs out `lease_s` after the session was
last seen; a grant without one (a PLESTY client) runs out after the table's idle limit, so
nothing is held forever by a client that crashed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from labmesh.protocol.errors import (
    LeaseExpiredError,
    ResourceAllocationError,
    ResourceLockedError,
)

DEFAULT_IDLE_LIMIT_S = 600.0
#: Unknown or busy names quoted in one refusal; the rest are counted, never listed.
QUOTED_NAMES = 5


def normalize_path(path: Any) -> str:
    """`" /Dev1//port0/ "` -> `Dev1/port0`."""
    return "/".join(part.strip() for part in str(path).split("/") if part.strip())


def flatten(spec: Any, prefix: str = "", limit: int | None = None) -> list[str]:
    """All paths named by a resource spec: a string, a collection, or a nested dict tree.

    With `limit`, a spec naming more paths than that raises ResourceAllocationError as soon as
    the count is passed (a peer's spec is never walked further than the limit).
    """
    out: list[str] = []
    _flatten(spec, prefix, out, limit)
    return out


def _flatten(spec: Any, prefix: str, out: list[str], limit: int | None) -> None:
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            _flatten(value, _join(prefix, key), out, limit)
        return
    if spec is None or isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        if spec is None:
            path = prefix
        else:
            path = _join(prefix, spec.decode() if isinstance(spec, bytes) else spec)
        if path:
            if limit is not None and len(out) >= limit:
                raise ResourceAllocationError(
                    f"the request names more than {limit} resource paths; name a common "
                    "prefix instead (a prefix locks every resource below it)",
                    too_many=True,
                )
            out.append(path)
        return
    for item in spec:
        _flatten(item, prefix, out, limit)


def quote_names(names: list[str]) -> str:
    """The first few of `names` and how many more (a refusal never echoes a whole list)."""
    shown = repr(names[:QUOTED_NAMES])
    more = len(names) - QUOTED_NAMES
    return f"{shown} (+{more} more)" if more > 0 else shown


def _join(prefix: str, name: Any) -> str:
    name = normalize_path(name)
    return f"{prefix}/{name}" if prefix and name else prefix or name


@dataclass
class Grant:
    """What one session holds.

    Attributes:
        session: the secret token the holder proves itself with.
        client_id: the holder's DEALER identity (shown to others, never trusted).
        leaves: the resources held.
        metadata: what the holder sent at connect (e.g. experiment name), shown to others.
        since: when the grant was made.
        lease_s: the lease length, or None for a PLESTY-style grant held until disconnect.
        last_seen: the last time the session renewed (a heartbeat or any request).
    """

    session: str
    client_id: str
    leaves: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    since: float = 0.0
    lease_s: float | None = None
    last_seen: float = 0.0

    def expires_at(self, idle_limit_s: float) -> float:
        return self.last_seen + (self.lease_s if self.lease_s is not None else idle_limit_s)

    def describe_holder(self) -> str:
        label = self.metadata.get("name") or self.metadata.get("experiment")
        return f"{self.client_id} ({label})" if label else self.client_id


@dataclass
class Waiter:
    """A connect waiting for busy resources, served first come, first served.

    `token` is the caller's own data (the server keeps the reply route there).
    """

    session: str
    client_id: str
    leaves: tuple[str, ...]
    deadline: float
    metadata: dict[str, Any] = field(default_factory=dict)
    lease_s: float | None = None
    token: Any = None


class LeaseTable:
    """Who holds which resource of one device, with leases.

    Parameters:
        resources: the device's lockable resources (flat list or nested tree).
        idle_limit_s: how long a grant without a lease survives without any request.
    """

    def __init__(self, resources: Any = None, *, idle_limit_s: float = DEFAULT_IDLE_LIMIT_S):
        self.idle_limit_s = idle_limit_s
        self._leaves: set[str] = set()
        self._grants: dict[str, Grant] = {}
        self._holder: dict[str, str] = {}
        # insertion-ordered: first come, first served; enqueue and release are O(1)
        self._waiters: dict[str, Waiter] = {}
        self.register(resources)

    def register(self, resources: Any) -> None:
        """Add lockable resources (leaves of a tree, or paths of a flat list)."""
        self._leaves.update(flatten(resources))

    @property
    def leaves(self) -> frozenset[str]:
        return frozenset(self._leaves)

    def expand(self, spec: Any, limit: int | None = None) -> tuple[str, ...]:
        """The registered leaves a request names (a prefix means every leaf below it).

        `limit` bounds the paths the spec may name (see `flatten`). Raises
        ResourceAllocationError naming the first few unknown paths and how many there are.
        """
        out: dict[str, None] = {}
        unknown: dict[str, None] = {}
        seen: set[str] = set()
        for path in flatten(spec, limit=limit):
            if path in seen:
                continue
            seen.add(path)
            if path in self._leaves:
                out[path] = None
                continue
            below = f"{path}/"
            matches = sorted(leaf for leaf in self._leaves if leaf.startswith(below))
            if not matches:
                unknown[path] = None
            out.update(dict.fromkeys(matches))
        if unknown:
            names = list(unknown)
            known = sorted(self._leaves)
            raise ResourceAllocationError(
                f"unknown resource(s) {quote_names(names)}; this device's lockable resources "
                f"are {quote_names(known) if len(known) > 4 * QUOTED_NAMES else known}"
                if known
                else f"unknown resource(s) {quote_names(names)}; this device declares no "
                "lockable resources",
                unknown=names[:QUOTED_NAMES],
                unknown_count=len(names),
            )
        return tuple(out)

    def grant(self, session: str) -> Grant | None:
        return self._grants.get(session)

    def holder(self, leaf: str) -> Grant | None:
        session = self._holder.get(leaf)
        return self._grants.get(session) if session is not None else None

    def remaining(self, grant: Grant, now: float) -> float:
        return max(0.0, grant.expires_at(self.idle_limit_s) - now)

    def _reserved(self, session: str) -> dict[str, Waiter]:
        """Leaves wanted by waiters (other than `session`), each by its first waiter."""
        reserved: dict[str, Waiter] = {}
        for waiter in self._waiters.values():
            if waiter.session != session:
                for leaf in waiter.leaves:
                    reserved.setdefault(leaf, waiter)
        return reserved

    def conflicts(self, session: str | None, leaves: Iterable[str]) -> list[Grant]:
        """Grants of other sessions that hold any of `leaves` (each grant once)."""
        found: dict[str, Grant] = {}
        for leaf in leaves:
            holder = self._holder.get(leaf)
            if holder is not None and holder != session:
                found[holder] = self._grants[holder]
        return list(found.values())

    def _busy_message(self, leaves: Iterable[str], grants: list[Grant], now: float) -> str:
        parts = [
            f"{sorted(set(g.leaves) & set(leaves))} held by {g.describe_holder()} for "
            f"{now - g.since:.1f} s (lease ends in {self.remaining(g, now):.1f} s)"
            for g in grants
        ]
        return "; ".join(parts)

    def acquire(
        self,
        session: str,
        client_id: str,
        spec: Any,
        now: float,
        *,
        lease_s: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Grant:
        """Grant every leaf `spec` names to `session`, or nothing.

        A session that already holds a grant has it replaced (as PLESTY's re-connect does).
        Raises ResourceAllocationError (unknown or busy resources, naming the holder).
        """
        leaves = self.expand(spec)
        busy = self.conflicts(session, leaves)
        if busy:
            raise ResourceAllocationError(
                "requested resources are not available: " + self._busy_message(leaves, busy, now),
                holders=[self.holder_info(g, now) for g in busy],
            )
        reserved = self._reserved(session)
        queued = sorted({leaf for leaf in leaves if leaf in reserved})
        if queued:
            first = reserved[queued[0]]
            raise ResourceAllocationError(
                f"requested resources {queued} are promised to {first.client_id}, which has "
                "been waiting for them longer; connect with wait= to queue behind it",
                holders=[],
            )
        return self._grant(session, client_id, leaves, now, lease_s, metadata)

    def _grant(
        self,
        session: str,
        client_id: str,
        leaves: tuple[str, ...],
        now: float,
        lease_s: float | None,
        metadata: dict[str, Any] | None,
    ) -> Grant:
        self._drop_grant(session)
        grant = Grant(session, client_id, leaves, dict(metadata or {}), now, lease_s, now)
        self._grants[session] = grant
        for leaf in leaves:
            self._holder[leaf] = session
        return grant

    def enqueue(self, waiter: Waiter) -> Waiter | None:
        """Queue a connect that will wait for its leaves (see `serve_waiters`); a session that
        already waits goes to the back with its new request, and its old wait is returned (it
        is owed a refusal). O(1)."""
        replaced = self._waiters.pop(waiter.session, None)
        self._waiters[waiter.session] = waiter
        return replaced

    def drop_waiter(self, session: str) -> Waiter | None:
        """Remove a session's wait (its peer is gone); what it waited for stays as it is."""
        return self._waiters.pop(session, None)

    def serve_waiters(self, now: float) -> tuple[list[tuple[Waiter, Grant]], list[Waiter]]:
        """Grant every waiter that can be served now, in arrival order, and drop the expired.

        A waiter is granted when its leaves are free and no earlier waiter wants any of them,
        so nobody is overtaken by a later arrival. Returns (granted, timed out).
        """
        granted: list[tuple[Waiter, Grant]] = []
        expired: list[Waiter] = []
        still: dict[str, Waiter] = {}
        wanted: set[str] = set()
        for waiter in self._waiters.values():
            if waiter.deadline <= now:
                expired.append(waiter)
            elif wanted.isdisjoint(waiter.leaves) and not self.conflicts(
                waiter.session, waiter.leaves
            ):
                grant = self._grant(
                    waiter.session,
                    waiter.client_id,
                    waiter.leaves,
                    now,
                    waiter.lease_s,
                    waiter.metadata,
                )
                granted.append((waiter, grant))
            else:
                wanted.update(waiter.leaves)
                still[waiter.session] = waiter
        self._waiters = still
        return granted, expired

    @property
    def waiters(self) -> list[Waiter]:
        return list(self._waiters.values())

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def busy_message(self, leaves: Iterable[str], now: float) -> str:
        """Who holds any of `leaves` and for how long (for refusals)."""
        leaves = tuple(leaves)
        return self._busy_message(leaves, self.conflicts(None, leaves), now)

    def release(self, session: str) -> Grant | None:
        """Drop a session (and its wait, if any) and free what it held."""
        self._waiters.pop(session, None)
        return self._drop_grant(session)

    def _drop_grant(self, session: str) -> Grant | None:
        grant = self._grants.pop(session, None)
        if grant is not None:
            for leaf in grant.leaves:
                if self._holder.get(leaf) == session:
                    del self._holder[leaf]
        return grant

    def renew(self, session: str, now: float) -> Grant:
        """Extend a session's lease from now; LeaseExpiredError if the session is unknown."""
        grant = self._grants.get(session)
        if grant is None:
            raise LeaseExpiredError(
                "this session is unknown to the server (its lease ran out or the server "
                "restarted); its locks are gone: connect again to re-acquire them"
            )
        grant.last_seen = now
        return grant

    def expire(self, now: float, alive: Iterable[str] = ()) -> list[Grant]:
        """Remove and return every grant whose lease (or idle limit) has run out.

        Sessions in `alive` (e.g. with a call in flight) are not expired: their holder is
        demonstrably there, waiting for a reply.
        """
        alive = set(alive)
        dead = [
            g
            for g in self._grants.values()
            if g.expires_at(self.idle_limit_s) <= now and g.session not in alive
        ]
        for grant in dead:
            self._drop_grant(grant.session)
        return dead

    def next_event(self) -> float | None:
        """When the earliest grant or wait runs out (None when there is nothing to watch)."""
        times = [g.expires_at(self.idle_limit_s) for g in self._grants.values()]
        times.extend(w.deadline for w in self._waiters.values())
        return min(times, default=None)

    def check(self, session: str | None, leaves: Iterable[str], now: float) -> None:
        """Raise ResourceLockedError if another session holds any of `leaves`."""
        leaves = tuple(leaves)
        busy = self.conflicts(session, leaves)
        if busy:
            raise ResourceLockedError(
                "resource locked: "
                + self._busy_message(leaves, busy, now)
                + "; wait for it to be released or ask its holder",
                holders=[self.holder_info(g, now) for g in busy],
            )

    def holder_info(self, grant: Grant, now: float) -> dict[str, Any]:
        return {
            "client_id": grant.client_id,
            "metadata": grant.metadata,
            "resources": list(grant.leaves),
            "since_s": round(now - grant.since, 3),
            "lease_s": grant.lease_s,
            "remaining_s": round(self.remaining(grant, now), 3),
        }

    def holders(self, now: float) -> list[dict[str, Any]]:
        """One row per held resource: resource, holder, age and time left."""
        rows = []
        for leaf, session in sorted(self._holder.items()):
            grant = self._grants[session]
            rows.append({"resource": leaf, **self.holder_info(grant, now)})
        return rows

    @property
    def session_count(self) -> int:
        return len(self._grants)

    def oldest_idle_session(self) -> Grant | None:
        """The earliest-made grant that holds nothing and waits for nothing (ending it loses no
        lock and no wait), if any."""
        for grant in self._grants.values():
            if not grant.leaves and grant.session not in self._waiters:
                return grant
        return None

    def is_waiting(self, session: str) -> bool:
        return session in self._waiters

    def sessions(self) -> list[Grant]:
        return list(self._grants.values())
