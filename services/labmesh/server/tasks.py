"""The tasks of one device server: the running one, and those recently finished. Pure.

The core (server/core.py) decides when a task's steps run; this module keeps each task's record
(who started it, what it touches, its progress, its outcome) and answers `task_status`. Finished
tasks stay visible for a while, bounded in number, so a client that started one and comes back
later still learns how it ended.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from labmesh.device.executor import Job
from labmesh.device.tasks import TaskRun

#: Finished tasks kept for task_status, and for how long.
MAX_FINISHED = 100
FINISHED_KEEP_S = 600.0

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass(slots=True, eq=False)
class Task:
    """One task: a long operation stepped on the device thread."""

    id: str
    operation: str
    label: str
    client_id: str
    session: str | None
    touches: tuple[str, ...]
    run: TaskRun
    first_job: Job  # the call's own job: the blocking caller is answered when the task ends
    created: float
    detached: bool = False
    state: str = QUEUED
    started: float | None = None
    ended: float | None = None
    progress: Any = None
    steps: int = 0
    next_step_at: float = 0.0
    cancel: str | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    current: Job | None = None
    #: task_status requests waiting for the end: (route, request, deadline, observe)
    waiters: list[tuple[Any, Any, float, Any]] = field(default_factory=list)

    def status(self, now: float) -> dict[str, Any]:
        """What task_status answers (JSON)."""
        out: dict[str, Any] = {
            "task": self.id,
            "operation": self.operation,
            "label": self.label,
            "state": self.state,
            "client_id": self.client_id,
            "progress": self.progress,
            "steps": self.steps,
            "touches": list(self.touches),
            "age_s": round(now - self.created, 3),
        }
        if self.started is not None:
            out["running_s"] = round((self.ended or now) - self.started, 3)
        if self.cancel is not None:
            out["cancel"] = self.cancel
        if self.state == DONE:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)


class TaskTable:
    """Tasks by id: queued or running ones, then the last MAX_FINISHED finished ones."""

    def __init__(self) -> None:
        self.active: Task | None = None
        self._live: dict[str, Task] = {}
        self._finished: OrderedDict[str, Task] = OrderedDict()
        self._prefix = secrets.token_hex(3)
        self._counter = itertools.count(1)

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"

    def add(self, task: Task) -> None:
        self._live[task.id] = task

    def get(self, task_id: str | None) -> Task | None:
        """The task `task_id`, or the running one for None."""
        if task_id is None:
            return self.active
        return self._live.get(task_id) or self._finished.get(task_id)

    def finish(self, task: Task, now: float) -> None:
        self._live.pop(task.id, None)
        if self.active is task:
            self.active = None
        self._finished[task.id] = task
        self.expire(now)

    def expire(self, now: float) -> None:
        finished = self._finished
        while finished and (
            len(finished) > MAX_FINISHED
            or now - (next(iter(finished.values())).ended or now) > FINISHED_KEEP_S
        ):
            finished.popitem(last=False)

    def live(self) -> list[Task]:
        return list(self._live.values())
