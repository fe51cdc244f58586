"""The Thorlabs sensor-head table and how it sets a power meter's limits (no instrument I/O)."""

from __future__ import annotations

import pytest

from labmesh.drivers.powermeter import SENSOR_HEADS, PowermeterDevice, SensorHead, sensor_head

pytestmark = pytest.mark.unit

PM100 = "USB0::0x1313::0x8078::P0000001::INSTR"
PHOTODIODES = {"S120C", "S121C", "S130C", "S150C", "S151C", "S155C", "S170C"}
THERMAL = {"S302C", "S310C", "S401C", "S405C"}


def test_the_table_holds_the_common_heads_under_their_part_numbers():
    assert set(SENSOR_HEADS) == PHOTODIODES | THERMAL
    assert all(model == head.model for model, head in SENSOR_HEADS.items())
    assert {m for m, h in SENSOR_HEADS.items() if h.kind == "photodiode"} == PHOTODIODES
    assert {m for m, h in SENSOR_HEADS.items() if h.kind == "thermal"} == THERMAL


@pytest.mark.parametrize("model", sorted(SENSOR_HEADS))
def test_every_head_has_sane_ranges(model):
    head = SENSOR_HEADS[model]
    (low_nm, high_nm), (low_w, high_w) = head.wavelength_nm, head.power_w
    assert 0 < low_nm < high_nm and 0 < low_w < high_w
    if head.kind == "photodiode":
        # semiconductor detectors: UV to short-wave IR, at most half a watt
        assert head.detector in ("Si", "InGaAs")
        assert low_nm >= 190 and high_nm <= 1800 and high_w <= 0.5
        assert high_nm == (1700.0 if head.detector == "InGaAs" else 1100.0)
    else:
        # thermopiles: flat from the UV to the far IR, from microwatts to watts
        assert head.detector == "thermopile"
        assert low_nm <= 200 and high_nm >= 10_000 and high_w >= 1.0


def test_published_ranges_of_well_known_heads():
    assert SENSOR_HEADS["S155C"].wavelength_nm == (800.0, 1700.0)
    assert SENSOR_HEADS["S120C"].wavelength_nm == (400.0, 1100.0)
    assert SENSOR_HEADS["S120C"].power_w[1] == 50e-3
    assert SENSOR_HEADS["S121C"].power_w[1] == 500e-3
    assert SENSOR_HEADS["S170C"].power_w[1] == 150e-3
    assert {m: SENSOR_HEADS[m].power_w[1] for m in sorted(THERMAL)} == {
        "S302C": 2.0,
        "S310C": 10.0,
        "S401C": 1.0,
        "S405C": 5.0,
    }


@pytest.mark.parametrize("spelling", ["S155C", "s155c", " S155C\t", "s155C"])
def test_lookup_ignores_case_and_blanks(spelling):
    assert sensor_head(spelling) is SENSOR_HEADS["S155C"]


@pytest.mark.parametrize("wrong", ["S999X", "", "   ", "S155", "PM100D", None, 155])
def test_an_unknown_head_is_an_error_listing_the_known_ones(wrong):
    with pytest.raises(ValueError) as info:
        sensor_head(wrong)
    message = str(info.value)
    assert message.startswith(f"unknown Thorlabs sensor head {wrong!r}; known: S120C, S121C")
    assert all(model in message for model in SENSOR_HEADS)
    assert "part number printed on the head" in message


def test_describe_is_json_ready():
    assert SensorHead("X1", "thermal", "thermopile", (190.0, 2e4), (1e-3, 5.0)).describe() == {
        "model": "X1",
        "kind": "thermal",
        "detector": "thermopile",
        "wavelength_nm": [190.0, 2e4],
        "power_w": [1e-3, 5.0],
    }


@pytest.mark.parametrize("model", sorted(SENSOR_HEADS))
def test_the_head_sets_the_meters_limits_per_instance(model):
    head = SENSOR_HEADS[model]
    meter = PowermeterDevice(PM100, sensor_type=model.lower(), name=f"pm-{model}")
    wavelength, power_range = meter.parameter("WAVELENGTH"), meter.parameter("RANGE")
    assert (wavelength.min, wavelength.max) == head.wavelength_nm
    assert (power_range.min, power_range.max) == head.power_w
    assert meter.head is head and meter.kind == "powermeter"
    # the class declaration stays unlimited: another head's meter is not narrowed by this one
    assert PowermeterDevice.WAVELENGTH.min is None and PowermeterDevice.RANGE.max is None
    described = {p["name"]: p for p in meter.describe()["doc"]["parameters"]["default"]}
    assert described["WAVELENGTH"]["min_value"] == head.wavelength_nm[0]
    assert described["RANGE"]["max_value"] == head.power_w[1]
    with pytest.raises(ValueError, match=rf"from {head.wavelength_nm[0]} to"):
        meter.parameter("WAVELENGTH").validate(head.wavelength_nm[1] + 1)
    assert meter.parameter("WAVELENGTH").validate(head.wavelength_nm[0]) == head.wavelength_nm[0]


@pytest.mark.parametrize("model", sorted(SENSOR_HEADS))
def test_the_simulated_console_is_set_up_for_the_head(model):
    head = SENSOR_HEADS[model]
    definition = PowermeterDevice(PM100, model, sim=True).session.sim_definition
    pm100 = definition["devices"]["pm100"]
    answers = {d["q"]: d.get("r") for d in pm100["dialogues"]}
    assert answers["SYST:SENS:IDN?"].split(",")[0] == model
    wavelength = pm100["properties"]["wavelength"]
    assert (wavelength["specs"]["min"], wavelength["specs"]["max"]) == head.wavelength_nm
    assert head.wavelength_nm[0] <= wavelength["default"] <= head.wavelength_nm[1]
    power_range = pm100["properties"]["range"]["specs"]
    assert (power_range["min"], power_range["max"]) == head.power_w
