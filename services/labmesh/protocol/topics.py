"""Subscription topics, as server and client both compute them. Pure.

A client subscribes its SUB socket to a stream's topic before it asks the server, so both sides
must derive the same topic from a name and a filter; this module is that one derivation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Filter:
    """What a subscriber asks of a stream (None: no such filter)."""

    every_s: float | None = None
    deadband: float | None = None
    max_rate_hz: float | None = None

    @property
    def spec(self) -> str:
        parts = []
        if self.every_s is not None:
            parts.append(f"every={self.every_s:g}")
        if self.deadband is not None:
            parts.append(f"deadband={self.deadband:g}")
        if self.max_rate_hz is not None:
            parts.append(f"rate={self.max_rate_hz:g}")
        return "&".join(parts)


def topic_of(name: str, flt: Filter) -> str:
    """The PUB topic of a stream: `name`, NUL, the filter, NUL (the trailing NUL keeps one
    topic from being a prefix of another; ZeroMQ subscriptions match prefixes)."""
    return f"{name}\0{flt.spec}\0"
