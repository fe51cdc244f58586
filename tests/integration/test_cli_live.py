"""The CLI on a live stage, as subprocesses: `monitor`, a long `call` with its progress on a
pseudo-terminal, Ctrl+C stopping the move on the server, `--detach` and `task`. Bounded in time."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from labmesh import build_client, build_server
from labmesh.drivers.motor import MotorStage

from support import run_labmesh as cli

pytestmark = pytest.mark.integration


@pytest.fixture
def stage():
    server = build_server(
        MotorStage(("x", "y"), speed=5.0, limits={"x": (0, 100)}, name="cli-stage"),
        address="tcp://127.0.0.1:0",
    ).start()
    yield server
    server.stop()


def read_until(fd: int, needle: bytes, seconds: float) -> bytes:
    """What the terminal shows until `needle` appears (or `seconds` pass)."""
    seen = b""
    deadline = time.monotonic() + seconds
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the other end closed
                break
    return seen


def test_monitor_prints_one_json_line_per_update_during_a_move(stage):
    with build_client(stage.address) as client:
        # 0.8 s of positions: the monitor's interpreter may take half of that to start on a
        # busy machine (CI once saw only the last 2 of a 0.2 s move)
        client.start("move_abs", "y", 4.0)
        result = cli("--json", "monitor", stage.address, "y/position", "x/speed", "--seconds", "2")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    speeds = [line for line in lines if line["name"] == "x/speed"]
    positions = [line["value"] for line in lines if line["name"] == "y/position"]
    assert speeds[0]["value"] == 5.0 and speeds[0]["unit"] == "mm/s"
    assert positions == sorted(positions) and positions[-1] == 4.0 and len(positions) >= 3
    assert lines[0]["device"] == "cli-stage" and lines[0]["missed"] == 0


def test_monitor_without_json_is_one_line_per_update(stage):
    result = cli("monitor", stage.address, "x/position", "--seconds", "0.5")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("cli-stage") and "x/position" in line and line.endswith("0.0 mm")


def test_a_long_call_shows_progress_and_ctrl_c_stops_the_move_on_the_server(stage):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "call", stage.address, "move_abs", "x", "50"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,  # a terminal: the progress line is drawn there
    )
    os.close(slave)
    try:
        shown = read_until(master, b"position=", 10)
        assert b"move_abs('x', 50)" in shown and b"position=" in shown, shown
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl+C on that terminal sends
        shown += read_until(master, b"stopped task", 10)
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert code == 130
    assert b"interrupted; stopped task" in shown and b"stopped at" in shown, shown
    with build_client(stage.address) as client:
        where = client.query("x/position")
        assert 0 < where < 50
        time.sleep(0.3)
        assert client.query("x/position") == where  # it really stopped
        assert client.ping()["task"] is None


def test_detach_returns_at_once_and_task_follows_it(stage):
    started = cli("--json", "call", stage.address, "move_abs", "y", "2", "--detach")
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    assert info["operation"] == "move_abs" and info["task"]
    status = cli("--json", "task", stage.address, info["task"])
    assert json.loads(status.stdout)["state"] in ("running", "done")
    time.sleep(0.6)
    done = json.loads(cli("--json", "task", stage.address, info["task"]).stdout)
    assert done["state"] == "done" and done["result"] == 2.0


def test_a_plain_call_without_a_terminal_just_prints_the_result(stage):
    result = cli("call", stage.address, "move_abs", "x", "0.5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.5" and result.stderr == ""
