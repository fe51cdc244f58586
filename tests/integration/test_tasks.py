"""Long operations as tasks, over real sockets with the simulated MotorStage: a moving stage can
be watched and stopped, a started task followed and cancelled, and nothing else changes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from labmesh import RemoteError, build_async_client, build_client, build_server
from labmesh.drivers.motor import MotorStage

from support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def stage():
    """A 3-axis simulated stage at 1 mm/s (a 10 mm move takes 10 s), served on 127.0.0.1."""
    server = build_server(
        MotorStage(("x", "y", "z"), speed=1.0, limits={"x": (0, 100)}, name="stage-t"),
        address="tcp://127.0.0.1:0",
    ).start()
    yield server
    server.stop()


def move_in_background(client, *args):
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = client.move_abs(*args)
        except Exception as exc:
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_reads_are_answered_during_a_10_s_move(stage):
    with build_client(stage.address) as mover, build_client(stage.address) as watcher:
        thread, outcome = move_in_background(mover, "x", 10)
        time.sleep(0.3)
        latencies, positions = [], []
        for _ in range(20):
            t0 = time.monotonic()
            positions.append(watcher.query("x/position"))
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        # typically a few ms; the bound only says the move does not hold reads back (a
        # blocked read would wait the 10 s move out), with room for a loaded 2-core machine
        assert max(latencies) < 1.0, f"slowest read {max(latencies) * 1000:.0f} ms"
        assert positions == sorted(positions) and 0 < positions[0] < positions[-1] < 10
        status = watcher.ping()["task"]
        assert status["operation"] == "move_abs" and status["state"] == "running"
        assert 0 < status["progress"]["position"] < 10
        watcher.stop()
        thread.join(5)
        assert "error" in outcome


def test_stop_during_a_move_ends_it_at_once_where_it_is(stage):
    with build_client(stage.address) as mover, build_client(stage.address) as operator:
        thread, outcome = move_in_background(mover, "x", 10)
        time.sleep(1.0)
        sent = time.monotonic()
        stopped_at = operator.stop("x")["x"]
        thread.join(5)
        # typically under 50 ms; a stop that did not work would leave ~9 s of move
        assert outcome["ended"] - sent < 1.5, (
            f"the move ended {outcome['ended'] - sent:.3f} s later"
        )
        error = outcome["error"]
        assert isinstance(error, RemoteError) and error.type == "TaskCancelledError"
        assert "move of axis x to 10" in str(error) and "stopped at" in str(error)
        assert abs(error.reply["position"] - stopped_at) < 0.06  # where the stop found it
        assert 0.8 < stopped_at < 5  # about 1 s of a 10 s move (later on a loaded machine)
        time.sleep(0.3)
        assert operator.query("x/position") == pytest.approx(error.reply["position"])


def test_a_stop_of_another_axis_leaves_the_move_running(stage):
    with build_client(stage.address) as mover, build_client(stage.address) as operator:
        thread, outcome = move_in_background(mover, "y", 0.5)
        time.sleep(0.1)
        assert set(operator.stop("z")) == {"z"}
        thread.join(5)
        assert outcome.get("value") == 0.5


def test_writes_and_other_calls_wait_for_the_task(stage):
    with build_client(stage.address) as mover, build_client(stage.address) as other:
        thread, outcome = move_in_background(mover, "x", 0.4)
        time.sleep(0.1)
        t0 = time.monotonic()
        assert other.write("y/speed", 2.0) is True  # waits for the move: one call at a time
        assert time.monotonic() - t0 > 0.15
        thread.join(5)
        assert outcome["value"] == 0.4


def test_a_started_task_is_followed_waited_for_and_cancelled(stage):
    with build_client(stage.address) as client:
        task = client.start("move_abs", "x", 0.5)
        assert task.id and task.operation == "move_abs"
        assert not task.wait(0.1)
        progress = task.progress
        assert progress["axis"] == "x" and 0 <= progress["position"] <= 0.5
        assert task.result(5) == 0.5 and task.done() and task.state == "done"

        long = client.start("move_abs", "x", 20)
        time.sleep(0.3)
        assert long.cancel()["state"] in ("running", "cancelled")
        with pytest.raises(RemoteError) as info:
            long.result(2)
        assert info.value.type == "TaskCancelledError" and "task_cancel from" in str(info.value)
        assert long.status()["state"] == "cancelled"

        with pytest.raises(RemoteError) as unknown:
            client._request({"type": "task_status", "task": "nope-1"})
        assert unknown.value.type == "UnknownTaskError"


def test_a_budget_running_out_says_still_running_and_the_task_can_be_stopped(stage):
    with build_client(stage.address) as client:
        with pytest.raises(RemoteError) as info:
            client.call("move_abs", "x", 10, timeout=0.3)
        reply = info.value.reply
        assert info.value.type == "TimeoutError" and reply["still_running"] is True
        task_id = reply["task"]
        assert client._request({"type": "task_status", "task": task_id})["state"] == "running"
        status = client._request({"type": "task_cancel", "task": task_id})
        assert status["task"] == task_id
        time.sleep(0.2)
        assert client._request({"type": "task_status", "task": task_id})["state"] == "cancelled"


def test_a_stranger_cannot_stop_a_held_axis(stage):
    with (
        build_client(stage.address, resources=["x"], connect_kwargs={"name": "scan"}) as holder,
        build_client(stage.address) as stranger,
    ):
        task = holder.start("move_abs", "x", 0.5)
        with pytest.raises(RemoteError) as info:
            stranger.stop("x")
        assert info.value.type == "ResourceLockedError"
        with pytest.raises(RemoteError):
            stranger._request({"type": "task_cancel", "task": task.id})
        assert task.result(5) == 0.5


def test_the_asyncio_client_starts_and_cancels_tasks(stage):
    async def main() -> None:
        client = await build_async_client(stage.address)
        try:
            task = await client.start("move_abs", "x", 20)
            await asyncio.sleep(0.3)
            assert (await client.query("x/position")) > 0
            await task.cancel()
            with pytest.raises(RemoteError) as info:
                await task.result(2)
            assert info.value.type == "TaskCancelledError"
        finally:
            await client.close()

    asyncio.run(main())


def test_used_locally_a_task_operation_is_a_plain_method():
    stage = MotorStage(("x",), speed=100.0)
    with stage:
        assert stage.move_abs("x", 1.0) == 1.0
        assert stage.home() == {"x": 0.0}


def test_a_lock_holder_leaving_stops_its_task(stage):
    holder = build_client(stage.address, resources=["x"])
    task = holder.start("move_abs", "x", 20)
    time.sleep(0.3)
    holder.close()  # its locks end: its move must not go on
    with build_client(stage.address) as observer:
        assert wait_until(lambda: observer.ping()["task"] is None, 2)
        where = observer.query("x/position")
        time.sleep(0.2)
        assert observer.query("x/position") == where < 1
        status = observer._request({"type": "task_status", "task": task.id})
        assert status["state"] == "cancelled" and "its session released" in status["error"]["error"]


def test_a_server_stopped_during_a_move_brings_the_stage_to_rest():
    stage = MotorStage(("x",), speed=1.0, name="rest")
    server = build_server(stage, address="tcp://127.0.0.1:0").start()
    with build_client(server.address) as client:
        client.start("move_abs", "x", 50)
        time.sleep(0.3)
    server.stop()
    assert not stage.backend.moving("x") and stage.backend.position("x") < 1


def test_a_preempting_operation_started_as_a_task_waits_its_turn(stage):
    with build_client(stage.address) as client:
        move = client.start("move_abs", "x", 0.5)
        stop = client.start("stop", "x")  # a task like any other: after the move
        assert move.result(5) == 0.5
        assert stop.result(5) == {"x": 0.5}
        assert client.ping()["task"] is None
