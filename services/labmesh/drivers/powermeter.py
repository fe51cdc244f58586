"""Thorlabs PM100-family power meters (PM100D, PM100A, PM100USB) over VISA/SCPI, and the table of
Thorlabs sensor heads whose wavelength and power ranges set the driver's limits."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from labmesh.device import Parameter, operation
from labmesh.drivers.visa import (
    SIM_DIR,
    InstrumentReplyError,
    InstrumentTimeoutError,
    VisaDevice,
    load_sim_definition,
    scpi_text,
)

log = logging.getLogger("labmesh.drivers.powermeter")


@dataclass(frozen=True)
class SensorHead:
    """A Thorlabs sensor head: what it detects with and the ranges the driver enforces.

    Attributes:
        model: the part number printed on the head's connector, e.g. "S155C".
        kind: "photodiode" or "thermal".
        detector: the detector material, e.g. "Si", "InGaAs", "thermopile".
        wavelength_nm: (min, max) wavelength the head is calibrated for.
        power_w: (min, max) optical power the head measures.
    """

    model: str
    kind: str
    detector: str
    wavelength_nm: tuple[float, float]
    power_w: tuple[float, float]

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (for the `sensor` operation)."""
        return {
            "model": self.model,
            "kind": self.kind,
            "detector": self.detector,
            "wavelength_nm": list(self.wavelength_nm),
            "power_w": list(self.power_w),
        }


#: Common Thorlabs C-series heads with the ranges Thorlabs publishes for them (from their spec
#: sheets as best known; check your head's sheet when a limit matters and correct it here).
SENSOR_HEADS: dict[str, SensorHead] = {
    head.model: head
    for head in (
        SensorHead("S120C", "photodiode", "Si", (400.0, 1100.0), (50e-9, 50e-3)),
        SensorHead("S121C", "photodiode", "Si", (400.0, 1100.0), (500e-9, 500e-3)),
        SensorHead("S130C", "photodiode", "Si", (400.0, 1100.0), (500e-12, 500e-3)),
        SensorHead("S150C", "photodiode", "Si", (350.0, 1100.0), (100e-12, 5e-3)),
        SensorHead("S151C", "photodiode", "Si", (400.0, 1100.0), (100e-12, 20e-3)),
        SensorHead("S155C", "photodiode", "InGaAs", (800.0, 1700.0), (50e-12, 20e-3)),
        SensorHead("S170C", "photodiode", "Si", (350.0, 1100.0), (100e-12, 150e-3)),
        SensorHead("S302C", "thermal", "thermopile", (190.0, 25000.0), (100e-6, 2.0)),
        SensorHead("S310C", "thermal", "thermopile", (190.0, 25000.0), (10e-3, 10.0)),
        SensorHead("S401C", "thermal", "thermopile", (190.0, 20000.0), (10e-6, 1.0)),
        SensorHead("S405C", "thermal", "thermopile", (190.0, 20000.0), (1e-3, 5.0)),
    )
}


def sensor_head(sensor_type: str) -> SensorHead:
    """The head `sensor_type` names (case and blanks ignored), or ValueError listing known ones."""
    key = sensor_type.strip().upper() if isinstance(sensor_type, str) else None
    head = SENSOR_HEADS.get(key) if key else None
    if head is None:
        raise ValueError(
            f"unknown Thorlabs sensor head {sensor_type!r}; known: {', '.join(SENSOR_HEADS)} "
            "(use the part number printed on the head's connector)"
        )
    return head


#: SCPI headers of the settable parameters: query is `HEADER?`, write is `HEADER value`.
_HEADERS = {
    "WAVELENGTH": "SENS:CORR:WAV",
    "AVERAGING": "SENS:AVER:COUN",
    "AUTORANGE": "SENS:POW:RANG:AUTO",
    "RANGE": "SENS:POW:RANG",
    "POWER_UNIT": "SENS:POW:UNIT",
}
_MEASURE_POWER = "MEAS:POW?"
_SENSOR_IDENTITY = "SYST:SENS:IDN?"
#: What a PM100 answers when the reading is over range (SCPI's 9.9E37).
_OVER_RANGE = 9.0e37
_ZERO_POLL_S = 0.1
_ZERO_LIMIT_S = 15.0


def _dbm_to_watts(dbm: float) -> float:
    return 1e-3 * 10.0 ** (dbm / 10.0)


class PowermeterDevice(VisaDevice):
    """A Thorlabs PM100-family power meter with one sensor head, over VISA (USBTMC) and SCPI.

    The head's type sets the limits of WAVELENGTH and RANGE; at connect the driver reads the
    head the console reports (`SYST:SENS:IDN?`) and refuses to start if it is another known head.
    POWER is always in watts: when the display unit (POWER_UNIT) is dBm, readings are converted.

    Parameters:
        resource: the VISA resource, e.g. `USB0::0x1313::0x8078::P0000001::INSTR` (PM100D).
        sensor_type: the head's part number, one of `SENSOR_HEADS` (e.g. "S155C").
        sim: use the simulated PM100 shipped in `labmesh/drivers/sim/pm100.yaml` (pyvisa-sim),
            a private copy per instance, set up for `sensor_type`; any resource name works.
        name: the device's name in the lab (default "pm100").
        visa_library: the pyvisa backend ("@py", "path.yaml@sim"; None: pyvisa's default).
        timeout_ms: how long a query waits for the meter.
    """

    kind = "powermeter"

    WAVELENGTH = Parameter(
        float, unit="nm", description="wavelength the head's calibration is corrected for"
    )
    POWER = Parameter(
        float, unit="W", read_only=True, description="measured optical power (MEAS:POW?)"
    )
    AVERAGING = Parameter(int, min=1, description="samples averaged per reading (~3 ms each)")
    AUTORANGE = Parameter(bool, description="the meter picks the power range itself")
    RANGE = Parameter(
        float,
        unit="W",
        description="top of the power range; the meter takes the next range up and stops "
        "auto-ranging",
    )
    POWER_UNIT = Parameter(
        str,
        options=("W", "DBM"),
        description="unit on the meter's display; POWER is reported in W either way",
    )

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Host-file check before anything opens: the sensor head is one we know."""
        if "sensor_type" in options:
            sensor_head(options["sensor_type"])

    def __init__(
        self,
        resource: str,
        sensor_type: str = "S155C",
        *,
        sim: bool = False,
        name: str | None = None,
        visa_library: str | None = None,
        timeout_ms: int = 2000,
    ) -> None:
        name = name or "pm100"
        try:
            self.head = sensor_head(sensor_type)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        super().__init__(
            resource,
            name=name,
            visa_library=visa_library,
            sim_definition=_simulated_pm100(self.head) if sim else None,
            timeout_ms=timeout_ms,
        )
        low, high = self.head.wavelength_nm
        self.set_limits("WAVELENGTH", min=low, max=high)
        low, high = self.head.power_w
        self.set_limits("RANGE", min=low, max=high)
        self._unit = "W"

    def connect(self) -> None:
        super().connect()
        try:
            self._check_head()
            self._unit = self.ask("SENS:POW:UNIT?").upper()
        except BaseException:
            self.disconnect()
            raise

    def _check_head(self) -> None:
        try:
            reported = self.ask(_SENSOR_IDENTITY).split(",", 1)[0].strip().upper()
        except InstrumentTimeoutError:
            # older firmware: the unknown query left an error that the next write must not get
            log.warning(
                "%s: the console does not say which head is attached (no answer to %s; %s); "
                "limits of %s apply",
                self.name,
                _SENSOR_IDENTITY,
                self.check_errors(),
                self.head.model,
            )
            return
        if reported == self.head.model:
            return
        if reported in SENSOR_HEADS:
            raise ValueError(
                f"{self.name}: the head on {self.resource} is a {reported}, but sensor_type "
                f"is {self.head.model}; set sensor_type: {reported} (limits come from it)"
            )
        log.warning(
            "%s: the console reports head %r, which labmesh does not know; limits of %s apply",
            self.name,
            reported,
            self.head.model,
        )

    def _query_(self, name: str) -> Any:
        if name == "POWER":
            return self._read_power()
        return self.ask(f"{_HEADERS[name]}?")

    def _write_(self, name: str, value: Any) -> bool:
        self.send(f"{_HEADERS[name]} {scpi_text(value)}")
        if name == "POWER_UNIT":
            self._unit = value
        return True

    def _number(self, command: str, what: str) -> float:
        """Ask `command` and return its answer as a number, or a clear InstrumentReplyError."""
        raw = self.ask(command)
        try:
            return float(raw)
        except ValueError:
            raise InstrumentReplyError(
                f"{self.name}: {what}: {self.resource} answered {raw!r} to {command!r}, which is "
                "not a number (is another program talking to the meter?)",
                command=command,
                reply=raw,
            ) from None

    def _read_power(self) -> float:
        value = self._number(_MEASURE_POWER, "POWER")
        if not math.isfinite(value) or abs(value) >= _OVER_RANGE:
            raise InstrumentReplyError(
                f"{self.name}: POWER is over range ({_MEASURE_POWER} answered {value:g}); set "
                "AUTORANGE true or a higher RANGE, or reduce the light",
                command=_MEASURE_POWER,
                reply=str(value),
            )
        return _dbm_to_watts(value) if self._unit == "DBM" else value

    @operation(budget_s=20)
    def zero(self) -> float:
        """Zero the head against the dark reading (block the light first); returns the offset
        the meter stored (A for photodiodes, V for thermal heads)."""
        self.send("SENS:CORR:COLL:ZERO")
        deadline = time.monotonic() + _ZERO_LIMIT_S
        while self._number("SENS:CORR:COLL:ZERO:STAT?", "zero") != 0:
            if time.monotonic() > deadline:
                self.send("SENS:CORR:COLL:ZERO:ABOR")
                raise InstrumentTimeoutError(
                    f"{self.name}: zeroing did not finish within {_ZERO_LIMIT_S:g} s and was "
                    "aborted (is the light blocked? try again)"
                )
            time.sleep(_ZERO_POLL_S)
        return self._number("SENS:CORR:COLL:ZERO:MAGN?", "zero")

    @operation(idempotent=True, resources=(), read_only=True)
    def sensor(self) -> dict:
        """The configured sensor head: model, kind, detector, wavelength_nm and power_w ranges."""
        return self.head.describe()


def _simulated_pm100(head: SensorHead) -> dict[str, Any]:
    """The shipped PM100 simulation, set up for `head` (its identity and limits)."""
    definition = load_sim_definition(SIM_DIR / "pm100.yaml")
    device = definition["devices"]["pm100"]
    for dialogue in device["dialogues"]:
        if dialogue["q"] == _SENSOR_IDENTITY:
            dialogue["r"] = f"{head.model},00000001,01-Jan-2024,1,18,289"
    low, high = head.wavelength_nm
    wavelength = device["properties"]["wavelength"]
    wavelength["specs"].update(min=low, max=high)
    wavelength["default"] = min(max(float(wavelength["default"]), low), high)
    power_range = device["properties"]["range"]
    power_range["specs"].update(min=head.power_w[0], max=head.power_w[1])
    power_range["default"] = head.power_w[1]
    return definition


__all__ = [
    "SENSOR_HEADS",
    "PowermeterDevice",
    "SensorHead",
    "sensor_head",
]
