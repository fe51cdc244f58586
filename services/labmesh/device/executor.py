"""Running device calls: the Job record, and the watchdog that spots calls running long.

A device server has two threads. The one that owns the socket runs short device calls inline
(no thread hop on the hot path); when a call runs longer than `TAKEOVER_AFTER_S`, the process-wide
`Watchdog` asks the server to hand its socket to the other thread, which then answers describe,
ping and locks, enforces budgets and queues further calls until the long call ends. With
`fixed_threading=True` every call runs on the first thread, for the device's whole life;
otherwise calls run on whichever of the two threads serves the socket. Either way at most one
call runs on a device at a time, and anything a call raises (SystemExit included) becomes that
call's error.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"

#: A call running longer than this gets its server's socket handed to the standby thread.
TAKEOVER_AFTER_S = 0.002
#: Watchdog tick while calls are in progress, and its longest sleep when all is idle.
_TICK_S = 0.001
_IDLE_TICK_S = 0.01
#: Checks without a running call (about _IDLE_TICK_S apart) before the watchdog sleeps.
_DORMANT_AFTER_CHECKS = 50


class Job:
    """One device call `fn(*args, **kwargs)` and, once run, its outcome (`ok`, `value`, `error`)."""

    __slots__ = (
        "args",
        "error",
        "finished_at",
        "fn",
        "kwargs",
        "label",
        "ok",
        "started_at",
        "state",
        "thread",
        "value",
    )

    def __init__(
        self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, label: str = ""
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs or {}
        self.label = label or getattr(fn, "__name__", "call")
        self.state = QUEUED
        self.started_at = 0.0
        self.finished_at = 0.0
        self.thread: threading.Thread | None = None
        self.ok = False
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        """Run the call on the current thread; never lets an exception escape."""
        if self.thread is None:
            self.thread = threading.current_thread()
        self.started_at = time.monotonic()
        self.state = RUNNING
        try:
            self.value = self.fn(*self.args, **self.kwargs)
            self.ok = True
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: one call's error
            self.error = exc
        self.finished_at = time.monotonic()
        self.state = DONE


class Watched(Protocol):
    """What the watchdog needs of a server."""

    def check_long_call(self, now: float) -> bool:
        """Hand over the socket if the inline call runs long; True while a call runs."""
        ...


class Watchdog:
    """One thread per process that checks every running server for long inline calls."""

    _instance: Watchdog | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._servers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        #: sleeping until woken: no call ran for _DORMANT_AFTER_CHECKS checks (an idle host
        #: costs no wake-ups); a server that starts a call then calls wake()
        self.dormant = False
        self._thread = threading.Thread(target=self._loop, name="labmesh-watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> Watchdog:
        with cls._instance_lock:
            if cls._instance is None or not cls._instance._thread.is_alive():
                cls._instance = Watchdog()
            return cls._instance

    def add(self, server: Watched) -> None:
        with self._lock:
            self._servers.add(server)
        self._wake.set()

    def remove(self, server: Watched) -> None:
        with self._lock:
            self._servers.discard(server)

    def _loop(self) -> None:
        tick = _IDLE_TICK_S
        quiet = 0
        while True:
            if self._wake.wait(None if self.dormant else tick):
                self._wake.clear()
            if self.dormant:  # a server started a call: stay awake a full quiet spell again
                self.dormant, quiet, tick = False, 0, _TICK_S
            active = self._check()
            if active:
                tick, quiet = _TICK_S, 0
                continue
            tick = min(_IDLE_TICK_S, tick * 2)
            quiet += 1
            if quiet >= _DORMANT_AFTER_CHECKS:
                # no call has run for a while: sleep until a server starts one (it wakes us
                # when it sees `dormant`); look once more after saying so, so a call that
                # started just before is not missed
                self.dormant = True
                if self._check():
                    self.dormant = False
                    tick, quiet = _TICK_S, 0

    def _check(self) -> bool:
        with self._lock:
            servers = list(self._servers)
        now = time.monotonic()
        active = False
        for server in servers:
            active = server.check_long_call(now) or active
        return active

    def wake(self) -> None:
        """A server starts a call while the watchdog sleeps (`dormant`): watch again."""
        self._wake.set()
