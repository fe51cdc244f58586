"""Who may do what on a device: roles, and the role each request needs (pure, no I/O).

A device server that runs with CurveZMQ knows each peer by its public key; the host file names
the keys and gives each name a role on each device:

    observer   describe, help, ping, query, locks, subscribe, task status, connect without
               resources (and its heartbeats and disconnect)
    operator   an observer's rights plus write, call, task cancel and connect with resources
    admin      an operator's rights plus force-releasing another session's locks and, where
               the host enables it, LAPLACE STOP

A peer on the plaintext listener (PLESTY and LAPLACE clients cannot do CURVE) gets the role the
host file gives plaintext, `none` unless set. See docs/security.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from labmesh.protocol.errors import LabmeshError

#: Roles by rank: each has every right of the ones before it.
ROLES = ("none", "observer", "operator", "admin")
RANK = {role: rank for rank, role in enumerate(ROLES)}
NONE, OBSERVER, OPERATOR, ADMIN = range(4)

#: What a request of each type needs (connect with resources needs operator: see needed()).
NEEDS: dict[str, int] = {
    "describe": OBSERVER,
    "help": OBSERVER,
    "ping": OBSERVER,
    "query": OBSERVER,
    "locks": OBSERVER,
    "subscribe": OBSERVER,
    "unsubscribe": OBSERVER,
    "task_status": OBSERVER,
    "heartbeat": OBSERVER,
    "disconnect": OBSERVER,
    "connect": OBSERVER,
    "write": OPERATOR,
    "call": OPERATOR,
    "task_cancel": OPERATOR,
    "force_release": ADMIN,
}

#: The name a plaintext peer is known by in errors and the audit log.
PLAINTEXT = "plaintext"


class PermissionDeniedError(LabmeshError, PermissionError):
    """A request the peer's role does not allow; the message names the role it needs and the
    key it came with (clients raise it as PermissionError)."""

    wire_type = "PermissionError"


def role_rank(role: Any, where: str) -> int:
    """The rank of a role name; ValueError naming `where` and the known roles otherwise."""
    if isinstance(role, str) and role.lower() in RANK:
        return RANK[role.lower()]
    raise ValueError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: a key's name (or `plaintext`), its rank on this device, and the
    public key it proved (None on the plaintext listener)."""

    name: str
    rank: int
    key: str | None = None

    @property
    def role(self) -> str:
        return ROLES[self.rank]


@dataclass(slots=True)
class AccessPolicy:
    """The roles of one device.

    Parameters:
        roles: key name -> role; the name `*` gives every known key not listed a role.
        plaintext: the role of peers on the plaintext listener.
        name_of: public key (Z85 text) -> the key's name, or None for a key nobody named
            (the server's keyring, which may reload its files meanwhile).
    """

    roles: Mapping[str, str] = field(default_factory=dict)
    plaintext: str = "none"
    name_of: Callable[[str], str | None] = lambda key: None
    _ranks: dict[str, int] = field(init=False, repr=False)
    _plaintext: Principal = field(init=False, repr=False)
    _default: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ranks = {
            str(name): role_rank(role, f"role of key {name!r}") for name, role in self.roles.items()
        }
        self._default = self._ranks.pop("*", NONE)
        self._plaintext = Principal(PLAINTEXT, role_rank(self.plaintext, "plaintext role"))

    def principal(self, user_id: str | None) -> Principal:
        """Who a message came from: `user_id` is what the ZAP handler proved (a CURVE peer's
        public key, Z85, 40 characters); anything else is the plaintext listener."""
        if user_id is None or len(user_id) != 40:
            return self._plaintext
        name = self.name_of(user_id)
        if name is None:
            return Principal(f"unnamed key {user_id[:8]}...", NONE, user_id)
        return Principal(name, self._ranks.get(name, self._default), user_id)

    def may_connect(self, key: str) -> bool:
        """Whether a CURVE handshake with `key` is accepted: only keys the keyring names."""
        return self.name_of(key) is not None

    def may_subscribe(self, key: str) -> bool:
        """Whether a CURVE subscriber with `key` may connect to the update feed (observer)."""
        return self.principal(key).rank >= OBSERVER


def needed(request_type: str, fields: Mapping[str, Any]) -> int:
    """The rank a request needs; connect asks for operator only when it locks resources."""
    if request_type == "connect" and fields.get("resources"):
        return OPERATOR
    return NEEDS.get(request_type, OPERATOR)


def check(who: Principal, need: int, device: str, what: str) -> None:
    """Raise PermissionDeniedError unless `who` has rank `need`."""
    if who.rank >= need:
        return
    if who.key is None:
        how = (
            "this is the plaintext listener; connect with a CURVE key (LABMESH_KEY) the host knows"
        )
    elif who.rank == NONE and who.name.startswith("unnamed key"):
        how = "the host does not know this key; ask its admin to add your .key file"
    else:
        how = f"ask the admin of {device!r} to give {who.name!r} that role in the host file"
    raise PermissionDeniedError(
        f"{what} on {device!r} needs role {ROLES[need]}; {who.name!r} has role {who.role} ({how})",
        needed=ROLES[need],
        role=who.role,
        client=who.name,
    )
