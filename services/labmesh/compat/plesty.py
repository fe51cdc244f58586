"""PLESTY's session rules, as the server core applies them. Pure.

A PLESTY client connects without a lease and never sends the session token labmesh returns: it
is known only by its ZeroMQ routing id. So its grant is bound to the connection that made it:
only that connection speaks for the grant (another peer claiming the same id gets nothing), and
the grant ends when that connection closes, or when the same id connects again from a new
connection (libzmq never reads two live connections with one id, so the old one is gone).
A client that later sends the token is not a PLESTY client after all (a labmesh client without a
lease): from then on the token holds the grant, not the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Binding:
    session: str
    conn: Any


class PlestySessions:
    """The grants of PLESTY clients, by routing id and by connection."""

    def __init__(self) -> None:
        self._by_identity: dict[bytes, _Binding] = {}
        self._identity_of: dict[str, bytes] = {}
        self._by_conn: dict[Any, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._by_identity)

    def index_sizes(self) -> tuple[int, int, int]:
        """Entries by identity, by session and by connection (all 0 once every grant ended)."""
        return len(self._by_identity), len(self._identity_of), len(self._by_conn)

    def bind(self, identity: bytes, conn: Any, session: str) -> str | None:
        """Bind a new grant to the connection that asked for it. Returns the session this
        identity held from an earlier connection, which the caller must end (or None)."""
        old = self._by_identity.get(identity)
        replaced = old.session if old is not None and old.session != session else None
        self.forget(session)
        if replaced is not None:
            self.forget(replaced)
        self._by_identity[identity] = _Binding(session, conn)
        self._identity_of[session] = identity
        self._by_conn.setdefault(conn, set()).add(identity)
        return replaced

    def session_of(self, identity: bytes, conn: Callable[[], Any]) -> str | None:
        """The grant `identity` speaks for, if it speaks from the connection that made it.
        `conn()` gives the request's connection (asked only when there is a grant)."""
        binding = self._by_identity.get(identity)
        if binding is not None and binding.conn == conn():
            return binding.session
        return None

    def token_sent(self, session: str) -> None:
        """A request carried `session` as a token: the token holds the grant from now on."""
        if self._identity_of and session in self._identity_of:
            self.forget(session)

    def connection_closed(self, conn: Any) -> list[str]:
        """The sessions that end because `conn` closed."""
        ended = []
        for identity in self._by_conn.pop(conn, ()):
            binding = self._by_identity.get(identity)
            if binding is not None and binding.conn == conn:
                ended.append(binding.session)
        return ended

    def forget(self, session: str) -> None:
        """`session` ended (released, expired, or replaced)."""
        identity = self._identity_of.pop(session, None)
        if identity is None:
            return
        binding = self._by_identity.pop(identity)
        ids = self._by_conn.get(binding.conn)
        if ids is not None:
            ids.discard(identity)
            if not ids:
                del self._by_conn[binding.conn]
