"""The device contract with plain objects: parameter validation, operations, describe."""

from __future__ import annotations

import pytest

from labmesh import Device, Parameter, operation
from labmesh.device import describe_device, find_operations
from labmesh.protocol.errors import ParameterValueError, UnknownParameterError

from support import MemoryMeter

pytestmark = pytest.mark.unit


def test_int_is_fine_for_float_and_bool_is_not_a_number():
    p = Parameter(float, name="WAVELENGTH", min=400, max=1100, unit="nm")
    assert p.validate(1064) == 1064.0 and isinstance(p.validate(1064), float)
    with pytest.raises(ParameterValueError, match="WAVELENGTH takes a float from 400 to 1100 nm"):
        p.validate(True)
    i = Parameter(int, name="AVERAGING")
    with pytest.raises(ParameterValueError, match="AVERAGING takes an int, got bool True"):
        i.validate(True)
    with pytest.raises(ParameterValueError, match="got float 2.5"):
        i.validate(2.5)
    assert i.validate(3.0) == 3
    b = Parameter(bool, name="AUTORANGE")
    with pytest.raises(ParameterValueError, match="got int 1"):
        b.validate(1)
    s = Parameter(str, name="UNIT")
    with pytest.raises(ParameterValueError, match="got int 5"):
        s.validate(5)


def test_range_options_read_only_messages_name_parameter_and_allowed_values():
    p = Parameter(float, name="WAVELENGTH", min=400, max=1100, unit="nm")
    with pytest.raises(
        ParameterValueError,
        match=r"2000 is out of range for WAVELENGTH; "
        r"allowed: a float from 400 to 1100 nm",
    ):
        p.validate(2000)
    with pytest.raises(ParameterValueError, match=r"is out of range for WAVELENGTH"):
        p.validate(399.9)
    assert p.validate(400) == 400.0 and p.validate(1100) == 1100.0
    o = Parameter(str, name="MODE", options=["CW", "PULSED"])
    with pytest.raises(
        ParameterValueError,
        match=r"'QCW' is not an option of MODE; "
        r"allowed: \['CW', 'PULSED'\]",
    ):
        o.validate("QCW")
    r = Parameter(float, name="POWER", read_only=True)
    with pytest.raises(ParameterValueError, match="POWER is read-only"):
        r.validate(1.0)
    with pytest.raises(ParameterValueError, match="NaN"):
        p.validate(float("nan"))


def test_bad_declarations_are_refused():
    with pytest.raises(TypeError):
        Parameter(list)
    with pytest.raises(ValueError, match="min 5 > max 1"):
        Parameter(float, name="X", min=5, max=1)
    with pytest.raises(ValueError, match="read-only and write-only"):
        Parameter(float, name="X", read_only=True, write_only=True)


def test_device_query_write_locally():
    with MemoryMeter() as dev:
        assert dev.connected
        assert dev.query("WAVELENGTH") == 532.0
        assert dev.write("WAVELENGTH", 1064) is True
        assert dev.values["WAVELENGTH"] == 1064.0
        with pytest.raises(
            UnknownParameterError,
            match=r"meter has no parameter 'COLOR'; "
            r"known: \['AUTORANGE'",
        ):
            dev.query("COLOR")
        with pytest.raises(KeyError):
            dev.write("COLOR", 1)
        with pytest.raises(ParameterValueError, match="TRIGGER is write-only"):
            dev.query("TRIGGER")
        assert dev.get_config_list()[0] == "AUTORANGE"
    assert dev.disconnected and not dev.connected


def test_query_converts_instrument_strings_to_declared_type():
    class Scpi(Device):
        P = Parameter(float)
        N = Parameter(int)
        ON = Parameter(bool)
        ID = Parameter(str)

        def _query_(self, name):
            return {"P": "+1.5E-03\n", "N": "12", "ON": "ON", "ID": " x \n"}[name]

    dev = Scpi()
    assert dev.query("P") == 1.5e-3
    assert dev.query("N") == 12
    assert dev.query("ON") is True
    assert dev.query("ID") == "x"

    class Garbled(Scpi):
        def _query_(self, name):
            return "garbage"

    with pytest.raises(
        ParameterValueError,
        match="Garbled: P: the instrument answered 'garbage', which is not a float",
    ):
        Garbled().query("P")


def test_per_instance_limits():
    a, b = MemoryMeter("a"), MemoryMeter("b")
    a.set_limits("WAVELENGTH", min=700, max=1800)
    assert a.parameter("WAVELENGTH").validate(1500) == 1500.0
    with pytest.raises(ParameterValueError):
        b.parameter("WAVELENGTH").validate(1500)


def test_operations_and_describe():
    dev = MemoryMeter()
    ops = find_operations(dev)
    assert {"sleep", "add", "fail", "identity", "check_errors", "check_operatability"} <= set(ops)
    assert "not_exposed" not in ops and "query" not in ops
    assert ops["sleep"].budget_s == 5
    d = describe_device(dev)
    assert d["name"] == "meter" and d["kind"] == "powermeter"
    assert d["budgets"] == {"sleep": 5.0}
    assert "identity" in d["idempotent"]
    add = next(f for f in d["doc"]["functions"] if f["name"] == "add")
    assert add["description"] == "Add two numbers."
    assert [(p["name"], p["required"], p["default"]) for p in add["iparams"]] == [
        ("a", True, None),
        ("b", False, 1.0),
    ]
    params = {p["name"]: p for p in d["doc"]["parameters"]["default"]}
    assert params["WAVELENGTH"]["min_value"] == 400.0 and params["POWER"]["read_only"]
    assert d["resources"] == {"Dev1": {"port0": ["line0", "line1"], "port1": ["line0"]}}


def test_operation_decorator_validation_and_overrides_keep_the_operation():
    with pytest.raises(ValueError, match="budget_s must be a positive"):
        operation(budget_s=0)

    class Override(MemoryMeter):
        def identity(self) -> str:  # no decorator needed: still the remote `identity`
            return "ACME,PM1,42,1.0"

        @operation(budget_s=9)
        def add(self, a, b=1.0):  # a new decorator replaces the spec
            return a - b

    ops = find_operations(Override())
    assert ops["identity"].idempotent is True
    assert ops["add"].budget_s == 9


def test_failed_connect_is_followed_by_disconnect():
    class Flaky(MemoryMeter):
        def connect(self):
            raise OSError("port busy")

    dev = Flaky()
    with pytest.raises(OSError, match="port busy"), dev:
        pass
    assert dev.disconnected and not dev.connected
