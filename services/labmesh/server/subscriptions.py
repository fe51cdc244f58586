"""Value subscriptions of one device server: streams, filters, polling, the value cache. Pure.

A subscriber asks for a parameter (or a published name, or a task's progress `task/<id>`) with
an optional filter: `every_s` (poll the device that often), `deadband` (skip changes smaller
than this) and `max_rate_hz` (at most this many updates a second; the latest value is sent when
the interval ends). Subscribers asking for the same name with the same filter share one stream,
and each update of a stream is encoded once and handed to libzmq's PUB socket, which fans it out
to every subscriber of its topic: adding subscribers adds no Python work per update.

Updates come from the device reads this module schedules (at most one read per name per period,
however many subscribers), from reads and writes clients make through the server, and from the
driver (`Device.publish`). Every update carries the stream's own sequence number, so a
subscriber counts what it missed (a slow subscriber's updates are dropped by libzmq, never
queued without bound, and never slow the server or the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from labmesh.protocol import native
from labmesh.protocol.errors import SerializationError
from labmesh.protocol.topics import Filter, topic_of


@dataclass(slots=True, eq=False)
class Stream:
    name: str
    filter: Filter
    topic: str
    topic_bytes: bytes
    seq: int = 0
    last_value: Any = None
    has_value: bool = False
    last_sent_at: float = -math.inf
    held: tuple[Any, float] | None = None  # (value, wall ts) waiting for the rate limit
    subscribers: set[Any] = field(default_factory=set)


@dataclass(slots=True)
class Cached:
    value: Any
    ts: float  # wall clock
    at: float  # monotonic


class Subscriptions:
    """Streams by topic, the interests of each subscriber, and the polling schedule.

    Parameters:
        max_streams: distinct (name, filter) streams at once.
        max_per_subscriber: streams one subscriber (a session) may hold.
    """

    def __init__(self, max_streams: int = 10_000, max_per_subscriber: int = 1_000) -> None:
        self.max_streams = max_streams
        self.max_per_subscriber = max_per_subscriber
        self.streams: dict[str, Stream] = {}
        self._by_name: dict[str, list[Stream]] = {}
        self._by_subscriber: dict[Any, set[str]] = {}
        self.cache: dict[str, Cached] = {}
        #: names read periodically whoever subscribes (declared poll_s, metrics opt-in)
        self.pinned: dict[str, float] = {}
        self._next_poll: dict[str, float] = {}
        self._polling: set[str] = set()
        self.dropped_unencodable = 0
        #: the earliest time a held (rate-limited) value is due (inf: none held)
        self.earliest_flush = math.inf

    # ---- interests ------------------------------------------------------------------------
    def subscribe(self, subscriber: Any, name: str, flt: Filter, now: float) -> Stream:
        """Add `subscriber` to the stream (name, filter), made if new. Raises
        OverflowError("subscriber" or "all", limit) when a bound is reached."""
        topic = topic_of(name, flt)
        stream = self.streams.get(topic)
        mine = self._by_subscriber.get(subscriber, set())
        if topic not in mine and len(mine) >= self.max_per_subscriber:
            raise OverflowError("subscriber", self.max_per_subscriber)
        if stream is None:
            if len(self.streams) >= self.max_streams:
                raise OverflowError("all", self.max_streams)
            stream = Stream(name, flt, topic, topic.encode())
            cached = self.cache.get(name)
            if cached is not None:  # what subscribers get first: filters start from it
                stream.last_value, stream.has_value, stream.last_sent_at = cached.value, True, now
            self.streams[topic] = stream
            self._by_name.setdefault(name, []).append(stream)
            if flt.every_s is not None:
                self._next_poll.setdefault(name, now)
        stream.subscribers.add(subscriber)
        self._by_subscriber.setdefault(subscriber, set()).add(topic)
        return stream

    def topics_of(self, subscriber: Any) -> frozenset[str]:
        return frozenset(self._by_subscriber.get(subscriber, ()))

    def unsubscribe(self, subscriber: Any, topics: list[str] | None = None) -> int:
        """Remove `subscriber` from `topics` (None: from all); returns how many it left."""
        mine = self._by_subscriber.get(subscriber)
        if not mine:
            return 0
        leaving = list(mine) if topics is None else [t for t in topics if t in mine]
        for topic in leaving:
            mine.discard(topic)
            stream = self.streams.get(topic)
            if stream is None:
                continue
            stream.subscribers.discard(subscriber)
            if not stream.subscribers:
                self._drop(stream)
        if not mine:
            del self._by_subscriber[subscriber]
        return len(leaving)

    def _drop(self, stream: Stream) -> None:
        del self.streams[stream.topic]
        same = self._by_name.get(stream.name, [])
        if stream in same:
            same.remove(stream)
        if not same:
            self._by_name.pop(stream.name, None)
            if stream.name.startswith("task/"):
                self.cache.pop(stream.name, None)  # a finished task's last status goes too
        if self.period(stream.name) is None:
            self._next_poll.pop(stream.name, None)

    def pin(self, name: str, period_s: float, now: float) -> None:
        """Read `name` every `period_s` whoever subscribes (cached for metrics)."""
        self.pinned[name] = period_s
        self._next_poll.setdefault(name, now)

    def subscribed(self, name: str) -> bool:
        return name in self._by_name

    # ---- polling --------------------------------------------------------------------------
    def period(self, name: str) -> float | None:
        """How often `name` is read: the fastest `every_s` asked, or its pinned period."""
        periods = [s.filter.every_s for s in self._by_name.get(name, ()) if s.filter.every_s]
        if name in self.pinned:
            periods.append(self.pinned[name])
        return min(periods) if periods else None

    def polls_due(self, now: float) -> list[str]:
        """Names to read now (each at most once in flight)."""
        due = []
        for name, at in self._next_poll.items():
            if at <= now and name not in self._polling:
                due.append(name)
        for name in due:
            self._polling.add(name)
        return due

    def poll_ended(self, name: str, now: float) -> None:
        self._polling.discard(name)
        period = self.period(name)
        if period is None:
            self._next_poll.pop(name, None)
        else:
            self._next_poll[name] = now + period

    def read_now(self, name: str, now: float) -> None:
        """Schedule a read of `name` at once (a subscriber needs its current value)."""
        if name not in self._polling:
            self._next_poll[name] = now

    # ---- updates --------------------------------------------------------------------------
    def observe(self, name: str, value: Any, now: float, wall: float) -> list[tuple[bytes, bytes]]:
        """A new value of `name`: cached, and published on every stream whose filter lets it
        through now. Returns (topic, body) pairs to send."""
        self.cache[name] = Cached(value, wall, now)
        out = []
        for stream in self._by_name.get(name, ()):
            flt = stream.filter
            if (
                flt.deadband is not None
                and stream.has_value
                and _within(value, stream.last_value, flt.deadband)
            ):
                continue
            if flt.max_rate_hz is not None and now - stream.last_sent_at < 1.0 / flt.max_rate_hz:
                stream.held = (value, wall)
                due = stream.last_sent_at + 1.0 / flt.max_rate_hz
                if due < self.earliest_flush:
                    self.earliest_flush = due
                continue
            message = self._encode(stream, value, wall, now)
            if message is not None:
                out.append(message)
        return out

    def flush_due(self, now: float) -> list[tuple[bytes, bytes]]:
        """Held values whose rate-limit interval has ended."""
        out = []
        self.earliest_flush = math.inf
        for stream in self.streams.values():
            if stream.held is None:
                continue
            if now - stream.last_sent_at >= 1.0 / (stream.filter.max_rate_hz or math.inf):
                value, wall = stream.held
                stream.held = None
                message = self._encode(stream, value, wall, now)
                if message is not None:
                    out.append(message)
            else:
                due = stream.last_sent_at + 1.0 / (stream.filter.max_rate_hz or math.inf)
                self.earliest_flush = min(self.earliest_flush, due)
        return out

    def next_due(self) -> float:
        """When a poll or a held value is due next (inf: nothing scheduled)."""
        due = min(
            (at for name, at in self._next_poll.items() if name not in self._polling),
            default=math.inf,
        )
        for stream in self.streams.values():
            if stream.held is not None and stream.filter.max_rate_hz:
                due = min(due, stream.last_sent_at + 1.0 / stream.filter.max_rate_hz)
        return due

    def current(self, stream: Stream) -> dict[str, Any] | None:
        """The stream's latest update as a subscribe reply carries it (None: none yet)."""
        cached = self.cache.get(stream.name)
        if cached is None:
            return None
        return {"value": cached.value, "ts": cached.ts, "seq": stream.seq}

    def _encode(
        self, stream: Stream, value: Any, wall: float, now: float
    ) -> tuple[bytes, bytes] | None:
        update = {
            "topic": stream.topic,
            "name": stream.name,
            "value": value,
            "ts": wall,
            "seq": stream.seq + 1,
        }
        try:
            body = native.encode(update)
        except SerializationError:
            self.dropped_unencodable += 1
            return None
        stream.seq += 1
        stream.held = None
        stream.last_value = value
        stream.has_value = True
        stream.last_sent_at = now
        return stream.topic_bytes, body


def _within(value: Any, last: Any, deadband: float) -> bool:
    """Whether `value` is within `deadband` of `last` (non-numbers: equal)."""
    numbers = (int, float)
    if isinstance(value, numbers) and isinstance(last, numbers) and not isinstance(value, bool):
        return abs(value - last) < deadband
    return value == last
