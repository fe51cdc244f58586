"""Stopping on SIGINT/SIGTERM, one way for every long-running labmesh command and server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("labmesh.signals")


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the event this yields, from entry on: enter it before starting
    anything, so a signal that comes while starting (`docker stop` right after `up`, a test
    that signals as soon as the banner is printed) stops cleanly instead of killing the
    process with its devices still open."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # (only the main thread receives signals; the caller sets it otherwise)
        return
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_signal(
    check: Callable[[], bool] | None = None,
    every_s: float = 0.5,
    stop: threading.Event | None = None,
) -> bool:
    """Block until SIGINT or SIGTERM (True), or until `check()`, called every `every_s`,
    returns False (False). `stop`: the event of a `stop_signals()` entered earlier."""
    if stop is None:
        with stop_signals() as stop:
            return wait_for_signal(check, every_s, stop)
    while not stop.wait(every_s):
        if check is not None and not check():
            return False
    return True


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], Any]) -> list:
    """Route SIGINT/SIGTERM to `stop` while serving (main thread, POSIX loops only)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # e.g. Windows' proactor loop: Ctrl+C then cancels run() instead
        installed.append(sig)
    return installed
