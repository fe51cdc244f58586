"""The NI-DAQ and motor drivers behind real servers on 127.0.0.1: per-line and per-axis locks,
budgets of long moves, and the real nidaqmx package on a host without the NI driver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from labmesh import RemoteError, build_client, build_server
from labmesh.drivers.motor import MotorStage
from labmesh.drivers.nidaq import (
    NO_DRIVER,
    CardInfo,
    DaqDriverMissingError,
    NIDaqDevice,
    NidaqmxBackend,
    SimulatedCard,
    expand_channels,
)
from labmesh.server import DeviceServer

from support import serve

pytestmark = pytest.mark.integration

LINE0, LINE1, LINE2 = "Dev1/port0/line0", "Dev1/port0/line1", "Dev1/port0/line2"


def simulated_card(**options) -> NIDaqDevice:
    options.setdefault("lines", ["port0/line0:3", "port1/line0"])
    return NIDaqDevice("Dev1", ai=["ai0:1"], ao=["ao0:1"], sim=True, name="daq-1", **options)


@pytest.fixture
def daq_server() -> Iterator[DeviceServer]:
    srv = serve(simulated_card())
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def stage_server() -> Iterator[DeviceServer]:
    stage = MotorStage(("x", "y", "z"), limits={"x": (0, 100)}, speed=100.0, name="stage-1")
    srv = serve(stage)
    try:
        yield srv
    finally:
        srv.stop()


def experiment(server: DeviceServer, name: str, resources=None):
    return build_client(
        server.address, resources=resources, connect_kwargs={"name": name}, timeout=3000
    )


# ---- NI-DAQ ---------------------------------------------------------------------------------
def test_two_experiments_each_lock_and_drive_their_own_line(daq_server):
    with (
        experiment(daq_server, "exp-A", LINE0) as a,
        experiment(daq_server, "exp-B", [LINE1]) as b,
    ):
        assert a.connection_info["resources"] == [LINE0]
        assert a.write_line(LINE0, True) is True
        assert b.write_line("port0/line1", True) is True  # the card's name is optional
        with pytest.raises(RemoteError, match=r"\['Dev1/port0/line0'\] held by \S+ \(exp-A\)") as e:
            b.write_line(LINE0, False)
        assert e.value.type == "ResourceLockedError"
        assert e.value.reply["holders"][0]["metadata"] == {"name": "exp-A"}
        assert e.value.reply["holders"][0]["resources"] == [LINE0]
        with pytest.raises(RemoteError, match=r"held by \S+ \(exp-A\)"):
            b.write_line("port0/line0", False)  # the short name touches the same line
        with pytest.raises(RemoteError, match=r"held by \S+ \(exp-A\)"):
            b.write(LINE0, False)  # so does the line's parameter
        with pytest.raises(RemoteError, match=r"\['Dev1/port0/line1'\] held by \S+ \(exp-B\)"):
            a.write_line(LINE1, False)
        # reads touch nothing, free lines and outputs are open, nothing was changed by refusals
        assert b.read_line(LINE0) is True and a.read_line("port0/line1") is True
        assert b.query(LINE0) is True
        assert b.write_line(LINE2, True) is True
        assert b.write_ao("ao1", -2.5) == -2.5
        # inspection works whoever holds what
        assert b.identity() == "NI-DAQmx,Simulated NI-DAQ (labmesh),Dev1,daq-1"
        assert b.check_operatability() is True
        holders = {row["resource"]: row["metadata"]["name"] for row in b.locks()["holders"]}
        assert holders == {LINE0: "exp-A", LINE1: "exp-B"}
    with experiment(daq_server, "exp-C", "Dev1/port0") as c:  # both released on close
        assert c.connection_info["resources"] == [f"Dev1/port0/line{i}" for i in range(4)]
        assert c.write_line(LINE0, False) is False


def test_a_locked_output_and_a_whole_port(daq_server):
    with (
        experiment(daq_server, "exp-A", ["Dev1/port1", "Dev1/ao0"]) as a,
        experiment(daq_server, "exp-B") as b,
    ):
        assert a.write_ao("Dev1/ao0", 1.25) == 1.25
        with pytest.raises(RemoteError, match=r"\['Dev1/ao0'\] held by \S+ \(exp-A\)"):
            b.write_ao("ao0", 0.0)
        with pytest.raises(RemoteError, match=r"\['Dev1/ao0'\] held by \S+ \(exp-A\)"):
            b.write("Dev1/ao0", 0.0)
        with pytest.raises(RemoteError, match=r"\['Dev1/port1/line0'\] held by \S+ \(exp-A\)"):
            b.write_line("port1/line0", True)
        assert b.query("Dev1/ao0") == 1.25  # the last value written through labmesh
        assert b.write_ao("ao1", 3.0) == 3.0


def test_analog_outputs_loop_back_to_inputs_in_the_simulator(daq_server):
    with experiment(daq_server, "exp-A") as a:
        assert a.query("Dev1/ao1") is None  # nothing written yet
        a.write_ao("ao1", 4.0)
        a.write("Dev1/ao0", -1.5)
        assert a.read_ai("Dev1/ai1") == pytest.approx(4.0, abs=0.02)
        samples = a.read_ai("ai0", samples=50)
        assert len(samples) == 50 and len(set(samples)) > 1  # noisy, around the output
        assert sum(samples) / 50 == pytest.approx(-1.5, abs=0.005)
        assert a.query("Dev1/ai0") == pytest.approx(-1.5, abs=0.02)
        assert a.channels() == {
            "lines": [f"Dev1/port0/line{i}" for i in range(4)] + ["Dev1/port1/line0"],
            "ai": ["Dev1/ai0", "Dev1/ai1"],
            "ao": ["Dev1/ao0", "Dev1/ao1"],
        }


def test_bad_values_and_unknown_channels_are_refused_clearly(daq_server):
    with (
        experiment(daq_server, "exp-A", "Dev1") as a,  # holds the whole card
        experiment(daq_server, "exp-B") as b,
    ):
        with pytest.raises(
            ValueError,
            match=r"daq-1: 12 V is outside the output range of "
            r"Dev1/ao0 \[-10, 10\] V \(set by ao_range\)",
        ):
            a.write_ao("ao0", 12)
        with pytest.raises(ValueError, match=r"12 is out of range for Dev1/ao0"):
            a.write("Dev1/ao0", 12)
        with pytest.raises(ValueError, match=r"Dev1/port0/line0 takes true or false"):
            a.write_line(LINE0, "high")
        with pytest.raises(ValueError, match=r"samples of Dev1/ai0 must be from 1 to 100000"):
            a.read_ai("ai0", samples=0)
        # an unknown channel is refused as unknown, not as locked, even while the card is held
        with pytest.raises(
            ValueError,
            match=r"daq-1: 'port0/line9' is not a configured digital line of Dev1; configured: "
            r"\['Dev1/port0/line0', ",
        ) as e:
            b.write_line("port0/line9", True)
        assert e.value.type == "ValueError"
        with pytest.raises(ValueError, match=r"'ai0' is not a configured analog output of Dev1"):
            b.write_ao("ai0", 1.0)
        with pytest.raises(RemoteError, match="held by"):
            b.write_line(LINE0, True)


def test_describe_shows_the_channel_tree_and_one_parameter_per_channel(daq_server):
    with experiment(daq_server, "exp-A") as a:
        description = a.describe()
    assert description["kind"] == "daq"
    assert description["resources"] == {
        "Dev1": {
            "port0": ["line0", "line1", "line2", "line3"],
            "port1": ["line0"],
            "ai0": None,
            "ai1": None,
            "ao0": None,
            "ao1": None,
        }
    }
    params = {p["name"]: p for p in description["doc"]["parameters"]["default"]}
    assert params[LINE0]["dtype"] == "bool"
    assert params["Dev1/ai0"]["read_only"] is True
    assert (params["Dev1/ao1"]["min_value"], params["Dev1/ao1"]["max_value"]) == (-10.0, 10.0)
    operations = {f["name"]: f for f in description["doc"]["functions"]}
    assert operations["write_line"]["resources"] == ["{line}"]
    assert operations["read_line"]["resources"] == []


def test_channel_specs_expand_ranges_and_take_the_card_name_or_not():
    assert expand_channels("Dev1", "port0/line0:2", "line") == [
        "Dev1/port0/line0",
        "Dev1/port0/line1",
        "Dev1/port0/line2",
    ]
    assert expand_channels("Dev2", ["Dev2/ai3:1", "ai3"], "ai") == [
        "Dev2/ai3",
        "Dev2/ai2",
        "Dev2/ai1",
    ]
    with pytest.raises(
        ValueError,
        match=r"'Dev2/ao0' does not name analog outputs of Dev1; write it like 'ao0' or "
        r"'Dev1/ao0' \(a range: 'ao0:7'\)",
    ):
        expand_channels("Dev1", ["Dev2/ao0"], "ao")
    with pytest.raises(ValueError, match=r"'ao0' does not name analog inputs of Dev1"):
        NIDaqDevice(ai=["ao0"], sim=True)
    with pytest.raises(ValueError, match="ao_range must be \\(min, max\\) with min < max"):
        NIDaqDevice(ao_range=(5, -5), sim=True)
    with pytest.raises(ValueError, match="no channels configured"):
        NIDaqDevice(lines=[], sim=True)
    with pytest.raises(ValueError, match="both name the card"):
        NIDaqDevice("Dev1", resource="Dev2", sim=True)
    card = NIDaqDevice(resource="PXI1Slot2", lines=["port0/line0"], sim=True)  # lab YAML form
    assert card.resources == {"PXI1Slot2": {"port0": ["line0"]}}
    assert isinstance(card.backend, SimulatedCard)
    assert isinstance(NIDaqDevice(sim=True, backend=NidaqmxBackend()).backend, SimulatedCard)


def test_a_real_card_missing_a_configured_channel_is_named_at_connect():
    class SixChannelCard(SimulatedCard):
        def open(self, device: str) -> CardInfo:
            return CardInfo("USB-6001", {"line": [LINE0, LINE1], "ai": ["Dev1/ai0"], "ao": []})

    device = NIDaqDevice(lines=["port0/line0:1"], ao=["ao0"], backend=SixChannelCard())
    with pytest.raises(
        ValueError,
        match=r"Dev1 \(USB-6001\) has no channel\(s\) \['Dev1/ao0'\]; its lines: "
        r"\['Dev1/port0/line0', 'Dev1/port0/line1'\], analog inputs: \['Dev1/ai0'\], "
        r"analog outputs: \[\]; fix lines/ai/ao",
    ):
        build_server(device, address="tcp://127.0.0.1:0").start()


def test_without_the_ni_driver_the_server_does_not_start_and_says_why():
    """The real nidaqmx 1.7 package; this host has no NI-DAQmx, so it raises DaqNotFoundError."""
    device = NIDaqDevice("Dev1", lines=["port0/line0"], name="daq-real")
    assert isinstance(device.backend, NidaqmxBackend)
    with pytest.raises(DaqDriverMissingError) as e:
        build_server(device, address="tcp://127.0.0.1:0").start()
    assert str(e.value) == f"Dev1: {NO_DRIVER}"
    assert NO_DRIVER == (
        "NI-DAQmx driver not installed on this host (install NI-DAQmx, or run with sim: true)"
    )
    assert isinstance(e.value, RuntimeError)


def test_without_the_ni_driver_a_call_fails_with_the_same_clear_error_over_the_wire():
    """Skip only the card lookup; the write itself goes through the real nidaqmx package."""

    class FoundCard(NidaqmxBackend):
        def open(self, device: str) -> CardInfo:
            return CardInfo("USB-6001")

    srv = serve(NIDaqDevice("Dev1", lines=["port0/line0"], ai=["ai0"], backend=FoundCard()))
    try:
        with experiment(srv, "exp-A", LINE0) as a:
            with pytest.raises(RemoteError) as e:
                a.write_line(LINE0, True)
            assert e.value.type == "DaqDriverMissingError"
            assert str(e.value) == f"{LINE0}: {NO_DRIVER}"
            with pytest.raises(RemoteError, match=r"^Dev1/ai0: NI-DAQmx driver not installed"):
                a.read_ai("ai0")
            assert a.ping()["healthy"] is True
    finally:
        srv.stop()


# ---- motor ----------------------------------------------------------------------------------
def test_a_move_past_its_budget_times_out_and_the_next_move_waits_for_it(stage_server):
    with experiment(stage_server, "exp-A", "x") as a:
        started = time.monotonic()
        with pytest.raises(TimeoutError) as e:
            a.move_abs("x", 50, timeout=0.2)  # 0.5 s at 100 mm/s
        answered = time.monotonic() - started
        assert isinstance(e.value, RemoteError) and e.value.still_running is True
        # answered at the budget, not when the move ended: still_running above says the move
        # was under way when the TimeoutError was sent
        assert answered > 0.15
        # queued behind the running move: starts from 50 once it has arrived
        assert a.move_rel("x", 10, timeout=5) == 60.0
        assert time.monotonic() - started >= 0.5 + 0.1 - 0.02
        assert a.position("x") == 60.0
        assert a.query("x/position") == 60.0


def test_axes_are_locked_one_by_one(stage_server):
    with (
        experiment(stage_server, "exp-A", ["x"]) as a,
        experiment(stage_server, "exp-B", ["y"]) as b,
    ):
        assert a.move_abs("x", 10) == 10.0
        assert b.move_abs("y", -5) == -5.0
        with pytest.raises(RemoteError, match=r"\['x'\] held by \S+ \(exp-A\)") as e:
            b.move_abs("x", 20)
        assert e.value.type == "ResourceLockedError"
        with pytest.raises(RemoteError, match=r"\['x'\] held by \S+ \(exp-A\)"):
            b.home()  # every axis
        with pytest.raises(RemoteError, match=r"\['x'\] held by \S+ \(exp-A\)"):
            b.write("x/speed", 1.0)
        with pytest.raises(RemoteError, match=r"\['y'\] held by \S+ \(exp-B\)"):
            a.stop("y")
        assert b.write("y/speed", 200.0) is True
        assert b.home("y") == {"y": 0.0}
        assert a.move_rel("z", 1.0) == 1.0  # z is held by nobody
        assert b.position("x") == 10.0 and b.positions() == {"x": 10.0, "y": 0.0, "z": 1.0}
        # the soft limits and unknown axes are refused by the stage, with what to do
        with pytest.raises(
            ValueError,
            match=r"stage-1: move of axis x to 150 refused: 150 mm is outside the "
            r"soft limits of axis x \[0, 100\] mm",
        ):
            a.move_abs("x", 150)
        # an unknown axis names no resource: checked as the whole stage (x is held), and said so
        with pytest.raises(
            RemoteError,
            match=r"resource locked: \['x'\] held by .* \(move_abs names \['w'\], not a "
            r"resource of stage-1: \['x', 'y', 'z'\]; so it was checked as the whole device\)",
        ):
            b.move_abs("w", 1)
        assert b.identity() == "labmesh,MotorStage,stage-1,SimulatedMotion"
        description = b.describe()
        assert description["kind"] == "motor" and description["resources"] == ["x", "y", "z"]
        assert description["budgets"] == {"home": 120.0, "move_abs": 60.0, "move_rel": 60.0}


def test_moves_of_two_experiments_on_their_own_axes_run_one_after_the_other(stage_server):
    with (
        experiment(stage_server, "exp-A", ["x"]) as a,
        experiment(stage_server, "exp-B", ["y"]) as b,
    ):
        done: dict[str, float] = {}
        started = time.monotonic()

        def move_x() -> None:
            a.move_abs("x", 40, timeout=5)  # 0.4 s
            done["x"] = time.monotonic() - started

        mover = threading.Thread(target=move_x)
        mover.start()
        try:
            time.sleep(0.1)
            assert b.ping()["busy"] is True  # the server answers while x moves
            assert b.move_abs("y", 20, timeout=5) == 20.0  # 0.2 s, after x has arrived
            done["y"] = time.monotonic() - started
        finally:
            mover.join(5)
        assert not mover.is_alive()
        assert done["x"] == pytest.approx(0.4, abs=0.15)
        assert done["y"] >= done["x"] + 0.2 - 0.02  # not refused, not overlapped: queued
        assert b.positions() == {"x": 40.0, "y": 20.0, "z": 0.0}
