"""MotorStage and SimulatedMotion without a server: timing, soft limits, stop, what moves touch."""

from __future__ import annotations

import inspect
import itertools
import threading
import time

import pytest

from labmesh.device.base import Device, task_function, touched_resources
from labmesh.device.tasks import run_to_end
from labmesh.drivers.motor import MotorStage, SimulatedMotion
from labmesh.protocol.errors import ParameterValueError
from labmesh.server.core import ServerCore

pytestmark = pytest.mark.unit


class FakeTime:
    """A clock that only moves when the code under test sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = lambda: None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds
        self.on_sleep()


def fake_motion(**options) -> tuple[SimulatedMotion, FakeTime]:
    fake = FakeTime()
    motion = SimulatedMotion(clock=fake.clock, sleep=fake.sleep, **options)
    motion.open(["x", "y"])
    return motion, fake


@pytest.mark.parametrize(
    ("start", "target", "speed"),
    [(0, 30, 10), (30, 0, 10), (0, 1, 100), (-5, 5, 2.5), (0, 0.003, 1), (7, 7, 10)],
)
def test_a_move_takes_distance_over_speed(start, target, speed):
    motion, fake = fake_motion(start={"x": start})
    assert motion.move_to("x", target, speed) == target
    assert fake.now == pytest.approx(abs(target - start) / speed, abs=1e-9)
    assert motion.position("x") == target
    assert motion.position("y") == 0.0
    assert all(s <= motion.step_s + 1e-12 for s in fake.sleeps)


def test_the_position_moves_linearly_during_a_move():
    motion, fake = fake_motion()
    seen: list[tuple[float, float]] = []
    fake.on_sleep = lambda: seen.append((fake.now, motion.position("x")))
    motion.move_to("x", 10.0, 5.0)  # 2 s
    assert len(seen) >= 150  # updated every 10 ms
    for (t0, p0), (_, p1) in itertools.pairwise(seen):
        assert p1 >= p0
        assert p0 == pytest.approx(min(10.0, 5.0 * (t0 - motion.step_s)), abs=0.051)


def test_moves_take_time_proportional_to_distance_on_the_real_clock_by_default():
    # the simulator keeps real time unless given another clock: the defaults are the real ones
    defaults = inspect.signature(SimulatedMotion).parameters
    assert defaults["clock"].default is time.monotonic
    assert defaults["sleep"].default is time.sleep
    motion, fake = fake_motion()
    durations = []
    for distance in (1.0, 3.0):
        started = fake.now
        motion.move_to("x", motion.position("x") + distance, 10.0)
        durations.append(fake.now - started)
    assert durations == [pytest.approx(0.1, abs=1e-9), pytest.approx(0.3, abs=1e-9)]
    assert motion.position("x") == pytest.approx(4.0)


def test_stop_ends_a_move_where_the_axis_is_and_does_not_cut_the_next_one():
    motion, fake = fake_motion()
    fake.on_sleep = lambda: fake.now >= 1.0 and motion.stop("x")
    ended = motion.move_to("x", 100.0, 10.0)
    assert ended == pytest.approx(10.0, abs=0.11)
    assert motion.position("x") == ended
    assert fake.now == pytest.approx(1.0, abs=0.011)
    fake.on_sleep = lambda: None
    motion.stop("x")  # while idle: no effect on the next move
    assert motion.move_to("x", 20.0, 10.0) == 20.0


def test_stop_of_another_axis_leaves_a_move_alone():
    motion, fake = fake_motion()
    fake.on_sleep = lambda: motion.stop("y")
    assert motion.move_to("x", 5.0, 10.0) == 5.0


def test_stop_from_another_thread_interrupts_a_local_move():
    """A move run here (no server) on one thread, stopped from another, on a fake clock: the
    mover's waits advance the clock and, once the axis is past 5 mm, hold until the stop."""
    fake = FakeTime()
    past_5mm, stopped_event = threading.Event(), threading.Event()
    backend = SimulatedMotion(clock=fake.clock, sleep=fake.sleep)
    stage = MotorStage(("x",), speed=100.0, name="stage", sim=False, backend=backend)

    def sleep(seconds: float) -> None:  # run_to_end's sleep between the move's steps
        fake.sleep(seconds)
        if stage.position("x") > 5.0 and not past_5mm.is_set():
            past_5mm.set()
            assert stopped_event.wait(10), "the test thread never stopped the axis"

    with stage:
        result: list[float] = []
        errors: list[BaseException] = []

        def move() -> None:
            try:  # what stage.move_abs does called directly, with the fake sleep
                result.append(
                    run_to_end(task_function(stage, "move_abs")(stage, "x", 100.0), sleep)
                )
            except BaseException as exc:
                errors.append(exc)

        mover = threading.Thread(target=move)
        mover.start()
        try:
            assert past_5mm.wait(10), "the move never got past 5 mm"
            stopped = stage.stop("x")  # from this thread, while the mover waits between steps
        finally:
            stopped_event.set()
            mover.join(10)
        assert not mover.is_alive() and not errors, errors
        assert fake.now < 1.0  # the full move would take 1 s
        assert 5.0 < stopped["x"] < 100.0
        # the move ends where the stop found it: the clock did not move since
        assert result == [stopped["x"]]
        assert stage.position("x") == result[0]


def test_home_goes_to_zero_or_the_nearest_soft_limit():
    stage = MotorStage(limits={"y": (-50, 50), "z": (5, 10)}, speed=1000.0)
    with stage:
        assert stage.positions() == {"x": 0.0, "y": 0.0, "z": 5.0}
        stage.move_abs("z", 9.0)
        stage.move_abs("x", -2.0)
        assert stage.home("z") == {"z": 5.0}
        assert stage.positions() == {"x": -2.0, "y": 0.0, "z": 5.0}
        assert stage.home() == {"x": 0.0, "y": 0.0, "z": 5.0}


def test_soft_limits_refuse_moves_naming_axis_target_and_limits():
    stage = MotorStage(("x", "y"), limits={"x": (0, 100)}, speed=1000.0, name="stage-1")
    with stage:
        with pytest.raises(
            ValueError,
            match=r"stage-1: move of axis x to 150 refused: 150 mm is outside the soft limits "
            r"of axis x \[0, 100\] mm; choose a target within them",
        ):
            stage.move_abs("x", 150)
        assert stage.move_abs("x", 100) == 100.0  # the limit itself is allowed
        with pytest.raises(
            ValueError, match=r"move of axis x by \+1 \(from 100 to 101\) refused: 101 mm"
        ):
            stage.move_rel("x", 1)
        with pytest.raises(ValueError, match=r"outside the soft limits of axis x \[0, 100\]"):
            stage.move_abs("x", -0.001)
        with pytest.raises(ValueError, match="outside the soft limits"):
            stage.move_abs("x", float("nan"))
        with pytest.raises(ValueError, match="needs a number, got 'far'"):
            stage.move_abs("x", "far")
        assert stage.position("x") == 100.0
        assert stage.move_abs("y", -50) == -50.0  # no limits on y
        with pytest.raises(ValueError, match=r"stage-1 has no axis 'w'; axes: \['x', 'y'\]"):
            stage.move_abs("w", 1)


def test_axes_resources_freedom_and_parameters():
    stage = MotorStage(4, limits={"axis1": (-1, 1)}, speed={"axis0": 2.5}, unit="deg")
    assert stage.axes == ("axis0", "axis1", "axis2", "axis3")
    assert stage.freedom == 4
    assert stage.resources == ["axis0", "axis1", "axis2", "axis3"]
    assert stage.kind == "motor"
    position = stage.parameter("axis1/position")
    assert (position.min, position.max, position.unit, position.read_only) == (-1, 1, "deg", True)
    assert stage.parameter("axis1/speed").resources == ("axis1",)
    with stage:
        assert stage.query("axis0/speed") == 2.5
        assert stage.query("axis1/speed") == 10.0
        assert stage.write("axis1/speed", 20) is True
        assert stage.speeds["axis1"] == 20.0
        with pytest.raises(ParameterValueError, match=r"axis1/speed must be a number above 0"):
            stage.write("axis1/speed", 0.0)
        assert stage.query("axis2/position") == 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"axes": ["x", "x"]}, "distinct names"),
        ({"axes": ["x/1"]}, "without '/'"),
        ({"axes": 0}, "at least one axis"),
        ({"limits": {"q": (0, 1)}}, r"limits names unknown axes \['q'\]; axes: \['x', 'y', 'z'\]"),
        ({"limits": {"x": (5, 5)}}, r"limits of axis x must be \(low, high\) with low < high"),
        ({"limits": {"x": "far"}}, "limits of axis x must be"),
        ({"speed": 0}, "speed of x must be a number above 0"),
        ({"speed": {"q": 1}}, r"speed names unknown axes \['q'\]"),
        ({"sim": False}, "no built-in controller driver; run with sim: true, or pass backend="),
    ],
)
def test_bad_configuration_is_refused_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        MotorStage(**options)


def test_sim_wins_over_a_backend_and_a_backend_is_used_otherwise():
    mine = SimulatedMotion(start={"x": 3.0})
    assert MotorStage(backend=mine).backend is not mine
    stage = MotorStage(("x",), sim=False, backend=mine)
    with stage:
        assert stage.position("x") == 3.0
        assert stage.identity() == "labmesh,MotorStage,MotorStage,SimulatedMotion"


def test_a_move_touches_exactly_its_axis():
    stage = MotorStage(("x", "y", "z"))

    def touched(name, *args, **kwargs):
        return touched_resources(stage, "call", name, args, kwargs)

    assert touched("move_abs", "x", 5) == ("x",)
    assert touched("move_rel", axis="y", distance=1) == ("y",)
    assert touched("home", "z") == ("z",)
    assert touched("home") is None  # every axis: the whole stage
    assert touched("stop") is None
    assert touched("move_abs", "x") is None  # TypeError in the call, before anything moves
    assert touched("position", "x") == ()
    assert touched("positions") == ()
    assert touched("identity") == ()
    assert touched("check_operatability") == ()
    assert touched_resources(stage, "write", "x/speed", ("x/speed", 1.0), {}) == ("x",)
    assert touched_resources(stage, "query", "x/position", ("x/position",), {}) == ()
    # one mechanism: the @operation declarations, as the server applies them
    core = ServerCore(stage, "stage")
    assert core.touches("call", "home", (), {}) == ("x", "y", "z")
    assert core.touches("call", "stop", (), {"axis": "y"}) == ("y",)
    # an unknown axis is lock-checked as the whole stage, then refused by the call itself
    assert core.touches("call", "move_abs", ("w", 5), {}) == ("x", "y", "z")
    assert not hasattr(type(stage), "touches") or type(stage).touches is Device.touches
