"""The request/reply exchange of every labmesh requester, without I/O.

The sync client, the asyncio client and the discovery resolver each drive one `Exchange` per
request over their own socket; every decision lives here, once:

- every request gets a fresh id (`prefix:counter`), and every attempt a new one;
- a reply that echoes another id is a late answer to an earlier request: it is dropped and
  logged (at most a few lines a minute); a reply with no id is accepted only from a peer that
  has never echoed one (a PLESTY server), never from one that has;
- a reply that does not decode is dropped and logged the same way;
- when no reply comes in time the socket is never used again: the driver replaces it (lazy
  pirate) and sends again with a new id if attempts remain, else raises the TimeoutError the
  exchange built;
- an id-less peer (PLESTY) answers every request once, but its answers carry nothing to tell
  them apart. When it still owes answers on the route in use (the driver kept its socket: a
  PLESTY lock holder), a new request first waits for that many id-less replies (up to its own
  wait) and drops them, and only then is sent, so nothing of its own is in flight meanwhile
  and the order they come in does not matter. If they do not come within that wait, nothing
  is sent and the TimeoutError says why: an answer that comes later must not be taken for
  this request's (a slow move), and a server that lost them (restarted) lost the client's
  locks too, so the caller reconnects. A `disconnect` neither waits for nor drops them (it
  must release the locks even while a call runs; its answer is not used);
- a `LeaseExpiredError` reply means the server refused before running anything, so when the
  caller allows it the driver connects again and the request is sent once more.

The driver loop, the same for every transport::

    action = exchange.start(now)
    while True:
        if isinstance(action, Send):      # (replace the socket first if action.fresh_socket)
            send(action.body); action = Wait(action.wait_ms)
        elif isinstance(action, Wait):
            body = receive(action.ms)     # None when nothing came in time
            action = exchange.after_wait(body, now)
        elif isinstance(action, Reconnect):
            session = handshake(); action = exchange.reconnected(session, now)
        elif isinstance(action, GiveUp):  # the socket timed out: replace or drop it
            raise action.error
        else:                             # Done
            return action.reply
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from labmesh.logbudget import LogBudget
from labmesh.protocol import native
from labmesh.protocol.errors import LabmeshError, LeaseExpiredError, ProtocolError, remote_error

#: Request types that are safe to send again after a timeout (nothing changes on the device).
RETRYABLE = frozenset({"describe", "query", "ping", "help", "locks", "task_status", "task_cancel"})
#: Requests that are never re-sent after a LeaseExpiredError (they are the session's own).
_SESSION_REQUESTS = frozenset({"connect", "heartbeat", "disconnect"})


@dataclass(frozen=True, slots=True)
class Send:
    """Send `body` (request id `rid`), then wait up to `wait_ms` for its reply.

    `fresh_socket`: the previous attempt timed out; replace the socket before sending.
    """

    body: bytes
    rid: str
    wait_ms: int
    fresh_socket: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """Receive for up to `ms` more milliseconds (0: the time is up, call `timed_out`)."""

    ms: int


@dataclass(frozen=True, slots=True)
class Done:
    """The reply to this request (status ok or error; `result()` turns it into a value)."""

    reply: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The lease expired before the request ran: connect again, then call `reconnected`."""

    error: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No reply after every attempt. The socket timed out: replace (or drop) it, then raise."""

    error: TimeoutError


Action = Send | Wait | Done | Reconnect | GiveUp


def attempts_for(payload: dict[str, Any], retries: int, idempotent: frozenset[str]) -> int:
    """How many times a request may be sent: 1 + `retries` for a request that changes nothing
    (RETRYABLE) or a call the device declared idempotent (`@operation(idempotent=True)`);
    once for everything else, since a write or call that timed out may have run."""
    rtype = payload["type"]
    safe = rtype in RETRYABLE or (rtype == "call" and payload.get("func") in idempotent)
    return 1 + retries if safe else 1


class Channel:
    """The request side of one peer: request ids, what the peer is known to echo, and the
    log lines its replies may cause.

    Parameters:
        peer: the peer's address, for messages (`address` may be changed after re-resolving).
        log: where dropped replies are reported.
        prefix: the request id prefix (random by default, so two requesters sharing a routing
            id never take each other's replies).
    """

    def __init__(self, peer: str, log: logging.Logger, prefix: str | None = None) -> None:
        self.peer = peer
        self.log = log
        self.prefix = prefix or secrets.token_hex(3)
        self._counter = 0
        #: whether the peer has ever echoed a request id (then it must always)
        self.peer_echoes_ids = False
        #: replies dropped because they answered an earlier request, or did not decode
        self.late_replies = 0
        self.bad_replies = 0
        #: answers an id-less peer owes to finished requests on the route in use (new_route)
        self.owed = 0
        #: counts the driver's routes (sockets with a routing id of their own)
        self.route = 0
        self._budget = LogBudget()

    def new_route(self) -> None:
        """The driver's next socket has a routing id of its own: answers still owed go to the
        closed socket, none can arrive on the new one."""
        self.owed = 0
        self.route += 1

    def new_id(self) -> str:
        self._counter += 1
        return f"{self.prefix}:{self._counter}"

    def exchange(
        self,
        payload: dict[str, Any],
        *,
        wait_ms: int,
        attempts: int = 1,
        session: str | None = None,
        may_reconnect: bool = False,
    ) -> Exchange:
        """A new exchange for `payload` (stamped with an id, and `session` if given)."""
        return Exchange(self, payload, wait_ms, attempts, session, may_reconnect)

    def _report(self, cause: str, now: float, message: str, *args: Any) -> None:
        for summary in self._budget.summaries(now):
            self.log.info("%s: %s", self.peer, summary)
        if self._budget.allow(cause, now):
            self.log.info("%s: " + message, self.peer, *args)


class Exchange:
    """One request's life: its attempts, the reply it accepts, and when it gives up."""

    def __init__(
        self,
        channel: Channel,
        payload: dict[str, Any],
        wait_ms: int,
        attempts: int,
        session: str | None,
        may_reconnect: bool,
    ) -> None:
        if attempts < 1 or wait_ms < 1:
            raise ValueError(
                f"an exchange needs attempts >= 1 and wait_ms >= 1 ({attempts}, {wait_ms})"
            )
        self.channel = channel
        self.payload = dict(payload)
        self.wait_ms = wait_ms
        self.attempts = attempts
        self.sent = 0
        self.rid = ""
        self._deadline = 0.0
        self._draining = False
        #: a disconnect: sent at once, its answer taken whatever is owed (its result is unused)
        self._ignores_owed = payload["type"] == "disconnect"
        #: this request's attempts not answered yet on the route in use, and that route
        self._unanswered = 0
        self._route = channel.route
        self._may_reconnect = may_reconnect and payload["type"] not in _SESSION_REQUESTS
        if session is not None:
            self.payload.setdefault("session", session)

    def start(self, now: float) -> Send | Wait:
        """The first attempt; or, when an id-less peer still owes answers on this route, a
        wait for them first (they are dropped as they come, then the request is sent)."""
        if self.channel.owed and not self.channel.peer_echoes_ids and not self._ignores_owed:
            self._draining = True
            self._deadline = now + self.wait_ms / 1000
            return self._wait(now)
        return self._attempt(now, fresh_socket=False)

    def received(self, body: bytes, now: float) -> Done | Wait | Reconnect:
        """A message arrived on the socket while waiting for this request's reply."""
        channel = self.channel
        try:
            reply = native.decode_reply(body)
        except ProtocolError as exc:
            channel.bad_replies += 1
            channel._report("bad reply", now, "%s; ignored", exc)
            return self._wait(now)
        rid = reply.get("id")
        self._follow_route()
        if rid is None and channel.owed and not channel.peer_echoes_ids and not self._ignores_owed:
            # an answer an id-less peer owed (nothing of ours is in flight while draining)
            channel.owed -= 1
            channel.late_replies += 1
            channel._report(
                "late reply",
                now,
                "dropped the late answer to an earlier request (the peer echoes no request "
                "id; %d more owed)",
                channel.owed,
            )
            if self._draining and not channel.owed:
                self._draining = False
                return self._attempt(now, fresh_socket=False)
            return self._wait(now)
        if rid == self.rid and not self._draining:
            channel.peer_echoes_ids = True
        elif rid is not None or channel.peer_echoes_ids:
            channel.late_replies += 1
            channel._report(
                "late reply",
                now,
                "dropped a late reply (id %r, waiting for %r)",
                rid,
                self.rid,
            )
            return self._wait(now)
        if rid is None:  # an id-less peer: one of this request's attempts is answered (all
            # carry the same payload); the others' answers are owed, in order
            channel.owed += max(0, self._unanswered - 1)
        self._unanswered = 0
        if self._may_reconnect and reply.get("type") == LeaseExpiredError.wire_type:
            self._may_reconnect = False  # once: the reply after reconnecting is final
            return Reconnect(str(reply.get("error")))
        return Done(reply)

    def after_wait(self, body: bytes | None, now: float) -> Action:
        """What follows a wait: `body` is what arrived, None if nothing came in time."""
        return self.timed_out(now) if body is None else self.received(body, now)

    def timed_out(self, now: float) -> Send | GiveUp:
        """No reply came within the wait: send again on a fresh socket, or give up."""
        channel = self.channel
        self._follow_route()
        if self._draining:  # nothing was sent: the answers owed did not come in time
            return GiveUp(
                TimeoutError(
                    f"{channel.peer} still owes {channel.owed} answer(s) to earlier requests "
                    f"(it echoes no request id, so labmesh waits for them before asking again) "
                    f"and none came within {self.wait_ms} ms; nothing was sent. "
                    "If an earlier call is still running, ask again later; if the server "
                    "restarted (its locks are gone too), close this client and connect again"
                )
            )
        if self.sent < self.attempts:
            self.channel.log.info(
                "%s: no reply to %s (attempt %d/%d); resetting socket",
                self.channel.peer,
                self.payload["type"],
                self.sent,
                self.attempts,
            )
            return self._attempt(now, fresh_socket=True)
        if not channel.peer_echoes_ids:  # an id-less peer may still answer them, later
            channel.owed += self._unanswered
        self._unanswered = 0
        return GiveUp(self.timeout_error())

    def abandon(self) -> bool:
        """The caller gave up waiting (cancelled, Ctrl+C): the attempts an id-less peer has not
        answered are owed. True if the driver should replace its socket (so that, unless it
        keeps its routing id, they go to the closed one)."""
        self._follow_route()
        owes = not self.channel.peer_echoes_ids and self._unanswered > 0
        if owes:
            self.channel.owed += self._unanswered
        self._unanswered = 0
        return owes

    def _follow_route(self) -> None:
        """The driver moved to a new route since this request's latest attempt was made (it
        replaced the socket with a fresh routing id before sending it): the attempts before
        that went to the closed socket, only the latest can be answered here."""
        if self._route != self.channel.route:
            self._route = self.channel.route
            self._unanswered = min(self._unanswered, 1)

    def reconnected(self, session: str | None, now: float) -> Send:
        """After a new handshake: the request once more, under the new session."""
        self.channel.log.warning("%s: lease expired; connected again", self.channel.peer)
        self.payload.pop("session", None)
        if session is not None:
            self.payload["session"] = session
        self.attempts = self.sent + 1
        return self._attempt(now, fresh_socket=False)

    def timeout_error(self) -> TimeoutError:
        payload = self.payload
        what = payload["type"]
        if what in ("call", "query", "write"):
            what += f" {payload.get('func') or payload.get('param')}"
        tries = f" (sent {self.sent} times)" if self.sent > 1 else ""
        return TimeoutError(
            f"no reply from {self.channel.peer} to {what} within {self.wait_ms} ms{tries}; is "
            "the server running and reachable? For long operations pass timeout= (seconds)"
        )

    def _attempt(self, now: float, fresh_socket: bool) -> Send:
        self._follow_route()
        self.rid = self.channel.new_id()
        self.payload["id"] = self.rid
        body = native.encode(self.payload)  # (what JSON cannot carry raises here, unsent)
        self.sent += 1
        self._unanswered += 1
        self._deadline = now + self.wait_ms / 1000
        return Send(body, self.rid, self.wait_ms, fresh_socket)

    def _wait(self, now: float) -> Wait:
        return Wait(max(0, math.ceil((self._deadline - now) * 1000 - 1e-6)))


def result(reply: dict[str, Any], local: Mapping[str, type[LabmeshError]] | None = None) -> Any:
    """The value of an ok reply, or the error of an error reply raised.

    The error is the RemoteError subclass named by the reply's wire type, or, for a type in
    `local` (wire type -> LabmeshError class), that class with the reply's extra fields as its
    details (the resolver raises the registry's own NameTakenError this way).
    """
    if reply.get("status") == "ok":
        return reply.get("result")
    wire_type = str(reply.get("type", "RemoteError"))
    message = str(reply.get("error", "the request was refused"))
    cls = (local or {}).get(wire_type)
    if cls is None:
        raise remote_error(wire_type, message, reply)
    details = {k: v for k, v in reply.items() if k not in ("status", "error", "type", "id")}
    raise cls(message, **details)
