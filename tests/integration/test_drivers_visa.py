"""VISA drivers with real pyvisa: the PM100 and the SCPI example on pyvisa-sim, and both on
pyvisa-py against a TCP SCPI emulator (timeouts, garbled replies), served over real sockets."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from labmesh import RemoteError, build_client, build_server
from labmesh.drivers.powermeter import SENSOR_HEADS, PowermeterDevice
from labmesh.drivers.scpi import MAPS_DIR, ScpiDevice, ScpiMapError, load_parameter_map
from labmesh.drivers.visa import (
    MAX_QUEUED_ERRORS,
    SIM_DIR,
    InstrumentConnectionError,
    load_sim_definition,
)
from scpi_emulator import ScpiEmulator

pytestmark = pytest.mark.integration

PM100 = "USB0::0x1313::0x8078::P0000001::INSTR"
SHORT_MS = 300


@contextlib.contextmanager
def served(device, **client_options) -> Iterator:
    """The device behind a real server on 127.0.0.1, and a client of it; both closed after."""
    server = build_server(device, address="tcp://127.0.0.1:0").start()
    try:
        with build_client(server.address, timeout=5000, **client_options) as client:
            yield client
    finally:
        server.stop()


def pm100_yaml(tmp_path: Path, **replace: str) -> str:
    """A private copy of the shipped PM100 simulation, text replaced, as a visa_library."""
    text = (SIM_DIR / "pm100.yaml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"pm100-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(text)
    return f"{path}@sim"


def pm100_replies(**changes: str) -> dict[str, str]:
    """What the emulator answers as a PM100D with an S155C head."""
    replies = {
        "*IDN?": "Thorlabs,PM100D,P0000002,2.8.0",
        "SYST:SENS:IDN?": "S155C,00000002,01-Jan-2024,1,18,289",
        "SENS:POW:UNIT?": "W",
        "SENS:CORR:WAV?": "1.064000E+03",
        "SENS:AVER:COUN?": "1",
        "SENS:POW:RANG:AUTO?": "1",
        "SENS:POW:RANG?": "2.000000E-02",
        "MEAS:POW?": "1.000000E-03",
    }
    replies.update(changes)
    return replies


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the PM100 on pyvisa-sim ---------------------------------------------------------------
def test_seed_example_against_the_simulated_pm100():
    server = build_server(
        PowermeterDevice(PM100, sensor_type="S155C", sim=True), address="tcp://127.0.0.1:0"
    ).start()
    try:
        with build_client(server.address, timeout=5000) as client:
            assert 800.0 <= client.query("WAVELENGTH") <= 1700.0
            assert client.write("WAVELENGTH", 1064) is True
            assert client.query("WAVELENGTH") == 1064.0
            power = client.query("POWER")
            assert isinstance(power, float) and 0.9e-3 < power < 1.1e-3
            described = client.describe()
            assert described["kind"] == "powermeter"
            assert "WAVELENGTH: float nm, 800 to 1700" in client.help()
    finally:
        server.stop()


def test_wavelength_outside_the_head_is_refused_naming_its_limits():
    with served(PowermeterDevice(PM100, sensor_type="S155C", sim=True)) as client:
        for wrong in (700, 1800.5):
            with pytest.raises(ValueError, match=r"from 800\.0 to 1700\.0 nm") as info:
                client.write("WAVELENGTH", wrong)
            assert isinstance(info.value, RemoteError) and "WAVELENGTH" in str(info.value)
        assert client.write("WAVELENGTH", 1550) is True
        assert client.query("WAVELENGTH") == 1550.0
        with pytest.raises(ValueError, match="read-only"):
            client.write("POWER", 1.0)
    with served(PowermeterDevice(PM100, sensor_type="S120C", sim=True)) as client:
        assert client.write("WAVELENGTH", 532) is True
        with pytest.raises(ValueError, match=r"from 400\.0 to 1100\.0 nm"):
            client.write("WAVELENGTH", 1550)
        with pytest.raises(ValueError, match=r"RANGE.*from 5e-08 to 0\.05 W"):
            client.write("RANGE", 1.0)


def test_identity_sensor_and_operatability_over_the_network():
    with served(PowermeterDevice(PM100, sensor_type="s155c ", sim=True, name="pm100-a")) as client:
        assert client.identity() == "Thorlabs,PM100D,P0000001,2.8.0"
        assert client.sensor() == {
            "model": "S155C",
            "kind": "photodiode",
            "detector": "InGaAs",
            "wavelength_nm": [800.0, 1700.0],
            "power_w": [5e-11, 0.02],
        }
        assert client.check_operatability() is True
        assert client.check_errors() == []
        described = client.describe()
        assert described["name"] == "pm100-a"
        assert {"zero", "sensor", "identity", "check_errors"} <= set(described["methods"])


def test_settings_round_trip_and_zero():
    with served(PowermeterDevice(PM100, sim=True)) as client:
        assert client.query("AVERAGING") == 1
        assert client.write("AVERAGING", 100) is True
        assert client.query("AVERAGING") == 100
        assert client.query("AUTORANGE") is True
        assert client.write("AUTORANGE", False) is True
        assert client.query("AUTORANGE") is False
        assert client.write("RANGE", 1e-3) is True
        assert client.query("RANGE") == 1e-3
        assert client.write("POWER_UNIT", "DBM") is True
        assert client.query("POWER_UNIT") == "DBM"
        with pytest.raises(
            ValueError, match=r"not an option of POWER_UNIT; allowed: \['W', 'DBM'\]"
        ):
            client.write("POWER_UNIT", "mW")
        with pytest.raises(ValueError, match=r"AVERAGING; allowed: an? int >= 1"):
            client.write("AVERAGING", 0)
        assert client.zero() == pytest.approx(1.25e-10)
        assert client.check_errors() == []


@pytest.mark.parametrize("no_error", ['0,"No error"', '+0,"No error"'])
def test_check_errors_accepts_both_no_error_dialects(tmp_path, no_error):
    library = pm100_yaml(tmp_path, **{"default: '0,\"No error\"'": f"default: '{no_error}'"})
    device = PowermeterDevice(PM100, visa_library=library, timeout_ms=SHORT_MS)
    with device:
        assert device.session.query("SYST:ERR?") == no_error
        assert device.check_errors() == []
        # a value the instrument refuses, sent around the driver's own validation
        device.session.write("SENS:CORR:WAV 5000")
        device.session.write("SENS:CORR:WAV 6000")
        assert device.check_errors() == ['-100,"Command error"', '-100,"Command error"']
        assert device.check_errors() == []
        assert device.write("WAVELENGTH", 900) is True


def test_a_setting_the_instrument_refuses_is_an_error_naming_the_command(tmp_path):
    # the simulated console takes only up to 1500 nm: the driver's S155C limits let 1600 through
    library = pm100_yaml(tmp_path, **{"max: 1700.0": "max: 1500.0"})
    with served(PowermeterDevice(PM100, visa_library=library, name="pm100-b")) as client:
        with pytest.raises(ValueError) as info:
            client.write("WAVELENGTH", 1600)
        message = str(info.value)
        assert "pm100-b" in message and "'SENS:CORR:WAV 1600'" in message
        assert '-100,"Command error"' in message
        assert client.check_errors() == []  # the refusal emptied the queue
        assert client.query("WAVELENGTH") == 1064.0


def test_unknown_sensor_type_lists_the_known_heads():
    with pytest.raises(ValueError) as info:
        PowermeterDevice(PM100, sensor_type="S999X", sim=True, name="pm100-c")
    message = str(info.value)
    assert message.startswith("pm100-c: unknown Thorlabs sensor head 'S999X'")
    assert all(model in message for model in SENSOR_HEADS)


def test_missing_resource_is_a_clear_error(tmp_path):
    missing = "USB0::0x1313::0x8078::P9999999::INSTR"
    device = PowermeterDevice(missing, visa_library=pm100_yaml(tmp_path), name="pm100-a")
    expected = (
        f"pm100-a: VISA resource {missing} not found (is the USB cable in, libusb installed "
        "(Debian: apt install libusb-1.0-0), the device readable by this user (a udev rule: "
        "docs/troubleshooting.md), and, in a container, /dev/bus/usb passed in? `labmesh visa "
        "list` shows what this PC sees)"
    )
    with pytest.raises(InstrumentConnectionError) as info:
        device.connect()
    assert str(info.value) == expected and isinstance(info.value, ConnectionError)
    assert not device.session.is_open
    server = build_server(device, address="tcp://127.0.0.1:0")
    with pytest.raises(ConnectionError, match=re.escape(expected)):
        server.start()
    assert not server.running


def test_sim_binds_any_resource_and_instances_keep_their_own_state():
    a = PowermeterDevice("USB0::0x1313::0x8072::P2001234::INSTR", "S121C", sim=True, name="a")
    b = PowermeterDevice("USB0::0x1313::0x8072::P2001234::INSTR", "S121C", sim=True, name="b")
    with a, b:
        assert a.write("WAVELENGTH", 633) and b.write("WAVELENGTH", 980)
        assert (a.query("WAVELENGTH"), b.query("WAVELENGTH")) == (633.0, 980.0)
        assert a.sensor()["model"] == "S121C"
    assert not a.check_operatability()
    with pytest.raises(ValueError, match="either sim=True or visa_library"):
        PowermeterDevice(PM100, sim=True, visa_library="@py")


# ---- the PM100 on pyvisa-py against the SCPI emulator ---------------------------------------
def test_an_unanswered_query_times_out_naming_it_and_the_server_carries_on():
    emulator = ScpiEmulator(pm100_replies(), silent={"MEAS:POW?"}).start()
    try:
        device = PowermeterDevice(
            emulator.resource, visa_library="@py", timeout_ms=SHORT_MS, name="pm100-t"
        )
        with served(device) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                client.query("POWER")
            assert time.monotonic() - started < 3.0
            message = str(info.value)
            assert message.startswith(f"pm100-t: no answer from {emulator.resource}")
            assert "'MEAS:POW?'" in message and f"{SHORT_MS} ms" in message
            assert info.value.reply["command"] == "MEAS:POW?"
            assert client.query("WAVELENGTH") == 1064.0
            assert client.ping()["healthy"] is True
            emulator.silent.clear()
            assert client.query("POWER") == 1e-3
    finally:
        emulator.stop()


def test_garbled_replies_name_the_parameter_and_the_raw_reply():
    replies = pm100_replies(**{"SENS:CORR:WAV?": "1O64.0#!", "MEAS:POW?": "garbage"})
    emulator = ScpiEmulator(replies).start()
    try:
        device = PowermeterDevice(emulator.resource, visa_library="@py", timeout_ms=SHORT_MS)
        with served(device) as client:
            with pytest.raises(
                ValueError, match=re.escape("WAVELENGTH: the instrument answered '1O64.0#!'")
            ):
                client.query("WAVELENGTH")
            with pytest.raises(ValueError) as info:
                client.query("POWER")
            assert "POWER" in str(info.value) and "'garbage'" in str(info.value)
            assert "'MEAS:POW?'" in str(info.value)
            emulator.replies["MEAS:POW?"] = "9.9E37"
            with pytest.raises(ValueError, match="POWER is over range"):
                client.query("POWER")
            assert client.query("AVERAGING") == 1
    finally:
        emulator.stop()


def test_dbm_readings_are_reported_in_watts():
    emulator = ScpiEmulator(pm100_replies(**{"MEAS:POW?": "-30.0"})).start()
    try:
        device = PowermeterDevice(emulator.resource, visa_library="@py", timeout_ms=SHORT_MS)
        with device:
            assert device.query("POWER") == -30.0  # the display unit is W
            assert device.write("POWER_UNIT", "DBM") is True
            assert "SENS:POW:UNIT DBM" in emulator.received
            assert device.query("POWER") == pytest.approx(1e-6)
        emulator.replies["SENS:POW:UNIT?"] = "DBM"
        with device:  # a meter already showing dBm is read as such from the start
            assert device.query("POWER") == pytest.approx(1e-6)
    finally:
        emulator.stop()


def test_a_different_head_on_the_console_refuses_to_start():
    replies = pm100_replies(**{"SYST:SENS:IDN?": "S121C,00000003,01-Jan-2024,1,18,289"})
    emulator = ScpiEmulator(replies).start()
    try:
        device = PowermeterDevice(
            emulator.resource, "S155C", visa_library="@py", timeout_ms=SHORT_MS, name="pm100-h"
        )
        with pytest.raises(ValueError, match="is a S121C, but sensor_type is S155C"):
            device.connect()
        assert not device.session.is_open
    finally:
        emulator.stop()


def test_a_console_that_cannot_name_its_head_still_starts_with_a_clean_error_queue(caplog):
    replies = pm100_replies()
    del replies["SYST:SENS:IDN?"]  # older firmware: an unknown query, no answer, -113 queued
    emulator = ScpiEmulator(replies).start()
    try:
        device = PowermeterDevice(emulator.resource, visa_library="@py", timeout_ms=SHORT_MS)
        with device:
            assert "does not say which head is attached" in caplog.text
            assert "Undefined header" in caplog.text
            assert device.write("WAVELENGTH", 1310) is True
            assert device.query("WAVELENGTH") == 1310.0
    finally:
        emulator.stop()


def test_check_errors_reads_a_bounded_number_of_entries():
    emulator = ScpiEmulator(pm100_replies(), no_error='+0,"No error"').start()
    try:
        device = PowermeterDevice(emulator.resource, visa_library="@py", timeout_ms=SHORT_MS)
        with device:
            assert device.check_errors() == []
            emulator.errors.extend(['-222,"Data out of range"', '-113,"Undefined header"'])
            assert device.check_errors() == ['-222,"Data out of range"', '-113,"Undefined header"']
            emulator.no_error = '-350,"Queue overflow"'  # an instrument whose queue never empties
            assert device.check_errors() == ['-350,"Queue overflow"'] * MAX_QUEUED_ERRORS
    finally:
        emulator.stop()


def test_an_unreachable_tcp_instrument_is_a_clear_error():
    port = closed_port()
    device = PowermeterDevice(
        f"TCPIP::127.0.0.1::{port}::SOCKET", visa_library="@py", timeout_ms=SHORT_MS, name="pm"
    )
    with pytest.raises(ConnectionError, match=f"reachable at 127.0.0.1:{port}"):
        device.connect()
    assert not device.session.is_open
    with pytest.raises(InstrumentConnectionError, match="is not open"):
        device.identity()


# ---- the generic SCPI device ----------------------------------------------------------------
def test_the_example_map_works_in_sim_over_the_network():
    with served(ScpiDevice("ASRL1::INSTR", MAPS_DIR / "dc_supply.yaml", sim=True)) as client:
        described = client.describe()
        assert described["name"] == "dc_supply" and described["kind"] == "powersupply"
        assert "VOLTAGE: float V, 0 to 30" in client.help()
        assert client.identity() == "labmesh,SIM-DC-SUPPLY,0001,1.0"
        assert client.query("VOLTAGE") == 0.0
        assert client.write("VOLTAGE", 12.5) is True
        assert client.query("VOLTAGE") == 12.5
        assert client.write("OUTPUT", True) is True
        assert client.query("OUTPUT") is True
        assert 0.0 <= client.query("MEASURED_VOLTAGE") <= 0.01
        with pytest.raises(ValueError, match=r"from 0 to 3 A"):
            client.write("CURRENT", 5)
        with pytest.raises(ValueError, match="read-only"):
            client.write("MEASURED_CURRENT", 1.0)
        assert client.check_errors() == []


def test_a_map_drives_a_real_socket_instrument():
    scpi_map = {
        "identity": "*IDN?",
        "parameters": {
            "SETPOINT": {"query": "SOUR:VOLT?", "write": "SOUR:VOLT {value:.3f}", "unit": "V"},
            "MODE": {
                "query": "FUNC?",
                "write": "FUNC {value}",
                "type": "str",
                "options": ["CV", "CC"],
            },
            "ENABLED": {"query": "OUTP?", "write": "OUTP {value}", "type": "bool"},
            "TRIGGER": {"write": "TRIG:DEL {value}", "type": "int"},
        },
    }
    replies = {"*IDN?": "ACME,PSU-1,7,1.0", "SOUR:VOLT?": "0.000", "FUNC?": "CV", "OUTP?": "OFF"}
    emulator = ScpiEmulator(replies).start()
    try:
        device = ScpiDevice(emulator.resource, scpi_map, visa_library="@py", timeout_ms=SHORT_MS)
        with served(device) as client:
            assert client.describe()["name"] == "scpi"
            assert client.write("SETPOINT", 5) is True
            assert client.query("SETPOINT") == 5.0
            assert client.write("ENABLED", True) is True
            assert client.query("ENABLED") is True
            assert client.write("MODE", "CC") is True and client.query("MODE") == "CC"
            with pytest.raises(ValueError, match="write-only"):
                client.query("TRIGGER")
            with pytest.raises(
                ValueError, match=r"refused 'TRIG:DEL 3': -113,\"Undefined header\""
            ):
                client.write("TRIGGER", 3)
        assert [
            line
            for line in emulator.received
            if line.split(" ")[0] in ("SOUR:VOLT", "OUTP", "FUNC")
        ] == ["SOUR:VOLT 5.000", "OUTP 1", "FUNC CC"]
    finally:
        emulator.stop()


@pytest.mark.parametrize(
    ("scpi_map", "expected"),
    [
        ({}, "<dict>: parameters: expected a mapping of parameter names"),
        (
            {"parameters": {"V": {"query": "V?"}}, "identiy": "*IDN?"},
            "<dict>: identiy: unknown key; expected one of kind, identity, errors",
        ),
        (
            {"parameters": {"V": {"query": "V?", "maxx": 3}}},
            "<dict>: parameters.V.maxx: unknown key; expected one of query, write",
        ),
        (
            {"parameters": {"V": {"query": "V?", "type": "double"}}},
            "<dict>: parameters.V.type: expected one of float, int, bool, str, got 'double'",
        ),
        (
            {"parameters": {"V": {"write": "VOLT"}}},
            "<dict>: parameters.V.write: expected a command with a {value} field",
        ),
        (
            {"parameters": {"V": {"write": "VOLT {}"}}},
            "<dict>: parameters.V.write: expected a command with a {value} field",
        ),
        (
            {"parameters": {"V": {"query": "V?", "min": "low"}}},
            "<dict>: parameters.V.min: expected a number, got 'low'",
        ),
        (
            {"parameters": {"V": {"query": "V?", "min": 5, "max": 1}}},
            "<dict>: parameters.V: parameter V: min 5 > max 1",
        ),
        (
            {"parameters": {"V": {"query": "V?", "type": "str", "options": ["A", 1]}}},
            "<dict>: parameters.V.options: 1 is not a str",
        ),
        (
            {"parameters": {"V": {"query": "V?", "write": "V {value}", "read_only": True}}},
            "<dict>: parameters.V: read_only is true but a write command is given",
        ),
        (
            {"parameters": {"V": {"type": "float"}}},
            "<dict>: parameters.V: expected a query, a write command, or both",
        ),
        ({"parameters": {"2V": {"query": "V?"}}}, "<dict>: parameters: '2V' is not a usable"),
        (
            {"parameters": {"V": {"query": ""}}},
            "<dict>: parameters.V.query: expected a non-empty string or null, got ''",
        ),
    ],
)
def test_map_errors_name_the_source_the_key_and_what_is_expected(scpi_map, expected):
    with pytest.raises(ScpiMapError) as info:
        load_parameter_map(scpi_map)
    assert str(info.value).startswith(expected)


def test_map_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "psu.yaml"
    bad.write_text("parameters:\n  V: {query: 'V?', type: float, max: [1]}\n")
    with pytest.raises(
        ScpiMapError, match=re.escape(f"{bad}: parameters.V.max: expected a number")
    ):
        ScpiDevice("ASRL1::INSTR", bad)
    bad.write_text("parameters: [\n")
    with pytest.raises(ScpiMapError, match=re.escape(f"{bad}: not valid YAML")):
        load_parameter_map(bad)
    with pytest.raises(ScpiMapError, match="cannot read the SCPI parameter map.*dc_supply"):
        load_parameter_map(tmp_path / "nope.yaml")
    bad.write_text("parameters:\n  V: {query: 'V?'}\n")
    with pytest.raises(ValueError, match=re.escape(f"add 'sim_yaml: <file>' to {bad}")):
        ScpiDevice("ASRL1::INSTR", bad, sim=True)
    assert load_parameter_map("dc_supply").sim_yaml == SIM_DIR / "dc_supply.yaml"


def test_a_simulated_instrument_with_several_devices_must_list_the_resource(tmp_path):
    definition = load_sim_definition(SIM_DIR / "dc_supply.yaml")
    definition["devices"]["other"] = definition["devices"]["dc_supply"]
    sim = tmp_path / "two.yaml"
    sim.write_text(yaml.safe_dump(definition))
    listed = ScpiDevice("ASRL1::INSTR", "dc_supply", sim=True, sim_yaml=sim)
    with listed:
        assert listed.identity() == "labmesh,SIM-DC-SUPPLY,0001,1.0"
    device = ScpiDevice("ASRL7::INSTR", "dc_supply", sim=True, sim_yaml=sim, name="psu")
    with pytest.raises(InstrumentConnectionError, match="psu: the simulated instruments list no"):
        device.connect()


def test_scpi_injection_through_a_free_text_parameter_is_quoted_or_refused():
    """Issue 15's attack, through pyvisa (the @py backend) to a socket instrument that records
    every line: a `;` inside the value stays inside the SCPI string (its quote doubled), a
    newline is refused before anything is sent, and the supply never sees VOLT 1000."""
    scpi_map = {
        "identity": "*IDN?",
        "parameters": {
            "VOLTAGE": {"query": "VOLT?", "write": "VOLT {value}", "min": 0, "max": 30},
            "MESSAGE": {"query": "DISP:TEXT?", "write": "DISP:TEXT '{value}'", "type": "str"},
            "OUTPUT": {"query": "OUTP?", "write": "OUTP {value}", "type": "bool"},
        },
    }
    replies = {"*IDN?": "ACME,PSU-1,7,1.0", "VOLT?": "0.000", "DISP:TEXT?": "''", "OUTP?": "0"}
    emulator = ScpiEmulator(replies).start()
    try:
        device = ScpiDevice(emulator.resource, scpi_map, visa_library="@py", timeout_ms=SHORT_MS)
        with served(device) as client:
            assert client.write("MESSAGE", "x';VOLT 1000;OUTP 1;*RST;'") is True
            for hostile in ("x\nVOLT 1000", "x\r\nOUTP 1", "x\x00"):
                with pytest.raises(ValueError, match="control character"):
                    client.write("MESSAGE", hostile)
            assert client.query("VOLTAGE") == 0.0
        sent = [line for line in emulator.received if line.startswith(("DISP", "VOLT ", "OUTP"))]
        assert sent == ["DISP:TEXT 'x'';VOLT 1000;OUTP 1;*RST;'''"]
    finally:
        emulator.stop()
