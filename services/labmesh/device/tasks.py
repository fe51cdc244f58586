"""Long operations as tasks: a driver writes one as a generator, the server steps it. Pure.

A task operation is an `@operation` method written as a generator::

    @operation(budget_s=60, resources=["{axis}"])
    def move_abs(self, axis, position):
        self.backend.start_move(axis, position, speed)
        while self.backend.moving(axis):
            yield wait(0.05, progress={"position": self.backend.position(axis)})
        return self.backend.position(axis)

Each step (the code between two yields) runs on the device's thread, one at a time with every
other call, so drivers stay single-threaded and thread-affine. Between steps the device is free:
a server answers parameter reads and runs `@operation(preempt=True)` calls (a stage's `stop`)
there, so a move can be watched and stopped while it runs. A step yields `wait(seconds)` (come
back after that long), optionally with progress, or any other value (progress; come back at
once). `return value` ends the task with its result.

A task is stopped by throwing `TaskCancelled` into the generator at its yield: a driver catches it
to bring the hardware to rest and then re-raises it (or raises `TaskCancelledError` saying where
it stopped), or returns a result anyway.

Called directly (no server), a task operation runs to its end and returns its result, sleeping
through its waits, exactly like a plain method; Ctrl+C stops it the same way a remote cancel does.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from labmesh.protocol.errors import TaskCancelledError

#: The smallest wait between two steps (a generator asking for less gets this), so that a task
#: can never starve the reads and calls served between its steps.
MIN_WAIT_S = 0.001


class TaskCancelled(Exception):
    """Thrown into a task's generator when it is stopped (`task_cancel`, a preempting call
    touching its resources, Ctrl+C when run locally). `reason` says by whom."""

    def __init__(self, reason: str = "stopped") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Wait:
    """What a task step yields to be stepped again after `seconds` (with optional progress)."""

    seconds: float
    progress: Any = None


def wait(seconds: float, progress: Any = None) -> Wait:
    """Yield this from a task: come back after `seconds`; `progress` is published meanwhile."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"wait() takes a number of seconds >= 0, got {seconds!r}")
    return Wait(max(float(seconds), MIN_WAIT_S), progress)


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one step: `done` (with the result), or `wait` for `seconds` (with the
    progress it reported, None when it reported none)."""

    done: bool
    value: Any = None
    seconds: float = 0.0
    progress: Any = None


class TaskRun:
    """One running task: the generator, made on the first step.

    Parameters:
        start: makes the generator (the operation called with its arguments); a plain function
            is run once and its return value is the task's result.
    """

    __slots__ = ("_gen", "_start")

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start
        self._gen: Generator[Any, Any, Any] | None = None

    def step(self, cancel: str | None = None) -> Step:
        """Run one step on this thread. `cancel`: stop the task (why), thrown in at its yield.

        Raises what the task raises (its error), TaskCancelledError if it let the cancel through.
        """
        try:
            if self._gen is None:
                made = self._start()
                if not inspect.isgenerator(made):
                    return Step(True, made)
                self._gen = made
                if cancel is not None:  # stopped before it began: it never runs
                    self._gen.close()
                    raise TaskCancelledError(f"stopped before it started ({cancel})")
                yielded = next(self._gen)
            elif cancel is not None:
                yielded = self._gen.throw(TaskCancelled(cancel))
            else:
                yielded = next(self._gen)
        except StopIteration as stop:
            return Step(True, stop.value)
        except TaskCancelled as exc:
            raise TaskCancelledError(f"stopped ({exc.reason})") from None
        if isinstance(yielded, Wait):
            return Step(False, None, yielded.seconds, yielded.progress)
        return Step(False, None, 0.0, yielded)


def run_to_end(gen: Generator[Any, Any, Any], sleep: Callable[[float], None] = time.sleep) -> Any:
    """Run a task generator here and now (a driver used without a server): its result.

    Ctrl+C while it waits stops it as a remote cancel would (the driver brings the hardware to
    rest), then KeyboardInterrupt goes on up."""
    run = TaskRun(lambda: gen)
    step = run.step()
    while not step.done:
        try:
            if step.seconds:
                sleep(step.seconds)
        except KeyboardInterrupt:
            with contextlib.suppress(TaskCancelledError):
                run.step("KeyboardInterrupt")
            raise
        step = run.step()
    return step.value
