"""The CLI end to end, as subprocesses, against a running `labmesh demo`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from labmesh.discovery import DeviceRecord, Registrar

from support import run_labmesh, running_demo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo():
    with running_demo() as lab:
        yield {**lab, "ready_s": float(lab["banner"][-1].split()[2])}


def cli(demo, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return run_labmesh(*args, env={"LABMESH_DISCOVERY": demo["endpoint"]}, timeout=timeout)


def test_demo_is_ready_quickly_and_says_where_things_are(demo):
    assert demo["ready_s"] < 3.0
    text = "\n".join(demo["banner"])
    for name in ("pm100-a", "daq-1", "stage", "discovery"):
        assert name in text
    assert f"LABMESH_DISCOVERY={demo['endpoint']}" in text and "build_client(" in text
    assert "metrics http://127.0.0.1:" in text


def test_ls(demo):
    result = cli(demo, "--json", "ls")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"pm100-a", "daq-1", "stage"}
    assert rows["pm100-a"]["host"] == "optics-pc" and rows["stage"]["kind"] == "motor"
    assert all(r["up"] and r["healthy"] for r in rows.values())
    table = cli(demo, "ls").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "KIND", "HOST", "ADDRESS", "UP"]
    assert len(table) == 4


def test_get_set_call_describe(demo):
    assert cli(demo, "set", "pm100-a", "WAVELENGTH", "1064").stdout.strip() == "ok"
    got = cli(demo, "--json", "get", "pm100-a", "WAVELENGTH")
    assert json.loads(got.stdout) == 1064.0
    power = cli(demo, "get", "pm100-a", "POWER")
    assert power.returncode == 0 and float(power.stdout) > 0
    moved = cli(demo, "--json", "call", "stage", "move_abs", "x", "position=12.5")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout) == 12.5
    desc = json.loads(cli(demo, "--json", "describe", "daq-1").stdout)
    assert desc["kind"] == "daq" and "write_line" in desc["methods"]
    human = cli(demo, "describe", "stage").stdout
    assert "Operations:" in human and "move_abs" in human


def test_locks_for_one_device_and_all(demo):
    from labmesh import build_client

    with build_client(
        "daq-1",
        discovery=demo["endpoint"],
        resources="Dev1/port0/line3",
        connect_kwargs={"name": "cli-test"},
    ):
        one = json.loads(cli(demo, "--json", "locks", "daq-1").stdout)
        assert [(h["resource"], h["metadata"]["name"]) for h in one["holders"]] == [
            ("Dev1/port0/line3", "cli-test")
        ]
        everything = json.loads(cli(demo, "--json", "locks").stdout)
        assert [(h["device"], h["resource"]) for h in everything] == [("daq-1", "Dev1/port0/line3")]
        refused = cli(demo, "call", "daq-1", "write_line", "Dev1/port0/line3", "false")
        assert refused.returncode == 1
        assert refused.stderr.startswith("labmesh: daq-1: ResourceLockedError: resource locked")
        assert "cli-test" in refused.stderr and "Traceback" not in refused.stderr
        assert "cli-test (1)" in cli(demo, "ls").stdout


def test_watch_prints_changes(demo):
    watch = subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", "--json", "watch", "--seconds", "4"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "LABMESH_DISCOVERY": demo["endpoint"]},
    )
    try:
        time.sleep(1.0)
        registrar = Registrar([demo["endpoint"]], ttl_s=3).start()
        registrar.add(
            DeviceRecord(
                name="visitor",
                address="tcp://127.0.0.1:1",
                instance="v1",
                kind="test",
                host="elsewhere",
            )
        )
        assert registrar.wait_registered(5)
        registrar.stop()
        out, _ = watch.communicate(timeout=15)
    finally:
        if watch.poll() is None:
            watch.kill()
    events = [(e["event"], e["name"]) for e in map(json.loads, out.splitlines())]
    assert ("added", "visitor") in events and ("removed", "visitor") in events


def test_errors_are_one_line_with_exit_codes(demo):
    unknown = cli(demo, "get", "nosuch", "X")
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1
    assert "nosuch" in unknown.stderr
    bad_value = cli(demo, "set", "pm100-a", "WAVELENGTH", "5")
    assert bad_value.returncode == 1
    assert bad_value.stderr.startswith("labmesh: pm100-a: ValueError: 5 is out of range")
    usage = cli(demo, "get")
    assert usage.returncode == 2
    debug = cli(demo, "--debug", "get", "pm100-a", "NOPE")
    assert debug.returncode == 1  # the same exit code; --debug adds the traceback
    assert "Traceback" in debug.stderr and "pm100-a has no parameter 'NOPE'" in debug.stderr


def test_common_flags_work_after_the_command_too(demo):
    """Issue 16: `labmesh ls --json`, `get ... --json`, `ls --timeout 500` were refused."""
    rows = json.loads(cli(demo, "ls", "--json").stdout)
    assert {r["name"] for r in rows} == {"pm100-a", "daq-1", "stage"}
    wavelength = json.loads(cli(demo, "get", "pm100-a", "WAVELENGTH", "--json").stdout)
    assert wavelength > 0
    table = cli(demo, "ls", "--timeout", "500")
    assert table.returncode == 0, table.stderr
    assert sorted(line.split()[0] for line in table.stdout.splitlines()[1:]) == [
        "daq-1",
        "pm100-a",
        "stage",
    ]
    helptext = cli(demo, "get", "--help").stdout
    assert "--json" in helptext and "--timeout" in helptext and "--discovery" in helptext
    # given before and after: the later one wins, the earlier one is not reset
    late = cli(demo, "--json", "get", "pm100-a", "WAVELENGTH", "--timeout", "900")
    assert late.returncode == 0, late.stderr
    assert json.loads(late.stdout) == wavelength


def test_values_and_names_are_read_forgivingly_and_unambiguously(demo):
    for text, expected in (("True", True), ("false", False), ("1", True), ("off", False)):
        assert cli(demo, "set", "daq-1", "Dev1/port0/line5", text).stdout.strip() == "ok"
        got = cli(demo, "--json", "get", "daq-1", "Dev1/port0/line5")
        assert json.loads(got.stdout) is expected
    bad = cli(demo, "set", "daq-1", "Dev1/port0/line5", "maybe")
    assert bad.returncode == 2
    assert "takes a bool: true or false (also 1/0, yes/no, on/off), got 'maybe'" in bad.stderr
    number = cli(demo, "set", "pm100-a", "WAVELENGTH", "eight hundred")
    assert (
        number.returncode == 2 and "WAVELENGTH takes a float, got 'eight hundred'" in number.stderr
    )
    lower = cli(demo, "get", "pm100-a", "power")
    assert lower.returncode == 1
    assert "did you mean 'POWER'? (parameter names are case-sensitive)" in lower.stderr
    unit = cli(demo, "set", "pm100-a", "POWER_UNIT", "dbm")
    assert (
        unit.returncode == 1 and "did you mean 'DBM'? (options are case-sensitive)" in unit.stderr
    )
    op = cli(demo, "call", "stage", "move_absolute", "x", "1")
    assert op.returncode == 1 and "did you mean 'move_abs'?" in op.stderr
    # host:port is an address (no device name has a colon): it reaches that very device
    for row in json.loads(cli(demo, "--json", "ls").stdout):
        described = cli(demo, "--json", "describe", row["address"].removeprefix("tcp://"))
        assert described.returncode == 0, described.stderr
        assert json.loads(described.stdout)["name"] == row["name"]


def test_json_errors_are_json_with_the_same_exit_codes(demo):
    unknown = cli(demo, "get", "nosuch", "X", "--json")
    error = json.loads(unknown.stderr)
    assert unknown.returncode == 1 == error["exit"] and error["type"] == "UnknownDeviceError"
    refused = cli(demo, "--json", "set", "pm100-a", "WAVELENGTH", "5")
    error = json.loads(refused.stderr)
    assert refused.returncode == 1 and error["type"] == "ValueError"
    assert error["device"] == "pm100-a" and "out of range" in error["error"]
    usage = cli(demo, "--json", "serve", "a.yaml", "b.yaml")
    assert usage.returncode == 2 and json.loads(usage.stderr)["exit"] == 2


def test_describe_is_complete(demo):
    text = cli(demo, "describe", "pm100-a").stdout
    assert "AVERAGING: int, >= 1" in text, text
    stage = cli(demo, "describe", "stage").stdout
    assert "move_abs(axis: str, position: float" in stage
    assert "Moving, homing or stopping axis" in stage  # the whole docstring, not its first line
    assert "home(axis: str | None = None) -> dict[str, float]" in stage
    daq = cli(demo, "describe", "daq-1").stdout.split("Lockable resources:")[1]
    assert "\n  Dev1/\n    port0/\n      line0\n" in daq


def test_locks_has_a_header(demo):
    from labmesh import build_client

    with build_client("daq-1", discovery=demo["endpoint"], resources="Dev1/port0/line6"):
        one = cli(demo, "locks", "daq-1").stdout.splitlines()
        assert one[0].split()[:3] == ["RESOURCE", "HOLDER", "NAME"]
        assert [line.split()[0] for line in one[1:]] == ["Dev1/port0/line6"]
        everything = cli(demo, "locks").stdout.splitlines()
        assert everything[0].split()[:3] == ["DEVICE", "RESOURCE", "HOLDER"]
        assert [line.split()[:2] for line in everything[1:]] == [["daq-1", "Dev1/port0/line6"]]


@pytest.mark.parametrize(
    "command", [["watch"], ["monitor", "pm100-a", "WAVELENGTH"]], ids=["watch", "monitor"]
)
def test_ctrl_c_ends_watch_and_monitor_with_130(demo, command):
    proc = subprocess.Popen(
        [sys.executable, "-m", "labmesh.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LABMESH_DISCOVERY": demo["endpoint"]},
    )
    try:
        time.sleep(1.5)  # watching
        proc.send_signal(signal.SIGINT)  # our own child, by its PID
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_stops_the_whole_lab(demo):
    proc = demo["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert "labmesh demo: stopped" in proc.stdout.read()
    # every port of the lab is free again (as a server would rebind it): nothing left behind
    for port in (demo["base"], demo["base"] + 5, demo["base"] + 6, demo["base"] + 7):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
