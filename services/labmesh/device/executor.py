"""Executors run a device's calls one at a time, off the server's I/O loop.

`DedicatedThreadExecutor` (fixed_threading=True) runs every call of the device's whole life on
one thread: drivers with thread affinity (NI-DAQmx, .NET and COM SDKs) need it.
`SerializedPoolExecutor` (fixed_threading=False) runs them on a shared pool, still one at a
time per device. Either way a call whose budget expired keeps the device busy until it really
ends, so two calls never overlap, and anything a call raises (SystemExit included) becomes that
call's error while the executor carries on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("labmesh.executor")

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


class Job:
    """One device call: `fn(*args, **kwargs)`; `on_done(job)` runs on the worker afterwards.

    After completion `ok` tells whether it returned (`value`) or raised (`error`).
    """

    __slots__ = (
        "args",
        "error",
        "finished_at",
        "fn",
        "kwargs",
        "label",
        "ok",
        "on_done",
        "started_at",
        "state",
        "value",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        label: str = "",
        on_done: Callable[[Job], None] | None = None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs or {}
        self.label = label or getattr(fn, "__name__", "call")
        self.on_done = on_done
        self.state = QUEUED
        self.started_at = 0.0
        self.finished_at = 0.0
        self.ok = False
        self.value: Any = None
        self.error: BaseException | None = None


class Executor:
    """Common state of both executors: the job being run, cancellation, health."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._queued = 0
        self._closed = False

    @property
    def current(self) -> Job | None:
        """The job running now, if any (its label and started_at say what and since when)."""
        return self._current

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting behind the current one."""
        return self._queued

    @property
    def healthy(self) -> bool:
        raise NotImplementedError

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def shutdown(self, timeout: float = 2.0) -> bool:
        """Stop taking jobs; return True if the worker finished within `timeout`."""
        raise NotImplementedError

    def cancel(self, job: Job) -> bool:
        """Cancel a job that has not started; False if it is already running or done."""
        with self._lock:
            if job.state != QUEUED:
                return False
            job.state = CANCELLED
            self._queued -= 1
            return True

    def _enqueued(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: executor is shut down")
            self._queued += 1

    def _run(self, job: Job) -> None:
        """Run one job if it was not cancelled; never lets an exception escape."""
        with self._lock:
            if job.state != QUEUED:
                return
            job.state = RUNNING
            self._queued -= 1
            self._current = job
        job.started_at = time.monotonic()
        try:
            job.value = job.fn(*job.args, **job.kwargs)
            job.ok = True
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: one call's error
            job.error = exc
        job.finished_at = time.monotonic()
        with self._lock:
            job.state = DONE
            self._current = None
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:
                log.exception("%s: result hand-off of %s failed", self.name, job.label)


class DedicatedThreadExecutor(Executor):
    """All calls on one thread that lives as long as the device."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"device:{name}", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def submit(self, job: Job) -> None:
        self._enqueued()
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(job)

    def shutdown(self, timeout: float = 2.0) -> bool:
        with self._lock:
            self._closed = True
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()


_shared_pool: ThreadPoolExecutor | None = None
_shared_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _shared_pool
    with _shared_pool_lock:
        if _shared_pool is None:
            _shared_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="labmesh-pool")
        return _shared_pool


class SerializedPoolExecutor(Executor):
    """Calls run on a shared thread pool, one at a time for this device, in arrival order."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._jobs: deque[Job] = deque()
        self._scheduled = False
        self._idle = threading.Event()
        self._idle.set()

    @property
    def healthy(self) -> bool:
        return not self._closed

    def submit(self, job: Job) -> None:
        self._enqueued()
        with self._lock:
            self._jobs.append(job)
            if self._scheduled:
                return
            self._scheduled = True
            self._idle.clear()
        _pool().submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._scheduled = False
                    self._idle.set()
                    return
                job = self._jobs.popleft()
            self._run(job)

    def shutdown(self, timeout: float = 2.0) -> bool:
        with self._lock:
            self._closed = True
        return self._idle.wait(timeout)


def make_executor(name: str, fixed_threading: bool) -> Executor:
    """The executor `build_server(..., fixed_threading=...)` asks for."""
    return DedicatedThreadExecutor(name) if fixed_threading else SerializedPoolExecutor(name)
