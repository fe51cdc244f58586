"""Where every labmesh ZeroMQ socket is made, one function per role.

Keeping socket creation here means security (CurveZMQ keys, read-only vs control roles) and
tuning are applied in one place, without touching the protocol or the server logic.
"""

from __future__ import annotations

import contextlib
import struct

import zmq

from labmesh.protocol.native import ZMQ_CUT_FACTOR
from labmesh.security import ClientCurve, KeyPair, server_curve, server_plaintext

#: How quickly a DEALER reconnects after its server went away (ms), and the cap of its backoff.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000


#: Messages ZeroMQ reads ahead from one peer before the server takes them (per connection).
ROUTER_RCVHWM = 1000


def router_socket(
    ctx: zmq.Context,
    address: str,
    max_message_bytes: int,
    max_replies_queued_per_peer: int = 512,
    *,
    curve: KeyPair | None = None,
    domain: str = "labmesh",
    wake_address: str | None = None,
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

    With `curve` (the server's key pair) `address` is a CurveZMQ endpoint whose handshakes the
    context's ZAP handler checks in `domain` (labmesh.security.authenticate); a plaintext
    endpoint can be added to the same socket with bind_plaintext. `wake_address`: an inproc
    endpoint the server's own threads wake a blocking receive through.
    """
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_CUT_FACTOR * max_message_bytes + 1024)
    sock.setsockopt(zmq.SNDHWM, max_replies_queued_per_peer)
    sock.setsockopt(zmq.RCVHWM, ROUTER_RCVHWM)
    if wake_address is not None:
        # the server's own inproc endpoint, bound before any security option applies
        _bind(sock, wake_address, "listen (wake-ups)")
    if curve is not None:
        server_curve(sock, curve, domain)
    return _bind(sock, address, "listen")


def bind_plaintext(sock: zmq.Socket, address: str) -> str:
    """Add a plaintext endpoint to a CurveZMQ server socket (libzmq takes each endpoint's
    security options at bind time); its peers get the plaintext role. The bound endpoint."""
    server_plaintext(sock)
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise OSError(
            f"cannot listen (plaintext) on {address}: {exc} (is another server on that port? "
            "choose another port or stop the other server)"
        ) from None
    return bound_address(sock)


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


def pub_socket(
    ctx: zmq.Context,
    address: str,
    hwm: int = 10000,
    *,
    curve: KeyPair | None = None,
    domain: str = "labmesh-pub",
) -> zmq.Socket:
    """A PUB socket bound to `address` (discovery's change feed, a device's updates); a
    subscriber that does not read loses what passes `hwm` messages queued for it. `curve` and
    `curve` and `domain` as for router_socket."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    if curve is not None:
        server_curve(sock, curve, domain)
    return _bind(sock, address, "publish")


def _bind(sock: zmq.Socket, address: str, what: str) -> zmq.Socket:
    if "://" not in address:
        sock.close(linger=0)
        raise OSError(
            f"cannot {what} on {address!r}: an endpoint needs its transport, e.g. "
            f"tcp://{address} (or tcp://*:PORT for every interface)"
        )
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise OSError(
            f"cannot {what} on {address}: {exc} (is another server on that port? "
            "choose another port or stop the other server)"
        ) from None
    return sock


def dealer_socket(
    ctx: zmq.Context, address: str, identity: bytes, curve: ClientCurve | None = None
) -> zmq.Socket:
    """A client's DEALER connected to `address`, with `identity` as its routing id (a CurveZMQ
    client with `curve`)."""
    sock = ctx.socket(zmq.DEALER)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.connect(address)
    return sock


def handshake_failure(monitor: zmq.Socket | None) -> OSError | None:
    """Why a secured client's handshakes failed, from its socket's monitor (None: no failure
    seen): a timeout then says "the server refused our key" instead of only "no reply"."""
    if monitor is None:
        return None
    why: OSError | None = None
    while True:
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:
            return why
        event, value = struct.unpack("=hi", frames[0][:6])
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = PermissionError(
                f"the server refused this client's CurveZMQ key (ZAP status {value}): it does "
                "not know the key; give the lab's admin your NAME.key file (`labmesh keys show`)"
            )
        elif why is None:
            why = ConnectionRefusedError(
                "the CurveZMQ handshake failed: the server's key is not the one this client "
                "was given (or the server does not speak CURVE on that port)"
            )


def handshake_monitor(sock: zmq.Socket) -> zmq.Socket:
    """A PAIR socket receiving `sock`'s handshake failures (read by handshake_failure)."""
    return sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    )


def close_monitored(sock: zmq.Socket | None, monitor: zmq.Socket | None) -> None:
    """Close a socket and the PAIR reading its monitor events, in the only safe order.

    libzmq's I/O thread writes a monitor event with a blocking send while it holds the
    socket's monitor lock; once the reader is closed, an event raised before the socket is
    torn down (a failed handshake of a reconnect) blocks that thread for good, and with it
    every socket of the context (libzmq issue #3575; seen here as every sync client,
    resolver and raw socket of a test process going silent). So: stop the monitor first,
    then close the socket, then the reader.
    """
    if sock is not None:
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        sock.close(linger=0)
    if monitor is not None:
        monitor.close(linger=0)


def bound_address(sock: zmq.Socket) -> str:
    """The endpoint a socket really bound (resolves port 0 and wildcards)."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
