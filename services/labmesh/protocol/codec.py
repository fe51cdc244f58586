"""Decoding JSON off the wire: msgspec's decoder, with the standard library's meaning.

Every request, reply and update labmesh receives is decoded here. msgspec decodes a typical
request in 0.16 us where `json.loads` takes 1.6 us (this machine, Python 3.11). Where the two
could disagree, msgspec refuses and the standard library decodes instead, so a message means
exactly what `json.loads` makes of it, which is what PLESTY and LAPLACE clients send and expect:

- `NaN`, `Infinity` and `-Infinity` (the standard library's extension, which PLESTY clients
  send for non-finite floats) and numbers beyond a double (`1e400`: inf) are not JSON to
  msgspec; the standard library decodes them;
- lone UTF-16 surrogates (`"\\ud800"`) decode to str only in the standard library;
- big integers, duplicate keys (the last wins), `-0.0`, `\\u0000` and subnormal floats decode
  the same in both (tests/unit/test_codec.py checks each of these).

Encoding stays with the standard library (see native.encode): msgspec and orjson both write
NaN and Infinity as `null`, which would silently turn a power meter's overrange reading into
"no value" for every client, so the wire contract keeps `NaN`/`Infinity` as the standard library
writes them.

Pure: no sockets, no zmq.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import msgspec
except ImportError:  # a minimal install without it still works, at the standard library's speed
    msgspec = None

__all__ = ["loads"]

_json_loads = json.loads

if msgspec is not None:
    _fast = msgspec.json.Decoder().decode
    _refused = (msgspec.DecodeError, RecursionError)

    def loads(body: bytes) -> Any:
        """Decode a UTF-8 JSON body exactly as `json.loads(body.decode("utf-8"))` does, faster.

        Raises what that raises: UnicodeDecodeError for bytes that are not UTF-8, another
        ValueError (JSONDecodeError) for text that is not JSON, RecursionError for nesting
        deeper than the interpreter's limit.
        """
        try:
            return _fast(body)
        except _refused:
            return _json_loads(body.decode("utf-8"))

else:

    def loads(body: bytes) -> Any:
        """Decode a UTF-8 JSON body, as `json.loads(body.decode("utf-8"))` does."""
        return _json_loads(body.decode("utf-8"))
