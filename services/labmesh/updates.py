"""Subscriptions on the client side: `client.subscribe(...)` and what it returns.

A device server publishes each update once on its PUB socket, by topic (one per parameter and
filter: labmesh.server.subscriptions); a client holds one SUB socket per server, read by one
background thread (sync) or task (asyncio), which hands each update to the subscriptions of its
topic. Every update carries its stream's sequence number: a subscription counts the updates it
missed (`missed` on the update after a gap, `gaps` in total), drops duplicates, and after a
server restart (the client connects again by itself) subscribes again and marks the first
update after it with `missed=None` (unknown: the server's counters started over).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from labmesh.protocol import codec
from labmesh.protocol.topics import Filter, topic_of
from labmesh.transport import close_monitored

if TYPE_CHECKING:
    from labmesh.client import AsyncDeviceClient, DeviceClient

log = logging.getLogger("labmesh.client")

#: Updates a subscription keeps for its reader (an iterator that falls behind loses the oldest).
MAX_QUEUED_UPDATES = 10_000
#: How long a first subscription waits for its SUB's connection to come up (s).
LINK_WAIT_S = 2.0
#: How often the receiving thread looks for commands and for close (ms).
_POLL_MS = 50


@dataclass(frozen=True, slots=True)
class Update:
    """One value of a subscription.

    Attributes:
        name: the parameter (or published name, or `task/<id>`).
        value: its value.
        timestamp: when the server saw it (seconds since the epoch, server clock).
        seq: the stream's sequence number.
        missed: updates of this stream lost just before this one (0 normally; None after the
            server restarted, when it is unknown).
    """

    name: str
    value: Any
    timestamp: float
    seq: int
    missed: int | None = 0


def pub_endpoint(advertised: str, server_address: str) -> str:
    """The endpoint to connect a SUB to: the server's PUB address, with a wildcard host
    replaced by the host the client reached the server at."""
    scheme, _, rest = advertised.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host in ("*", "0.0.0.0", "[::]", "::", ""):
        reached = server_address.partition("://")[2].rpartition(":")[0]
        return f"tcp://{reached}:{port}"
    return advertised


def dispatch(subs: list[Any] | None, topic: bytes, body: bytes) -> None:
    """Hand one received update to the subscriptions of its topic (both receivers)."""
    if not subs:
        return
    try:
        update = codec.loads(body)
        name, value, ts, seq = update["name"], update["value"], update["ts"], update["seq"]
    except (ValueError, KeyError, TypeError, RecursionError):
        log.warning("dropped a malformed update on %r", topic[:80])
        return
    text = topic.decode(errors="replace")
    for sub in list(subs):
        accepted = sub._accept(text, name, value, ts, seq)
        if accepted is not None:
            sub._hand(accepted)


class _TopicIndex:
    """Which subscriptions of one client want each topic (both receivers keep one)."""

    def __init__(self) -> None:
        self.by_topic: dict[bytes, list[Any]] = {}

    def add(self, sub: Any) -> list[bytes]:
        """Index `sub`; the topics nobody wanted before (to subscribe the SUB to)."""
        new = []
        for topic in sub.topics:
            key = topic.encode()
            subs = self.by_topic.setdefault(key, [])
            if sub in subs:  # subscribing again after a reconnect
                continue
            if not subs:
                new.append(key)
            subs.append(sub)
        return new

    def remove(self, sub: Any) -> list[bytes]:
        """Forget `sub`; the topics nobody wants any more (to unsubscribe the SUB from)."""
        gone = []
        for topic in sub.topics:
            key = topic.encode()
            subs = self.by_topic.get(key)
            if subs is None or sub not in subs:
                continue
            subs.remove(sub)
            if not subs:
                del self.by_topic[key]
                gone.append(key)
        return gone


class _Stream:
    """What a subscription knows of one topic: the last sequence number seen."""

    __slots__ = ("last", "name", "restarted")

    def __init__(self, name: str) -> None:
        self.name = name
        self.last: int | None = None
        self.restarted = False


class _SubscriptionBase:
    def __init__(
        self,
        names: list[str],
        flt: Filter,
        callback: Callable[[Update], Any] | None,
    ) -> None:
        self.names = names
        self.filter = flt
        self.callback = callback
        self.topics = {topic_of(name, flt): _Stream(name) for name in names}
        #: updates missed in all (by sequence numbers), updates the local queue dropped
        #: (the reader fell behind), and server restarts survived
        self.gaps = 0
        self.dropped = 0
        self.restarts = 0
        self.closed = False
        self._lock = threading.Lock()

    def request(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"type": "subscribe", "params": self.names}
        if self.filter.every_s is not None:
            payload["every_s"] = self.filter.every_s
        if self.filter.deadband is not None:
            payload["deadband"] = self.filter.deadband
        if self.filter.max_rate_hz is not None:
            payload["max_rate_hz"] = self.filter.max_rate_hz
        return payload

    def _accept(self, topic: str, name: str, value: Any, ts: float, seq: int) -> Update | None:
        """The update to hand on, or None for a duplicate (seen already)."""
        stream = self.topics.get(topic)
        if stream is None or self.closed:
            return None
        with self._lock:
            if stream.restarted:
                stream.restarted = False
                stream.last = seq
                return Update(name, value, ts, seq, None)
            last = stream.last
            if last is not None and seq <= last:
                return None
            missed = 0 if last is None else seq - last - 1
            stream.last = seq
            self.gaps += missed
        return Update(name, value, ts, seq, missed)

    def _called_back(self, update: Update) -> bool:
        """Give `update` to the callback, if there is one (it never breaks the receiver)."""
        if self.callback is None:
            return False
        try:
            self.callback(update)
        except Exception:
            log.exception("subscription callback failed on %s", update.name)
        return True

    def _server_restarted(self) -> None:
        with self._lock:
            self.restarts += 1
            for stream in self.topics.values():
                stream.restarted = True

    def _current(self, reply: dict[str, Any]) -> list[Update]:
        out = []
        for name, current in (reply.get("current") or {}).items():
            if not current:
                continue
            topic = (reply.get("topics") or {}).get(name, topic_of(name, self.filter))
            update = self._accept(topic, name, current["value"], current["ts"], current["seq"])
            if update is not None:
                out.append(update)
        return out


class Subscription(_SubscriptionBase):
    """Updates of one or more parameters (`client.subscribe(...)`).

    Iterate it (blocking) for `Update`s, or give a callback (called on the client's receiving
    thread; keep it short). The first update of each name is its current value. `close()`
    (or leaving its `with` block) ends it.
    """

    def __init__(self, client: DeviceClient, names, flt, callback) -> None:
        super().__init__(names, flt, callback)
        self.client = client
        self._queue: collections.deque[Update] = collections.deque(maxlen=MAX_QUEUED_UPDATES)
        self._ready = threading.Condition(self._lock)

    def _hand(self, update: Update) -> None:
        if self._called_back(update):
            return
        with self._ready:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(update)
            self._ready.notify_all()

    def get(self, timeout: float | None = None) -> Update | None:
        """The next update (None if none came within `timeout` seconds, or it was closed)."""
        with self._ready:
            if not self._queue and not self.closed:
                self._ready.wait(timeout)
            return self._queue.popleft() if self._queue else None

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Update:
        while True:
            update = self.get(1.0)
            if update is not None:
                return update
            if self.closed:
                raise StopIteration

    def close(self) -> None:
        if self.closed:
            return
        self.client._unsubscribe(self)
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.names} gaps={self.gaps}>"


class Receiver:
    """A sync client's SUB socket and the thread that reads it.

    Only that thread touches the SUB socket. Subscribe/unsubscribe commands from other threads
    reach it over an inproc PAIR and are waited for, so a topic is subscribed before the server
    is asked; a callback (on that thread) changes the SUB directly. Callers never hold the
    client's lock while they wait here, so a callback may use the client.
    """

    def __init__(self, context: zmq.Context, endpoint: str, curve: Any = None) -> None:
        self.endpoint = endpoint
        self._ctx = context
        self._curve = curve  # labmesh.security.ClientCurve of a secured server
        self._topics = _TopicIndex()
        self._lock = threading.Lock()
        address = f"inproc://labmesh-sub-{id(self)}"
        self._cmd = context.socket(zmq.PAIR)
        self._cmd.setsockopt(zmq.LINGER, 0)
        self._cmd.bind(address)
        self._stop = threading.Event()
        self._ready = threading.Event()
        #: set once the SUB's connection to the server is up (subscriptions then travel at once)
        self._linked = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(address,), name="labmesh-subscriptions", daemon=True
        )
        self._thread.start()
        self._ready.wait(5)

    def add(self, sub: Subscription) -> None:
        # a new connection first: until it is up, a subscription cannot reach the server
        if threading.current_thread() is not self._thread:
            self._linked.wait(LINK_WAIT_S)
        with self._lock:
            for key in self._topics.add(sub):
                self._command(b"+", key)

    def remove(self, sub: Subscription) -> None:
        with self._lock:
            for key in self._topics.remove(sub):
                self._command(b"-", key)

    def reconnect(self, endpoint: str) -> None:
        """The server moved its PUB (it restarted): connect there instead."""
        with self._lock:
            if endpoint != self.endpoint:
                # not waited for: this may run under the client's lock (connecting again)
                self._command(b"c", endpoint.encode(), wait=False)
                self.endpoint = endpoint

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:  # (a callback may close its client)
            self._thread.join(2)
        with self._lock:
            self._cmd.close(linger=0)

    def _command(self, kind: bytes, arg: bytes, wait: bool = True) -> None:
        """Apply a change to the SUB: directly on the receiving thread (a callback), else by
        the receiving thread, waiting until it is applied if `wait`."""
        if threading.current_thread() is self._thread:
            self._apply(kind, arg)
            return
        self._cmd.send_multipart((kind, arg, b"1" if wait else b""))
        if wait:
            self._cmd.recv()

    def _apply(self, kind: bytes, arg: bytes) -> None:
        sub = self._sub
        if kind == b"+":
            sub.setsockopt(zmq.SUBSCRIBE, arg)
        elif kind == b"-":
            sub.setsockopt(zmq.UNSUBSCRIBE, arg)
        elif kind == b"c":
            with contextlib.suppress(zmq.ZMQError):
                sub.disconnect(self._connected)
            self._linked.clear()
            self._connected = arg.decode()
            sub.connect(self._connected)

    def _run(self, address: str) -> None:
        cmd = self._ctx.socket(zmq.PAIR)
        cmd.setsockopt(zmq.LINGER, 0)
        cmd.connect(address)
        sub = self._sub = self._ctx.socket(zmq.SUB)
        if self._curve is not None:
            self._curve.apply(sub)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        events_of_sub = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sub.connect(self.endpoint)
        self._connected = self.endpoint
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(cmd, zmq.POLLIN)
        poller.register(events_of_sub, zmq.POLLIN)
        self._ready.set()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(_POLL_MS))
                if events_of_sub in events:
                    events_of_sub.recv_multipart()
                    self._linked.set()
                if cmd in events:
                    kind, arg, wait = cmd.recv_multipart()
                    self._apply(kind, arg)
                    if wait:
                        cmd.send(b"")
                if sub in events:
                    for _ in range(1000):
                        try:
                            topic, body = sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        except ValueError:  # not two frames: not ours
                            continue
                        dispatch(self._topics.by_topic.get(topic), topic, body)
        finally:
            close_monitored(sub, events_of_sub)  # the monitor stopped first (see there)
            cmd.close(linger=0)


class AsyncSubscription(_SubscriptionBase):
    """The asyncio twin: `async for update in client.subscribe(...)`; the subscription is
    made on first use (or `await sub.start()`); `await sub.close()`."""

    def __init__(self, client: AsyncDeviceClient, names, flt, callback) -> None:
        super().__init__(names, flt, callback)
        self.client = client
        self._queue: asyncio.Queue[Update | None] = asyncio.Queue(MAX_QUEUED_UPDATES)
        self._started = False

    async def start(self) -> AsyncSubscription:
        if not self._started:
            self._started = True
            await self.client._subscribe(self)
        return self

    def _hand(self, update: Update) -> None:
        if self._called_back(update):
            return
        if self._queue.full():
            self.dropped += 1
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
        self._queue.put_nowait(update)

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Update:
        await self.start()
        if self.closed and self._queue.empty():
            raise StopAsyncIteration
        update = await self._queue.get()
        if update is None:
            raise StopAsyncIteration
        return update

    async def get(self, timeout: float | None = None) -> Update | None:
        await self.start()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.client._unsubscribe(self)
        self._hand_end()

    def _hand_end(self) -> None:
        """Wake a reader waiting in `async for` (it ends)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def __aenter__(self) -> AsyncSubscription:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncReceiver:
    """An asyncio client's SUB socket, read by one task (only that loop touches it)."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, curve: Any = None) -> None:
        self.endpoint = endpoint
        self._sub = context.socket(zmq.SUB)
        if curve is not None:
            curve.apply(self._sub)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._events = self._sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sub.connect(endpoint)
        self._topics = _TopicIndex()
        #: set once the SUB's connection to the server is up (as Receiver._linked)
        self.linked = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        self._link_task = asyncio.create_task(self._watch_link())

    async def _watch_link(self) -> None:
        while True:
            await self._events.recv_multipart()
            self.linked.set()

    async def wait_linked(self) -> None:
        """Until the SUB's connection is up (at most LINK_WAIT_S)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.linked.wait(), LINK_WAIT_S)

    def add(self, sub: AsyncSubscription) -> None:
        for key in self._topics.add(sub):
            self._sub.setsockopt(zmq.SUBSCRIBE, key)

    def remove(self, sub: AsyncSubscription) -> None:
        for key in self._topics.remove(sub):
            with contextlib.suppress(zmq.ZMQError):
                self._sub.setsockopt(zmq.UNSUBSCRIBE, key)

    def reconnect(self, endpoint: str) -> None:
        if endpoint != self.endpoint:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disconnect(self.endpoint)
            self.linked.clear()
            self._sub.connect(endpoint)
            self.endpoint = endpoint

    async def close(self) -> None:
        for task in (self._task, self._link_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        close_monitored(self._sub, self._events)

    async def _run(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) != 2:
                continue
            topic, body = frames
            dispatch(self._topics.by_topic.get(topic), topic, body)
