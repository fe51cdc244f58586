"""The native (PLESTY-compatible) wire protocol: frames, requests, replies. Pure: no I/O.

A request body is one UTF-8 JSON object with a `type`. A reply is
`{"status": "ok", "result": ...}` or `{"status": "error", "error": msg, "type": T}`, plus the
request's `id` when it had one. See docs/protocol.md sections 2 and 3.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from labmesh.protocol import codec
from labmesh.protocol.errors import ProtocolError, SerializationError

PROTOCOL_NAME = "labmesh/1"
#: Default largest accepted request body; bigger ones are answered with a ProtocolError.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: ZeroMQ's own cut (MAXMSGSIZE) is this many times a server's limit: a request between the
#: two gets a ProtocolError reply; beyond the cut ZeroMQ drops the connection unread.
ZMQ_CUT_FACTOR = 4

#: Request types answered by the I/O loop without waiting for the device.
CONTROL_TYPES = frozenset(
    {
        "connect",
        "disconnect",
        "describe",
        "help",
        "ping",
        "heartbeat",
        "locks",
        "task_status",
        "task_cancel",
        "subscribe",
        "unsubscribe",
        "force_release",
    }
)
#: Request types that run on the device's executor.
DEVICE_TYPES = frozenset({"query", "write", "call"})
REQUEST_TYPES = CONTROL_TYPES | DEVICE_TYPES
#: Keys of a connect request that are protocol, not client metadata.
CONNECT_PROTOCOL_KEYS = frozenset(
    {"type", "resources", "timeout", "id", "session", "lease", "wait"}
)

_SCALARS = (str, int, float, bool, type(None))
#: Names one subscribe request may ask for.
MAX_SUBSCRIBE_NAMES = 1000
#: Longest request id accepted (every reply echoes it).
MAX_ID_CHARS = 256
# one encoder for all messages: json.dumps with options would build a new one per call
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(slots=True)
class Request:
    """One validated native request.

    Attributes:
        type: the request type (one of REQUEST_TYPES).
        fields: the whole decoded object, as sent.
        id: the request id (None when absent; see has_id).
        has_id: whether the request carried an `id` (only then is it echoed).
        timeout: server-side budget in seconds for a device call, or None.
        session: the session token from connect, or None.
    """

    type: str
    fields: dict[str, Any]
    id: Any = None
    has_id: bool = False
    timeout: float | None = None
    session: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


@dataclass(slots=True)
class Frames:
    """A ROUTER message split into its routing envelope and its body frames.

    `route` is what a reply must be sent with: `[identity]` for a DEALER peer and
    `[identity, b""]` for a REQ peer (the empty delimiter frame).
    """

    route: list[bytes]
    body: list[bytes] = field(default_factory=list)

    @property
    def identity(self) -> bytes:
        return self.route[0]


def split_frames(frames: list[bytes]) -> Frames:
    """Split `[identity, body]` (DEALER) or `[identity, b"", body]` (REQ) into route and body."""
    if len(frames) >= 2 and frames[1] == b"":
        return Frames(route=frames[:2], body=frames[2:])
    return Frames(route=frames[:1], body=frames[1:])


def client_id_of(identity: bytes) -> str:
    """A printable client id from a ROUTER identity frame (PLESTY uses the DEALER identity)."""
    try:
        return identity.decode("utf-8")
    except UnicodeDecodeError:
        return identity.hex()


def decode_body(frames: Frames, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode the single body frame into a JSON object, or raise ProtocolError saying why."""
    if len(frames.body) != 1:
        raise ProtocolError(
            f"expected exactly one body frame holding a JSON object, got {len(frames.body)} "
            "frames; send the request as a single frame"
        )
    body = frames.body[0]
    if len(body) > max_bytes:
        raise ProtocolError(
            f"request of {len(body)} bytes exceeds this server's limit of {max_bytes} bytes; "
            "send large data as a file path or in smaller pieces"
        )
    try:
        obj = codec.loads(body)
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"request is not valid UTF-8 (byte {exc.start}); encode the JSON text as UTF-8"
        ) from None
    except ValueError as exc:
        raise ProtocolError(f"request is not valid JSON ({exc}); send one JSON object") from None
    except RecursionError:
        raise ProtocolError(
            "request nests arrays or objects too deeply to decode; send a flatter JSON object"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            f'request must be a JSON object, got {type(obj).__name__}; send e.g. {{"type": "ping"}}'
        )
    return obj


def _positive_seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{what} must be a number of seconds or null, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ProtocolError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def parse_request(obj: dict[str, Any]) -> Request:
    """Validate a decoded native request object and return a Request.

    Raises ProtocolError naming the bad field; the error carries `request_id` (and `has_id`)
    in its details when the id itself was readable, so the reply can still echo it.
    """
    has_id = "id" in obj
    req_id = obj.get("id")
    if has_id and not isinstance(req_id, _SCALARS):
        raise ProtocolError("id must be a JSON scalar (string, number, boolean or null)")
    if isinstance(req_id, str) and len(req_id) > MAX_ID_CHARS:
        # not echoed: a reply never carries a peer's megabytes back
        raise ProtocolError(
            f"id is {len(req_id)} characters long; at most {MAX_ID_CHARS} are accepted "
            "(a counter or a short token is enough)"
        )
    try:
        return _parse_fields(obj, req_id, has_id)
    except ProtocolError as exc:
        exc.details.update(request_id=req_id, has_id=has_id)
        raise


def _parse_fields(obj: dict[str, Any], req_id: Any, has_id: bool) -> Request:
    rtype = obj.get("type")
    if not isinstance(rtype, str):
        raise ProtocolError(
            f"request has no string 'type' field; expected one of {sorted(REQUEST_TYPES)}"
        )
    if rtype not in REQUEST_TYPES:
        raise ProtocolError(
            f"unknown request type {rtype!r}; expected one of {sorted(REQUEST_TYPES)}"
        )
    timeout = _positive_seconds(obj.get("timeout"), "timeout")
    session = obj.get("session")
    if session is not None and not isinstance(session, str):
        raise ProtocolError(f"session must be the string token from connect, got {session!r}")
    if rtype in ("query", "write") and not isinstance(obj.get("param"), str):
        raise ProtocolError(f"{rtype} needs a string 'param' (the parameter name)")
    if rtype == "write" and "value" not in obj:
        raise ProtocolError(f"write of {obj['param']!r} needs a 'value'")
    if rtype == "call":
        if not isinstance(obj.get("func"), str):
            raise ProtocolError("call needs a string 'func' (the operation name)")
        if not isinstance(obj.get("args", []), list):
            raise ProtocolError("call 'args' must be a JSON array")
        if not isinstance(obj.get("kwargs", {}), dict):
            raise ProtocolError("call 'kwargs' must be a JSON object")
        if not isinstance(obj.get("task", False), bool):
            raise ProtocolError("call 'task' must be true (reply when it starts) or false")
    if rtype == "subscribe":
        params = obj.get("params")
        if isinstance(params, str):
            params = [params]
        if (
            not isinstance(params, list)
            or not 0 < len(params) <= MAX_SUBSCRIBE_NAMES
            or not all(isinstance(p, str) and 0 < len(p) <= 256 for p in params)
        ):
            raise ProtocolError(
                f"subscribe needs 'params': a name or a list of 1 to {MAX_SUBSCRIBE_NAMES} "
                "names (strings of at most 256 characters)"
            )
        _positive_seconds(obj.get("every_s"), "every_s")
        _positive_seconds(obj.get("max_rate_hz"), "max_rate_hz")
        deadband = obj.get("deadband")
        if deadband is not None and (
            isinstance(deadband, bool)
            or not isinstance(deadband, (int, float))
            or not math.isfinite(deadband)
            or deadband < 0
        ):
            raise ProtocolError(f"deadband must be a number >= 0 or null, got {deadband!r}")
        if session is None:
            raise ProtocolError("subscribe needs the 'session' token returned by connect")
    if rtype == "unsubscribe":
        topics = obj.get("topics")
        if topics is not None and (
            not isinstance(topics, list) or not all(isinstance(t, str) for t in topics)
        ):
            raise ProtocolError("unsubscribe 'topics' must be a list of topics (or null: all)")
    if rtype in ("task_status", "task_cancel"):
        task = obj.get("task")
        if not (task is None or (isinstance(task, str) and 0 < len(task) <= 64)):
            raise ProtocolError(
                f"{rtype} 'task' must be a task id string from a started call (or null: the "
                "running task)"
            )
        _positive_seconds(obj.get("wait"), "wait")
    if rtype == "connect":
        _positive_seconds(obj.get("lease"), "lease")
        _positive_seconds(obj.get("wait"), "wait")
        resources = obj.get("resources")
        if resources is not None and not isinstance(resources, (str, list, dict)):
            raise ProtocolError(
                "connect 'resources' must be a string, a list or a nested object tree"
            )
    if rtype == "force_release":
        resources = obj.get("resources")
        if not resources or not isinstance(resources, (str, list, dict)):
            raise ProtocolError(
                "force_release needs 'resources': the locked resources to free (a string, a "
                "list or a tree), as `locks` shows them"
            )
    if rtype == "heartbeat" and session is None:
        raise ProtocolError("heartbeat needs the 'session' token returned by connect")
    return Request(rtype, obj, req_id, has_id, timeout, session)


def ok_reply(result: Any, request: Request | None = None, **extra: Any) -> dict[str, Any]:
    """An ok reply echoing the request id."""
    reply = {"status": "ok", "result": result, **extra}
    if request is not None and request.has_id:
        reply["id"] = request.id
    return reply


def error_reply(
    message: str,
    error_type: str,
    request_id: Any = None,
    has_id: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """An error reply; `extra` adds fields such as `still_running` or PLESTY's `result`."""
    reply = {"status": "error", "error": message, "type": error_type, **extra}
    if has_id:
        reply["id"] = request_id
    return reply


def encode(obj: Any) -> bytes:
    """Encode a reply or request as UTF-8 JSON, raising SerializationError if it cannot be."""
    try:
        return _encode_json(obj).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(str(exc)) from None


def encode_reply(reply: dict[str, Any]) -> bytes:
    """Encode a reply; a result JSON cannot carry becomes a SerializationError reply instead."""
    try:
        return encode(reply)
    except SerializationError as exc:
        result = reply.get("result")
        return encode(
            error_reply(
                f"result of type {type(result).__name__} cannot be sent as JSON ({exc}); return "
                "numbers, strings, lists or dicts (e.g. array.tolist()), or a path to a data file",
                SerializationError.wire_type,
                reply.get("id"),
                "id" in reply,
            )
        )


def decode_reply(body: bytes) -> dict[str, Any]:
    """Decode a reply body on the client side, raising ProtocolError if it is not a reply."""
    try:
        obj = codec.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"server sent a reply that is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("status") not in ("ok", "error"):
        raise ProtocolError(f"server sent a reply without status ok/error: {str(obj)[:200]}")
    return obj
