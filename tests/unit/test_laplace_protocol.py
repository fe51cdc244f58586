"""The LAPLACE-LHC envelope with plain data: detection, validation order, replies, positions."""

from __future__ import annotations

import json
import math

import pytest

from labmesh.protocol import laplace as env
from labmesh.protocol import native
from labmesh.protocol.errors import ProtocolError

pytestmark = pytest.mark.unit


def msg(cmd="PING", payload=None, **changes):
    message = env.request(cmd, {} if payload is None else payload, sender="Master", target="x")
    message.update(changes)
    return message


def without(message: dict, key: str) -> dict:
    return {k: v for k, v in message.items() if k != key}


def test_command_and_kind_strings_are_laplace_servers():
    assert env.COMMANDS == (
        "INFO",
        "PING",
        "GET",
        "SET",
        "SAVE",
        "STOP",
        "OPT",
        "SCAN",
        "SET ACT",
        "UPDATE ACT POS",
        "SET DIAG",
    )
    assert env.DEVICE_KINDS == ("MOTOR", "CAMERA", "GAS", "OPT", "SHOT", "SCAN")
    assert env.PROTOCOL_VERSION == "0.2.2"
    assert env.DEFAULT_VERSIONS == ("0.2.2",)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (msg(), True),
        ({"cmd": "PING"}, True),
        ({"version": "0.2.2"}, True),
        ({"from": "Master", "payload": {}}, True),
        ({"type": "ping"}, False),
        ({"type": "query", "cmd": "PING", "version": "0.2.2"}, False),
        ({}, False),
        ({"id": 1}, False),
        ([1, 2], False),
        ("PING", False),
    ],
)
def test_is_envelope(obj, expected):
    assert env.is_envelope(obj) is expected


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("motor", "MOTOR"),
        ("Stage", "MOTOR"),
        ("camera", "CAMERA"),
        ("gas", "GAS"),
        ("optimizer", "OPT"),
        ("shot", "SHOT"),
        ("scan", "SCAN"),
        ("powermeter", "CAMERA"),
        ("daq", "CAMERA"),
        ("device", "CAMERA"),
        ("OPT", "OPT"),
    ],
)
def test_device_kind_mapping(kind, expected):
    assert env.device_kind(kind) == expected


def test_check_versions():
    assert env.check_versions(["0.2.2", "0.2.1"]) == ("0.2.2", "0.2.1")
    assert env.check_versions("0.2.2") == ("0.2.2",)
    for bad in ([], [""], [None], ()):
        with pytest.raises(ValueError, match="non-empty strings"):
            env.check_versions(bad)


def test_parse_valid_message():
    m = env.parse_message(msg("SAVE", {"path": "/data/run"}))
    assert (m.cmd, m.sender, m.version, m.payload, m.value) == (
        "SAVE",
        "Master",
        "0.2.2",
        {"path": "/data/run"},
        "/data/run",
    )
    assert m.fields["to"] == "x"
    assert env.parse_message(msg("PING")).value is None


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        (
            [1, 2],
            'message must be a JSON object, got list; send {"version": "0.2.2", "cmd": "PING", '
            '"from": "me", "to": "server", "payload": {}}',
        ),
        (
            without(msg(), "version"),
            "message has no 'version' string; this server speaks LAPLACE 0.2.2",
        ),
        (msg(version=""), "message has no 'version' string; this server speaks LAPLACE 0.2.2"),
        (msg(version=2), "message has no 'version' string; this server speaks LAPLACE 0.2.2"),
        (
            without(msg(), "cmd"),
            "message has no 'cmd' string; commands: INFO, PING, GET, SET, SAVE, STOP, OPT, "
            "SCAN, SET ACT, UPDATE ACT POS, SET DIAG",
        ),
        (
            msg(cmd=["PING"]),
            "message has no 'cmd' string; commands: INFO, PING, GET, SET, SAVE, STOP, OPT, "
            "SCAN, SET ACT, UPDATE ACT POS, SET DIAG",
        ),
        (
            without(msg(), "from"),
            "message has no 'from' string; put the sender's name there, e.g. \"Master\"",
        ),
        (
            msg(**{"from": 7}),
            "message has no 'from' string; put the sender's name there, e.g. \"Master\"",
        ),
        (
            msg(version="0.1.0"),
            "Protocol version mismatch: expected 0.2.2, got 0.1.0. Use a client of that protocol "
            "version, or add this one to the server's accepted versions",
        ),
        (
            without(msg(), "payload"),
            "message has no 'payload'; send \"payload\": {} when the command takes none",
        ),
        (msg(payload="x"), "'payload' must be a JSON object, got string"),
        (msg(payload=[1]), "'payload' must be a JSON object, got array"),
        (msg(payload=None) | {"payload": None}, "'payload' must be a JSON object, got null"),
        (
            msg("JUMP"),
            "Unknown command 'JUMP'; commands: INFO, PING, GET, SET, SAVE, STOP, OPT, SCAN, "
            "SET ACT, UPDATE ACT POS, SET DIAG",
        ),
        (
            msg("ping"),
            "Unknown command 'ping'; commands: INFO, PING, GET, SET, SAVE, STOP, OPT, SCAN, "
            "SET ACT, UPDATE ACT POS, SET DIAG",
        ),
        (
            msg("SET"),
            "SET needs payload 'positions': a list of positions or an object "
            "{axis index: position}",
        ),
        (
            msg("SET", {"positions": "1.5"}),
            "SET payload 'positions' must be a list of positions or an object "
            "{axis index: position}, got string",
        ),
        (
            msg("SET", {"positions": 1.5}),
            "SET payload 'positions' must be a list of positions or an object "
            "{axis index: position}, got number 1.5",
        ),
        (msg("SAVE"), "SAVE needs payload 'path': a string (the directory or file to save to)"),
        (
            msg("SAVE", {"path": 3}),
            "SAVE payload 'path' must be a string (the directory or file to save to), got number 3",
        ),
        (msg("OPT"), "OPT needs payload 'data': an object"),
        (msg("OPT", {"data": [1]}), "OPT payload 'data' must be an object, got array"),
        (
            msg("SET ACT", {"actuators": True}),
            "SET ACT payload 'actuators' must be an object, got boolean",
        ),
        (msg("SET DIAG"), "SET DIAG needs payload 'diagnostics': an object"),
        (msg("UPDATE ACT POS"), "UPDATE ACT POS needs payload 'actuators': an object"),
    ],
)
def test_parse_rejects_with_exact_reason(obj, error):
    with pytest.raises(ProtocolError) as caught:
        env.parse_message(obj)
    assert str(caught.value) == error


def test_parse_checks_in_laplace_servers_order():
    # several faults at once: the first in laplace-server's order is the one reported
    bad = {"cmd": "JUMP", "from": "", "payload": "x", "version": "9"}
    with pytest.raises(ProtocolError, match="no 'from' string"):
        env.parse_message(bad)
    with pytest.raises(ProtocolError, match="version mismatch"):
        env.parse_message(bad | {"from": "Master"})
    with pytest.raises(ProtocolError, match="'payload' must be a JSON object"):
        env.parse_message(bad | {"from": "Master", "version": "0.2.2"})


def test_configurable_versions():
    versions = ("0.2.2", "0.2.1")
    assert env.parse_message(msg(version="0.2.1"), versions).version == "0.2.1"
    with pytest.raises(ProtocolError) as caught:
        env.parse_message(msg(version="0.3.0"), versions)
    assert str(caught.value).startswith(
        "Protocol version mismatch: expected one of 0.2.2, 0.2.1, got 0.3.0."
    )
    with pytest.raises(ProtocolError, match="speaks LAPLACE 0.2.2 or 0.2.1"):
        env.parse_message(without(msg(), "version"), versions)


def test_scan_takes_any_payload_object():
    assert env.parse_message(msg("SCAN", {"data": {"step": 1}})).value is None
    assert env.parse_message(msg("SCAN")).cmd == "SCAN"


def test_ok_replies_per_command():
    expected = {
        "INFO": ("INFO", "Informations transmitted."),
        "PING": ("PING", "Still alive."),
        "GET": ("GET", "Data sent."),
        "SET": ("SET", "Positions updated."),
        "SAVE": ("SAVE", "Saving path changed."),
        "STOP": ("STOP", "Server stopping."),
        "OPT": ("OPT", "Updating opt."),
        "SCAN": ("SCAN", "Updating scan"),
        "SET ACT": ("SCAN", "Updating scan"),
        "UPDATE ACT POS": ("SCAN", "Updating scan"),
        "SET DIAG": ("SCAN", "Updating scan"),
    }
    payloads = {
        "SET": {"positions": []},
        "SAVE": {"path": "p"},
        "OPT": {"data": {}},
        "SET ACT": {"actuators": {}},
        "SET DIAG": {"diagnostics": {}},
        "UPDATE ACT POS": {"actuators": {}},
    }
    for cmd, (reply_cmd, text) in expected.items():
        m = env.parse_message(msg(cmd, payloads.get(cmd, {})))
        assert env.ok_reply("srv", m) == {
            "from": "srv",
            "to": "Master",
            "cmd": reply_cmd,
            "payload": {},
            "version": "0.2.2",
            "error_msg": None,
            "msg": text,
        }
    m = env.parse_message(msg("PING", version="0.2.1"), ("0.2.2", "0.2.1"))
    assert env.ok_reply("srv", m, {"PING": "PONG"})["payload"] == {"PING": "PONG"}
    assert env.ok_reply("srv", m)["version"] == "0.2.1"  # answered in the client's version


@pytest.mark.parametrize(
    ("obj", "to", "cmd"),
    [
        (msg("GET"), "Master", "GET"),
        (msg("JUMP"), "Master", "JUMP"),
        (without(msg(), "from"), "UNKNOWN", "PING"),
        (msg(**{"from": ""}), "UNKNOWN", "PING"),
        (msg(cmd=["PING"], **{"from": {"a": 1}}), "UNKNOWN", "UNKNOWN"),
        (without(msg(), "cmd"), "Master", "UNKNOWN"),
        ([1, 2], "UNKNOWN", "UNKNOWN"),
        (None, "UNKNOWN", "UNKNOWN"),
    ],
)
def test_every_error_has_one_shape(obj, to, cmd):
    assert env.error_reply("srv", obj, "what went wrong", "0.2.2") == {
        "from": "srv",
        "to": to,
        "cmd": cmd,
        "payload": {},
        "version": "0.2.2",
        "error_msg": "what went wrong",
        "msg": "Error encountered.",
    }


def test_info_payload_keys():
    payload = env.info_payload(
        device="MOTOR",
        freedom=2,
        name="stage",
        capabilities=("PING",),
        name_list=("x", "y"),
        plottables_list=("x/position",),
    )
    assert payload == {
        "device": "MOTOR",
        "freedom": 2,
        "name": "stage",
        "capabilities": ["PING"],
        "name_list": ["x", "y"],
        "plottables_list": ["x/position"],
    }


@pytest.mark.parametrize(
    ("positions", "freedom", "expected"),
    [
        ([1.5, 2], 2, {0: 1.5, 1: 2.0}),
        ([1.5], 3, {0: 1.5}),
        ([None, 4], 2, {1: 4.0}),
        ({"0": 1.5, "2": -3}, 3, {0: 1.5, 2: -3.0}),
        ({0: 1.0}, 1, {0: 1.0}),
        ({"1": None}, 2, {}),
        ({"y": 2.0}, 2, {1: 2.0}),
        ([], 0, {}),
        ({}, 0, {}),
    ],
)
def test_positions_by_axis(positions, freedom, expected):
    assert env.positions_by_axis(positions, freedom, ("x", "y")[:freedom]) == expected


@pytest.mark.parametrize(
    ("positions", "freedom", "error"),
    [
        ([1.0], 0, "SET refused: this server has freedom 0 (no axes to move)"),
        ({"0": 1.0}, 0, "SET refused: this server has freedom 0 (no axes to move)"),
        (
            [1, 2, 3],
            2,
            "SET refused: 3 positions for a server with freedom 2; send at most 2, axis 0 first",
        ),
        ({"2": 1.0}, 2, "SET refused: '2' is not an axis of this server; use axis indices 0..1"),
        ({"-1": 1.0}, 2, "SET refused: '-1' is not an axis of this server; use axis indices 0..1"),
        ({"z": 1.0}, 2, "SET refused: 'z' is not an axis of this server; use axis indices 0..1"),
        ({"0": "1.5"}, 2, "SET refused: position of axis 0 must be a number, got string"),
        ([True], 2, "SET refused: position of axis 0 must be a number, got boolean"),
        ([[1]], 2, "SET refused: position of axis 0 must be a number, got array"),
        ([math.inf], 2, "SET refused: position of axis 0 must be finite, got inf"),
        ({0: 1.0, "0": 2.0}, 2, "SET refused: axis 0 is given twice"),
    ],
)
def test_positions_by_axis_rejects(positions, freedom, error):
    with pytest.raises(ProtocolError) as caught:
        env.positions_by_axis(positions, freedom)
    assert str(caught.value) == error


def test_positions_by_axis_names_in_error():
    with pytest.raises(ProtocolError) as caught:
        env.positions_by_axis({"w": 1}, 2, ("x", "y"))
    assert str(caught.value) == (
        "SET refused: 'w' is not an axis of this server; use axis indices 0..1 or names ['x', 'y']"
    )


def test_plain_makes_json_data_without_sharing():
    class Array:
        def tolist(self):
            return [1, 2]

    source = {"a": (1, 2), 3: {"b": [Array()]}, "c": object, "d": None}
    out = env.plain(source)
    assert out == {"a": [1, 2], "3": {"b": [[1, 2]]}, "c": str(object), "d": None}
    assert json.loads(native.encode(out)) == out
    nested = {"list": [1, {"x": 1}]}
    copy = env.plain(nested)
    nested["list"][1]["x"] = 2
    assert copy == {"list": [1, {"x": 1}]}


def test_request_builder_is_what_the_master_sends():
    assert env.request("SET", {"positions": [1]}, sender="Master", target="stage") == {
        "from": "Master",
        "to": "stage",
        "cmd": "SET",
        "payload": {"positions": [1]},
        "version": "0.2.2",
        "error_msg": None,
        "msg": None,
    }
