"""Stopping on SIGINT/SIGTERM, one way for every long-running labmesh command and server."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("labmesh.signals")


def wait_for_signal(check: Callable[[], bool] | None = None, every_s: float = 0.5) -> bool:
    """Block until SIGINT or SIGTERM (True), or until `check()`, called every `every_s`,
    returns False (False)."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(every_s):
            if check is not None and not check():
                return False
        return True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
