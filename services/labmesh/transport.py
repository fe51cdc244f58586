"""Where every labmesh ZeroMQ socket is made, one function per role.

Keeping socket creation here means security (CurveZMQ keys, read-only vs control roles) and
tuning are applied in one place, without touching the protocol or the server logic.
"""

from __future__ import annotations

import zmq

from labmesh.protocol.native import ZMQ_CUT_FACTOR

#: How quickly a DEALER reconnects after its server went away (ms), and the cap of its backoff.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000


#: Messages ZeroMQ reads ahead from one peer before the server takes them (per connection).
ROUTER_RCVHWM = 1000


def router_socket(
    ctx: zmq.Context, address: str, max_message_bytes: int, max_replies_queued_per_peer: int = 512
) -> zmq.Socket:
    """The device server's ROUTER, bound to `address` (e.g. `tcp://127.0.0.1:5555`).

    A reply that cannot be queued raises instead of vanishing (ROUTER_MANDATORY): EAGAIN when
    the peer already has `max_replies_queued_per_peer` replies waiting (it does not read),
    EHOSTUNREACH when it has gone; the server counts both. No ROUTER_HANDOVER: a second
    connection claiming the routing id of a live one is ignored by libzmq, so nobody can take over
    another client's route and read its replies (labmesh clients give each new socket a new id).
    ZeroMQ's own size cut (MAXMSGSIZE) sits
    at ZMQ_CUT_FACTOR times `max_message_bytes`, so any request up to there gets a readable
    ProtocolError reply; beyond it ZeroMQ drops the connection unread.
    """
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_CUT_FACTOR * max_message_bytes + 1024)
    sock.setsockopt(zmq.SNDHWM, max_replies_queued_per_peer)
    sock.setsockopt(zmq.RCVHWM, ROUTER_RCVHWM)
    return _bind(sock, address, "listen")


#: Connection events the monitor of a server socket can hold before libzmq drops them: a burst
#: of 20,000 connects and closes between two loop iterations still fits (about 80 bytes each).
MONITOR_RCVHWM = 100_000


def connection_monitor(sock: zmq.Socket) -> zmq.Socket:
    """A PAIR socket receiving `sock`'s ACCEPTED and DISCONNECTED events (each carries the
    connection's file descriptor), deep enough for connection storms (MONITOR_RCVHWM)."""
    address = f"inproc://labmesh-monitor-{id(sock):x}"
    sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    pair = sock.context.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.setsockopt(zmq.RCVHWM, MONITOR_RCVHWM)
    pair.connect(address)
    return pair


def pub_socket(ctx: zmq.Context, address: str, hwm: int = 10000) -> zmq.Socket:
    """A PUB socket bound to `address` (discovery's change feed, a device's updates); a
    subscriber that does not read loses what passes `hwm` messages queued for it."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    return _bind(sock, address, "publish")


def _bind(sock: zmq.Socket, address: str, what: str) -> zmq.Socket:
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close()
        raise OSError(
            f"cannot {what} on {address}: {exc} (is another server on that port? "
            "choose another port or stop the other server)"
        ) from None
    return sock


def dealer_socket(ctx: zmq.Context, address: str, identity: bytes) -> zmq.Socket:
    """A client's DEALER connected to `address`, with `identity` as its routing id."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.connect(address)
    return sock


def bound_address(sock: zmq.Socket) -> str:
    """The endpoint a socket really bound (resolves port 0 and wildcards)."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
