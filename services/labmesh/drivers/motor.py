"""Motion stages as labmesh devices: N axes, each a lockable resource, with soft limits.

`MotorStage` talks to a controller only through a `MotorBackend`. `SimulatedMotion` is the
built-in one: a move takes |distance| / speed seconds and updates the position as it goes, so
long calls, budgets and locks are exercised for real.

A real controller plugs in by implementing `MotorBackend` (over pyserial, pyvisa, a vendor
library) and passing it as `backend=`, usually from a small subclass that the lab YAML names
as its driver:

    class PiStage(MotorStage):
        def __init__(self, resource: str, **options):
            super().__init__(backend=PiController(resource), **options)

    devices:
      - {name: stage-1, driver: "mylab.stages:PiStage", resource: /dev/ttyUSB0, port: 5560,
         options: {axes: [x, y], limits: {x: [0, 25], y: [0, 25]}, speed: 2}}

With `sim: true` (or `labmesh serve --sim`) the same entry runs on `SimulatedMotion`.

Limitation: a device server runs one call at a time, so a `stop` sent through the server
waits until the running move has ended and cannot interrupt it; keep moves short or give them
a `timeout=`. Code in the same process as the device (another thread) can call
`MotorStage.stop`, which the simulator and a conforming backend honour mid-move.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Protocol

from labmesh.device import Device, Parameter, operation
from labmesh.device.tasks import TaskCancelled, wait
from labmesh.protocol.errors import ParameterValueError, TaskCancelledError

#: How often a move in progress publishes its position (and a stop can cut in), seconds.
FOLLOW_S = 0.05
#: A move within this much of its duration has arrived (float steps never sum exactly).
_ARRIVED_S = 1e-9


class MotorBackend(Protocol):
    """What `MotorStage` needs from a motion controller.

    Calls come from one thread at a time, except `stop`, which may come from any thread while
    `move_to` or `home` runs. Positions and speeds are in the stage's unit (and unit/s).
    """

    def open(self, axes: Sequence[str]) -> None:
        """Connect to the controller; raise an error saying what is wrong if it cannot."""
        ...

    def close(self) -> None:
        """Stop every axis and release the controller; safe after a failed or partial open."""
        ...

    def position(self, axis: str) -> float:
        """Where the axis is now (also while it moves)."""
        ...

    def move_to(self, axis: str, target: float, speed: float) -> float:
        """Move the axis to `target` and block until it is there or stopped; return where it
        ended. Soft limits are already checked."""
        ...

    def home(self, axis: str, speed: float) -> float:
        """Run the axis's homing (reference) move and block until done; return its position."""
        ...

    def stop(self, axis: str | None = None) -> None:
        """Make a running move of `axis` (None: every axis) end now; no effect when idle."""
        ...

    # Optional, for moves that leave the stage responsive (MotorStage steps them as tasks:
    # positions are read and `stop` runs while the axis moves). A controller without them
    # moves with the blocking `move_to` / `home`.
    # def start_move(self, axis: str, target: float, speed: float) -> None: start, return now
    # def start_home(self, axis: str, speed: float) -> None: start homing, return now
    # def moving(self, axis: str) -> bool: whether the axis is still moving


class SimulatedMotion:
    """A controller in memory: a move takes |distance| / speed seconds and `stop` ends it where
    the axis is. Moves can be started and followed (`start_move`, `moving`, `position`) or run
    blocking (`move_to`, which updates the position every `step_s`).

    Parameters:
        home: each axis's home position (default 0).
        start: where each axis starts (default its home).
        step_s: how often a move updates its position and looks for a stop.
        clock, sleep: the time source and the sleep (tests pass a fake pair to run moves
            without waiting).
    """

    def __init__(
        self,
        *,
        home: Mapping[str, float] | None = None,
        start: Mapping[str, float] | None = None,
        step_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.homes = dict(home or {})
        self._start = dict(start or {})
        self.step_s = step_s
        self._clock = clock
        self._sleep = sleep
        self._positions: dict[str, float] = {}
        self._stops: dict[str, threading.Event] = {}
        #: axis -> (origin, target, started, duration) of a move in progress
        self._moves: dict[str, tuple[float, float, float, float]] = {}
        self._lock = threading.Lock()

    def open(self, axes: Sequence[str]) -> None:
        for axis in axes:
            home = self.homes.get(axis, 0.0)
            self._positions.setdefault(axis, float(self._start.get(axis, home)))
            self._stops.setdefault(axis, threading.Event())

    def close(self) -> None:
        self.stop()

    def position(self, axis: str) -> float:
        with self._lock:
            return self._where(axis)

    def _where(self, axis: str) -> float:
        move = self._moves.get(axis)
        if move is None:
            return self._positions[axis]
        origin, target, started, duration = move
        elapsed = self._clock() - started
        if elapsed >= duration - _ARRIVED_S:
            del self._moves[axis]
            self._positions[axis] = target
            return target
        where = origin + (target - origin) * elapsed / duration
        self._positions[axis] = where
        return where

    def start_move(self, axis: str, target: float, speed: float) -> None:
        with self._lock:
            origin = self._where(axis)
            self._stops[axis].clear()  # a stop sent while idle must not cut this move short
            self._moves[axis] = (origin, target, self._clock(), abs(target - origin) / speed)
            self._where(axis)  # a zero-length move has arrived already

    def start_home(self, axis: str, speed: float) -> None:
        self.start_move(axis, self.homes.get(axis, 0.0), speed)

    def moving(self, axis: str) -> bool:
        with self._lock:
            self._where(axis)
            return axis in self._moves

    def move_to(self, axis: str, target: float, speed: float) -> float:
        self.start_move(axis, target, speed)
        while self.moving(axis):
            if self._stops[axis].is_set():
                break
            _, _, started, duration = self._moves.get(axis, (0.0, 0.0, 0.0, 0.0))
            self._sleep(max(0.0, min(self.step_s, started + duration - self._clock())))
        return self.position(axis)

    def home(self, axis: str, speed: float) -> float:
        return self.move_to(axis, self.homes.get(axis, 0.0), speed)

    def stop(self, axis: str | None = None) -> None:
        with self._lock:
            for name, event in self._stops.items():
                if axis is None or name == axis:
                    event.set()
                    if name in self._moves:
                        self._positions[name] = self._where(name)
                        self._moves.pop(name, None)


def _axis_names(axes: int | str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(axes, int) and not isinstance(axes, bool):
        if axes < 1:
            raise ValueError(f"a stage needs at least one axis, got axes={axes}")
        return tuple(f"axis{i}" for i in range(axes))
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in names if not isinstance(a, str) or not a.strip() or "/" in a]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(
            "axes must be a number of axes or distinct names without '/', e.g. ['x', 'y', 'z']; "
            f"got {axes!r}"
        )
    return names


def _positive_speed(value: Any, where: str, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ParameterValueError(f"{where} must be a number above 0 {unit}/s, got {value!r}")
    if not math.isfinite(value):
        raise ParameterValueError(f"{where} must be finite, got {value!r}")
    return float(value)


class MotorStage(Device):
    """A motion stage with N axes (`freedom`, as LAPLACE calls it), each a lockable resource.

    Moving, homing or stopping axis "x" touches exactly "x" (all axes when no axis is given);
    reading positions touches nothing. Each axis has two parameters: `<axis>/position`
    (read-only; its min/max are the soft limits) and `<axis>/speed` (unit/s; writing it touches
    the axis). Moves declare a 60 s budget (homing 120 s); a client passes `timeout=` (seconds)
    for another one, and on TimeoutError with `still_running` the stage stays busy with that
    move, so the next call waits for it to end.

    Parameters:
        axes: axis names, e.g. `("x", "y", "z")`, or a count (3 -> "axis0".."axis2").
        sim: run on `SimulatedMotion`. Wins over `backend`, so `labmesh serve --sim` simulates
            every stage.
        limits: soft limits per axis, e.g. `{"x": (0, 100)}`; axes not named have none. An
            axis's home (the simulator's 0) is clamped into its limits.
        speed: unit/s for every axis, or per axis (`{"x": 5, "y": 10}`; others get 10).
        unit: the position unit shown to users.
        name: the device's name in the lab (default "MotorStage").
        backend: the controller (`MotorBackend`) when not simulating; required then.
    """

    kind = "motor"

    def __init__(
        self,
        axes: int | Sequence[str] = ("x", "y", "z"),
        *,
        sim: bool = True,
        limits: Mapping[str, Sequence[float]] | None = None,
        speed: float | Mapping[str, float] = 10.0,
        unit: str = "mm",
        name: str | None = None,
        backend: MotorBackend | None = None,
    ) -> None:
        self.axes = _axis_names(axes)
        self.freedom = len(self.axes)
        self.unit = unit
        super().__init__(name, resources=list(self.axes))
        self.limits = self._limits(limits or {})
        speeds = speed if isinstance(speed, Mapping) else dict.fromkeys(self.axes, speed)
        self._check_axes(speeds, "speed")
        self.speeds = {
            axis: _positive_speed(speeds.get(axis, 10.0), f"{self.name}: speed of {axis}", unit)
            for axis in self.axes
        }
        if sim:
            homes = {a: min(max(0.0, low), high) for a, (low, high) in self.limits.items()}
            backend = SimulatedMotion(home=homes)
        elif backend is None:
            raise ValueError(
                f"{self.name}: MotorStage has no built-in controller driver; run with sim: true, "
                "or pass backend= a MotorBackend for your controller (see labmesh.drivers.motor)"
            )
        self.backend: MotorBackend = backend
        for axis in self.axes:
            low, high = self.limits.get(axis, (None, None))
            self.declare(
                Parameter(
                    float,
                    unit=unit,
                    min=low,
                    max=high,
                    read_only=True,
                    description=f"position of axis {axis} (min/max: soft limits)",
                    name=f"{axis}/position",
                )
            )
            self.declare(
                Parameter(
                    float,
                    unit=f"{unit}/s",
                    description=f"speed of axis {axis} for the next moves",
                    resources=(axis,),
                    name=f"{axis}/speed",
                )
            )

    def _check_axes(self, per_axis: Mapping[str, Any], what: str) -> None:
        unknown = [a for a in per_axis if a not in self.axes]
        if unknown:
            raise ValueError(
                f"{self.name}: {what} names unknown axes {unknown}; axes: {list(self.axes)}"
            )

    def _limits(self, limits: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
        self._check_axes(limits, "limits")
        out = {}
        for axis, pair in limits.items():
            try:
                low, high = (float(v) for v in pair)
            except (TypeError, ValueError):
                low = high = math.nan
            if not low < high:  # also catches NaN
                raise ValueError(
                    f"{self.name}: limits of axis {axis} must be (low, high) with low < high, "
                    f"got {pair!r}"
                )
            out[axis] = (low, high)
        return out

    # ---- lifecycle ------------------------------------------------------------------------
    def connect(self) -> None:
        self.backend.open(self.axes)

    def disconnect(self) -> None:
        self.backend.close()

    # ---- helpers --------------------------------------------------------------------------
    def _axis(self, axis: Any) -> str:
        if axis not in self.axes:
            raise ValueError(f"{self.name} has no axis {axis!r}; axes: {list(self.axes)}")
        return axis

    def _selected(self, axis: Any) -> tuple[str, ...]:
        return self.axes if axis is None else (self._axis(axis),)

    def _move(self, axis: str, target: Any, what: str) -> Generator[Any, Any, float]:
        """Move `axis` to `target` after checking it (a task: see `_follow`); `what` describes
        the move for errors."""
        if isinstance(target, bool) or not isinstance(target, (int, float)):
            raise ValueError(f"{self.name}: {what} needs a number, got {target!r}")
        low, high = self.limits.get(axis, (-math.inf, math.inf))
        if not (math.isfinite(target) and low <= target <= high):
            raise ValueError(
                f"{self.name}: {what} refused: {target:g} {self.unit} is outside the soft "
                f"limits of axis {axis} [{low:g}, {high:g}] {self.unit}; choose a target "
                "within them"
            )
        start = getattr(self.backend, "start_move", None)
        if start is None:  # a controller that only moves blocking: one long step
            return self.backend.move_to(axis, float(target), self.speeds[axis])
        start(axis, float(target), self.speeds[axis])
        return (yield from self._follow(axis, f"{what} ({target:g} {self.unit})"))

    def _follow(self, axis: str, what: str) -> Generator[Any, Any, float]:
        """Follow a started move of `axis` until it ends, publishing its position every
        FOLLOW_S; a cancel (a `stop`, `task_cancel`, Ctrl+C) stops the axis where it is."""
        backend = self.backend
        try:
            while backend.moving(axis):  # type: ignore[attr-defined]
                where = backend.position(axis)
                self.publish(f"{axis}/position", where)
                yield wait(FOLLOW_S, {"axis": axis, "position": where})
        except TaskCancelled as cancel:
            backend.stop(axis)
            where = backend.position(axis)
            self.publish(f"{axis}/position", where)
            raise TaskCancelledError(
                f"{self.name}: {what} stopped at {where:g} {self.unit} ({cancel.reason})",
                position=where,
            ) from None
        where = backend.position(axis)
        self.publish(f"{axis}/position", where)
        return where

    # ---- parameter hooks ------------------------------------------------------------------
    def _query_(self, name: str) -> float:
        axis, what = name.rsplit("/", 1)
        return self.backend.position(axis) if what == "position" else self.speeds[axis]

    def _write_(self, name: str, value: Any) -> bool:
        axis = name.rsplit("/", 1)[0]
        self.speeds[axis] = _positive_speed(value, name, self.unit)
        return True

    # ---- operations -----------------------------------------------------------------------
    @operation(budget_s=60, idempotent=True, resources=["{axis}"])
    def move_abs(self, axis: str, position: float) -> Generator[Any, Any, float]:
        """Move `axis` to `position` (within its soft limits); returns where it ended. A task:
        through a server, positions are read and `stop` runs while it moves."""
        axis = self._axis(axis)
        return (yield from self._move(axis, position, f"move of axis {axis} to {position!r}"))

    @operation(budget_s=60, resources=["{axis}"])
    def move_rel(self, axis: str, distance: float) -> Generator[Any, Any, float]:
        """Move `axis` by `distance` (the target must be within its soft limits); returns where
        it ended."""
        axis = self._axis(axis)
        if isinstance(distance, bool) or not isinstance(distance, (int, float)):
            raise ValueError(f"{self.name}: move of axis {axis} needs a distance, got {distance!r}")
        origin = self.backend.position(axis)
        target = origin + distance
        return (
            yield from self._move(
                axis,
                target,
                f"move of axis {axis} by {distance:+g} (from {origin:g} to {target:g})",
            )
        )

    @operation(budget_s=120, idempotent=True, resources=["{axis}"])
    def home(self, axis: str | None = None) -> Generator[Any, Any, dict[str, float]]:
        """Home `axis` (None: every axis, one after another); returns their positions. A task,
        like the moves."""
        start = getattr(self.backend, "start_home", None)
        done = {}
        for a in self._selected(axis):
            if start is None:
                done[a] = self.backend.home(a, self.speeds[a])
                continue
            start(a, self.speeds[a])
            done[a] = yield from self._follow(a, f"homing of axis {a}")
        return done

    @operation(idempotent=True, resources=["{axis}"], preempt=True)
    def stop(self, axis: str | None = None) -> dict[str, float]:
        """Stop `axis` (None: every axis) where it is; returns their positions. Runs at once,
        also while a move runs (it preempts): a move or homing of a stopped axis ends, its
        caller told where it stopped."""
        axes = self._selected(axis)
        self.backend.stop(axis)
        return {a: self.backend.position(a) for a in axes}

    @operation(idempotent=True, resources=(), read_only=True)
    def position(self, axis: str) -> float:
        """Where `axis` is now."""
        return self.backend.position(self._axis(axis))

    @operation(idempotent=True, resources=(), read_only=True)
    def positions(self) -> dict[str, float]:
        """Where every axis is now."""
        return {a: self.backend.position(a) for a in self.axes}

    @operation(idempotent=True, resources=(), read_only=True)
    def identity(self) -> str:
        """labmesh,MotorStage,<name>,<backend> (the backend's class, e.g. SimulatedMotion)."""
        return f"labmesh,{type(self).__name__},{self.name},{type(self.backend).__name__}"
