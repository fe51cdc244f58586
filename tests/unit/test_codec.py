"""labmesh.protocol.codec decodes exactly as json.loads(body.decode("utf-8")) does."""

from __future__ import annotations

import json
import math
import random

import pytest

from labmesh.protocol import codec, native
from labmesh.protocol.errors import ProtocolError

#: each decodes (or fails) the same way in both; the first group are where msgspec alone would
#: differ (it refuses them, and the standard library decodes them)
CASES = [
    b"[NaN, Infinity, -Infinity]",
    b'{"value": NaN}',
    b"1e400",
    b"-1e400",
    b'"\\ud800"',
    b'{"a": "\\udfff x"}',
    b'{"a": 123456789012345678901234567890}',
    b"-9223372036854775809",
    b"18446744073709551616",
    b'{"a": 1, "a": 2}',
    b"-0.0",
    b"-0",
    b'"\\u0000"',
    b"[1e-400, 5e-324, 2.2250738585072014e-308]",
    b"123456789012345678901234567890.5",
    b"0.1",
    b"1E5",
    b' \t\n\r{"type": "ping"} ',
    b'{"name": "caf\xc3\xa9", "emoji": "\xf0\x9f\x94\xac"}',
    b"[" * 50 + b"]" * 50,
]

#: not JSON, or not UTF-8: both refuse
BAD = [
    b"\xef\xbb\xbf{}",
    b"{}\x00",
    b'"\xff"',
    b'{"a": "\xed\xa0\x80"}',
    b"\xff\xfe{\x00}\x00",
    b'{"a": "\t"}',
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"{'a': 1}",
    b"[1,]",
    b"tru",
    b'{"a" 1}',
    b"",
]


def same(a: object, b: object) -> bool:
    """Equal, with NaN equal to NaN and the types (int/float, -0.0) compared too."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("body", CASES)
def test_decodes_as_the_standard_library(body: bytes) -> None:
    assert same(codec.loads(body), json.loads(body.decode("utf-8")))


@pytest.mark.parametrize("body", BAD)
def test_refuses_what_the_standard_library_refuses(body: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(body.decode("utf-8"))
    with pytest.raises(ValueError):
        codec.loads(body)


def test_deep_nesting_raises_recursion_error_as_the_standard_library() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(body.decode())
    with pytest.raises(RecursionError):
        codec.loads(body)
    # and a server says so instead of failing
    with pytest.raises(ProtocolError, match="too deeply"):
        native.decode_body(native.Frames(route=[b"c"], body=[b'{"a":' + body + b"}"]))


def test_random_documents_round_trip_identically() -> None:
    """Random documents of every JSON type (floats of every magnitude, big ints, unicode,
    non-finite floats) as the standard library writes them decode identically."""
    rng = random.Random(20261206)

    def value(depth: int) -> object:
        kind = rng.randrange(9 if depth < 4 else 6)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind == 1:
            return (
                rng.randrange(-(2**80), 2**80) if rng.random() < 0.2 else rng.randrange(-1000, 1000)
            )
        if kind == 2:
            return (
                rng.choice([math.nan, math.inf, -math.inf, -0.0, 5e-324])
                if rng.random() < 0.1
                else (rng.uniform(-1, 1) * 10 ** rng.randrange(-300, 300))
            )
        if kind in (3, 4, 5):
            return "".join(
                chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFFF)]))
                for _ in range(rng.randrange(8))
            )
        if kind in (6, 7):
            return [value(depth + 1) for _ in range(rng.randrange(5))]
        return {str(value(3)): value(depth + 1) for _ in range(rng.randrange(5))}

    for _ in range(2000):
        doc = value(0)
        text = json.dumps(doc)  # lone surrogates as \\u escapes
        assert same(codec.loads(text.encode()), json.loads(text))
        text = json.dumps(doc, ensure_ascii=False)  # raw UTF-8, when it can be
        try:
            body = text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        assert same(codec.loads(body), json.loads(text))


def test_a_server_and_a_client_decode_nan_as_before() -> None:
    """PLESTY clients send NaN as the standard library writes it; labmesh keeps its meaning."""
    obj = native.decode_body(
        native.Frames(route=[b"c"], body=[b'{"type": "write", "name": "x", "value": NaN}'])
    )
    assert math.isnan(obj["value"])
    reply = native.decode_reply(native.encode({"status": "ok", "result": [math.inf, math.nan]}))
    assert reply["result"][0] == math.inf and math.isnan(reply["result"][1])
