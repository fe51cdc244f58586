"""The native protocol with plain data: framing, decoding, validation, replies."""

from __future__ import annotations

import json

import pytest

from labmesh.protocol import native
from labmesh.protocol.errors import (
    ParameterValueError,
    ProtocolError,
    RemoteError,
    remote_error,
    remote_error_class,
    wire_type_of,
)

pytestmark = pytest.mark.unit


def frames(body: bytes, req: bool = False) -> native.Frames:
    return native.split_frames([b"peer", b"", body] if req else [b"peer", body])


def test_split_dealer_and_req_framing():
    dealer = native.split_frames([b"id", b"{}"])
    assert dealer.route == [b"id"] and dealer.body == [b"{}"]
    req = native.split_frames([b"id", b"", b"{}"])
    assert req.route == [b"id", b""] and req.body == [b"{}"]
    assert native.split_frames([b"id"]).body == []


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ([b"peer", b"a", b"b"], "exactly one body frame"),
        ([b"peer"], "exactly one body frame"),
        ([b"peer", b"\xff\xfe{"], "not valid UTF-8"),
        ([b"peer", b"{not json"], "not valid JSON"),
        ([b"peer", b"[1, 2]"], "must be a JSON object, got list"),
        ([b"peer", b"42"], "must be a JSON object, got int"),
        ([b"peer", b""], "got 0 frames"),
    ],
)
def test_decode_body_rejects_with_reason(raw, needle):
    with pytest.raises(ProtocolError, match=needle):
        native.decode_body(native.split_frames(raw))


def test_decode_body_size_limit():
    body = json.dumps({"type": "ping", "pad": "x" * 200}).encode()
    with pytest.raises(ProtocolError, match=f"{len(body)} bytes exceeds .* limit of 100 bytes"):
        native.decode_body(frames(body), max_bytes=100)
    assert native.decode_body(frames(body), max_bytes=len(body))["type"] == "ping"


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({}, "no string 'type'"),
        ({"type": 3}, "no string 'type'"),
        ({"type": "frobnicate"}, "unknown request type 'frobnicate'"),
        ({"type": "query"}, "string 'param'"),
        ({"type": "query", "param": 5}, "string 'param'"),
        ({"type": "write", "param": "X"}, "needs a 'value'"),
        ({"type": "call"}, "string 'func'"),
        ({"type": "call", "func": "f", "args": {"a": 1}}, "'args' must be a JSON array"),
        ({"type": "call", "func": "f", "kwargs": [1]}, "'kwargs' must be a JSON object"),
        ({"type": "query", "param": "X", "timeout": -1}, "positive number of seconds"),
        ({"type": "query", "param": "X", "timeout": "soon"}, "number of seconds or null"),
        ({"type": "query", "param": "X", "timeout": True}, "number of seconds or null"),
        ({"type": "connect", "lease": 0}, "lease must be a positive"),
        ({"type": "connect", "resources": 5}, "resources' must be"),
        ({"type": "heartbeat"}, "needs the 'session'"),
        ({"type": "ping", "session": 5}, "session must be the string token"),
    ],
)
def test_parse_request_rejects_with_reason(obj, needle):
    with pytest.raises(ProtocolError, match=needle):
        native.parse_request(obj)


def test_protocol_error_keeps_the_id_for_the_reply():
    with pytest.raises(ProtocolError) as info:
        native.parse_request({"type": "nope", "id": 17})
    assert info.value.details == {"request_id": 17, "has_id": True}


def test_non_scalar_id_is_rejected():
    with pytest.raises(ProtocolError, match="id must be a JSON scalar"):
        native.parse_request({"type": "ping", "id": [1]})


def test_parse_valid_requests():
    req = native.parse_request({"type": "query", "param": "P", "id": "a:1", "timeout": 2})
    assert (req.type, req.id, req.has_id, req.timeout) == ("query", "a:1", True, 2.0)
    plesty = native.parse_request({"type": "write", "param": "P", "value": 3, "timeout": None})
    assert plesty.timeout is None and not plesty.has_id
    call = native.parse_request({"type": "call", "func": "f", "args": [1], "kwargs": {"b": 2}})
    assert call.get("args") == [1]
    assert native.parse_request({"type": "query", "param": "P", "id": None}).has_id


def test_replies_echo_id_only_when_present():
    with_id = native.parse_request({"type": "ping", "id": 0})
    without = native.parse_request({"type": "ping"})
    assert native.ok_reply(1, with_id) == {"status": "ok", "result": 1, "id": 0}
    assert native.ok_reply(1, without) == {"status": "ok", "result": 1}
    err = native.error_reply("bad", "ValueError", 7, True, still_running=True)
    assert err == {
        "status": "error",
        "error": "bad",
        "type": "ValueError",
        "still_running": True,
        "id": 7,
    }


def test_encode_reply_turns_unencodable_result_into_serialization_error():
    body = native.encode_reply({"status": "ok", "result": {1, 2}, "id": 4})
    reply = json.loads(body)
    assert reply["status"] == "error" and reply["type"] == "SerializationError"
    assert reply["id"] == 4 and "set" in reply["error"]


def test_decode_reply_validation():
    assert native.decode_reply(b'{"status": "ok", "result": 1}')["result"] == 1
    with pytest.raises(ProtocolError):
        native.decode_reply(b'{"result": 1}')
    with pytest.raises(ProtocolError):
        native.decode_reply(b"\xff")


def test_remote_error_classes_are_named_like_the_wire_type():
    err = remote_error("ValueError", "too big", {"status": "error"})
    assert type(err).__name__ == "ValueError"
    assert isinstance(err, RemoteError) and isinstance(err, ValueError)
    assert str(remote_error("KeyError", "no X")) == "no X"
    custom = remote_error("ResourceLockedError", "held")
    assert type(custom).__name__ == "ResourceLockedError" and isinstance(custom, RemoteError)
    assert remote_error_class("ResourceLockedError") is type(custom)
    assert remote_error_class("not an identifier!") is RemoteError
    budget = remote_error("TimeoutError", "Operation timed out", {"still_running": True})
    assert isinstance(budget, TimeoutError) and budget.still_running


def test_wire_type_of():
    assert wire_type_of(ParameterValueError("x")) == "ValueError"
    assert wire_type_of(RuntimeError("x")) == "RuntimeError"
