"""The LAPLACE-LHC envelope (PyPI `laplace-server` 0.2.x): commands, parsing, replies. Pure: no I/O.

A LAPLACE message is one JSON object `{"version", "cmd", "from", "to", "payload", "error_msg",
"msg"}`. A device server tells it from a native request by `cmd`/`version` and no `type`. Replies
are built here with the exact command strings and `msg` texts deployed LAPLACE clients see;
every error has one shape (`payload: {}`, `msg: "Error encountered."`, `error_msg: <text>`).
See docs/protocol.md section 5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from labmesh.protocol.errors import ProtocolError

#: The version laplace-server 0.2.0 speaks (and the first of a server's accepted versions).
PROTOCOL_VERSION = "0.2.2"
DEFAULT_VERSIONS: tuple[str, ...] = (PROTOCOL_VERSION,)

CMD_INFO = "INFO"
CMD_PING = "PING"
CMD_GET = "GET"
CMD_SET = "SET"
CMD_SAVE = "SAVE"
CMD_STOP = "STOP"
CMD_OPT = "OPT"
CMD_SCAN = "SCAN"
CMD_SET_ACT = "SET ACT"
CMD_UPDATE_ACT_POS = "UPDATE ACT POS"
CMD_SET_DIAG = "SET DIAG"
#: Every command, in the order laplace-server lists them as INFO `capabilities`.
COMMANDS: tuple[str, ...] = (
    CMD_INFO,
    CMD_PING,
    CMD_GET,
    CMD_SET,
    CMD_SAVE,
    CMD_STOP,
    CMD_OPT,
    CMD_SCAN,
    CMD_SET_ACT,
    CMD_UPDATE_ACT_POS,
    CMD_SET_DIAG,
)

DEVICE_MOTOR = "MOTOR"
DEVICE_CAMERA = "CAMERA"
DEVICE_GAS = "GAS"
DEVICE_OPT = "OPT"
DEVICE_SHOT = "SHOT"
DEVICE_SCAN = "SCAN"
DEVICE_KINDS: tuple[str, ...] = (
    DEVICE_MOTOR,
    DEVICE_CAMERA,
    DEVICE_GAS,
    DEVICE_OPT,
    DEVICE_SHOT,
    DEVICE_SCAN,
)
#: labmesh device kinds with a LAPLACE counterpart; any other kind only measures, which LAPLACE
#: calls a diagnostic and serves as CAMERA.
_KIND_OF = {
    "motor": DEVICE_MOTOR,
    "stage": DEVICE_MOTOR,
    "camera": DEVICE_CAMERA,
    "gas": DEVICE_GAS,
    "opt": DEVICE_OPT,
    "optimizer": DEVICE_OPT,
    "shot": DEVICE_SHOT,
    "scan": DEVICE_SCAN,
    "scanner": DEVICE_SCAN,
}

#: The fields of a LAPLACE message.
_ENVELOPE_KEYS = frozenset({"version", "cmd", "from", "to", "payload", "error_msg", "msg"})
#: `msg` of every error reply (clients key on `error_msg` being non-null).
ERROR_MSG = "Error encountered."
#: `cmd` / `to` of an error reply when the request's own could not be read.
UNKNOWN = "UNKNOWN"

#: Per command: the reply's `cmd` and `msg`. The scan-manager commands are answered as SCAN.
_REPLY_OF: dict[str, tuple[str, str]] = {
    CMD_INFO: (CMD_INFO, "Informations transmitted."),
    CMD_PING: (CMD_PING, "Still alive."),
    CMD_GET: (CMD_GET, "Data sent."),
    CMD_SET: (CMD_SET, "Positions updated."),
    CMD_SAVE: (CMD_SAVE, "Saving path changed."),
    CMD_STOP: (CMD_STOP, "Server stopping."),
    CMD_OPT: (CMD_OPT, "Updating opt."),
    CMD_SCAN: (CMD_SCAN, "Updating scan"),
    CMD_SET_ACT: (CMD_SCAN, "Updating scan"),
    CMD_UPDATE_ACT_POS: (CMD_SCAN, "Updating scan"),
    CMD_SET_DIAG: (CMD_SCAN, "Updating scan"),
}

#: Per command: the payload key it needs, the JSON types allowed, and how to describe them.
_NEEDS: dict[str, tuple[str, tuple[type, ...], str]] = {
    CMD_SET: ("positions", (list, dict), "a list of positions or an object {axis index: position}"),
    CMD_SAVE: ("path", (str,), "a string (the directory or file to save to)"),
    CMD_OPT: ("data", (dict,), "an object"),
    CMD_SET_ACT: ("actuators", (dict,), "an object"),
    CMD_SET_DIAG: ("diagnostics", (dict,), "an object"),
    CMD_UPDATE_ACT_POS: ("actuators", (dict,), "an object"),
}


@dataclass(frozen=True, slots=True)
class Message:
    """One validated LAPLACE request.

    Attributes:
        cmd: the command (one of COMMANDS).
        sender: the `from` field (the client's name, e.g. "Master").
        version: the protocol version the client speaks (one the server accepts).
        payload: the payload object.
        fields: the whole decoded object, as sent.
    """

    cmd: str
    sender: str
    version: str
    payload: dict[str, Any]
    fields: dict[str, Any]

    @property
    def value(self) -> Any:
        """The payload entry the command needs (`positions`, `path`, ...), or None."""
        need = _NEEDS.get(self.cmd)
        return self.payload.get(need[0]) if need else None


def is_envelope(obj: Any) -> bool:
    """Whether a decoded request is meant as LAPLACE: no native `type`, and envelope fields.

    Any envelope field will do (not only `cmd` and `version`), so a LAPLACE client that left
    one out gets a LAPLACE error it can read; a native request always has a `type`.
    """
    return isinstance(obj, dict) and "type" not in obj and not _ENVELOPE_KEYS.isdisjoint(obj)


def device_kind(kind: str) -> str:
    """The LAPLACE device kind for a labmesh kind ("motor" -> MOTOR); a LAPLACE kind stays as
    it is, and a kind LAPLACE has no word for (powermeter, daq, ...) is a diagnostic: CAMERA."""
    if kind in DEVICE_KINDS:
        return kind
    return _KIND_OF.get(str(kind).lower(), DEVICE_CAMERA)


def check_versions(versions: Iterable[str]) -> tuple[str, ...]:
    """Validate a server's accepted versions (the first is the one its error replies carry)."""
    out = (versions,) if isinstance(versions, str) else tuple(versions)
    if not out or not all(isinstance(v, str) and v for v in out):
        raise ValueError(
            f"accepted LAPLACE versions must be non-empty strings, e.g. ({PROTOCOL_VERSION!r},); "
            f"got {versions!r}"
        )
    return out


def _commands() -> str:
    return ", ".join(COMMANDS)


def parse_message(obj: Any, versions: Sequence[str] = DEFAULT_VERSIONS) -> Message:
    """Validate a decoded LAPLACE request; raise ProtocolError saying what is wrong and what to do.

    Checked in laplace-server's order (version, cmd, from present; version accepted; payload
    present), then what it leaves to its handlers or does not check: the payload is an object,
    the command is known, its payload entry is there with the right JSON type.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(
            f"message must be a JSON object, got {type(obj).__name__}; send "
            f'{{"version": "{versions[0]}", "cmd": "PING", "from": "me", "to": "server", '
            '"payload": {}}'
        )
    version = obj.get("version")
    if not isinstance(version, str) or not version:
        raise ProtocolError(
            f"message has no 'version' string; this server speaks LAPLACE {' or '.join(versions)}"
        )
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError(f"message has no 'cmd' string; commands: {_commands()}")
    sender = obj.get("from")
    if not isinstance(sender, str) or not sender:
        raise ProtocolError(
            "message has no 'from' string; put the sender's name there, e.g. \"Master\""
        )
    if version not in versions:
        expected = versions[0] if len(versions) == 1 else f"one of {', '.join(versions)}"
        raise ProtocolError(
            f"Protocol version mismatch: expected {expected}, got {version}. Use a client of "
            "that protocol version, or add this one to the server's accepted versions"
        )
    if "payload" not in obj:
        raise ProtocolError(
            "message has no 'payload'; send \"payload\": {} when the command takes none"
        )
    payload = obj["payload"]
    if not isinstance(payload, dict):
        raise ProtocolError(f"'payload' must be a JSON object, got {_json_type(payload)}")
    if cmd not in _REPLY_OF:
        raise ProtocolError(f"Unknown command {cmd!r}; commands: {_commands()}")
    need = _NEEDS.get(cmd)
    if need is not None:
        key, types, what = need
        if key not in payload:
            raise ProtocolError(f"{cmd} needs payload '{key}': {what}")
        if not isinstance(payload[key], types):
            raise ProtocolError(
                f"{cmd} payload '{key}' must be {what}, got {_json_type(payload[key])}"
            )
    return Message(cmd, sender, version, payload, obj)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, bool) or value is None:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    return names.get(type(value), type(value).__name__)


def positions_by_axis(
    positions: list[Any] | dict[str, Any], freedom: int, names: Sequence[str] = ()
) -> dict[int, float]:
    """A SET's positions as {axis index: position}, checked against the server's `freedom`.

    `positions` is a list (axis 0 first) or an object keyed by axis index (JSON makes the
    LAPLACE master's int keys strings: "0", "1", ...) or, when `names` are given, by axis name.
    A null position leaves that axis where it is. Raises ProtocolError naming the bad entry.
    """
    if freedom == 0 and positions:
        raise ProtocolError("SET refused: this server has freedom 0 (no axes to move)")
    axes = f"axis indices 0..{freedom - 1}" + (f" or names {list(names)}" if names else "")
    if isinstance(positions, list):
        if len(positions) > freedom:
            raise ProtocolError(
                f"SET refused: {len(positions)} positions for a server with freedom {freedom}; "
                f"send at most {freedom}, axis 0 first"
            )
        items: Iterable[tuple[Any, Any]] = enumerate(positions)
    else:
        items = positions.items()
    out: dict[int, float] = {}
    for key, value in items:
        index = _axis_index(key, freedom, names)
        if index is None:
            raise ProtocolError(f"SET refused: {key!r} is not an axis of this server; use {axes}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(
                f"SET refused: position of axis {key} must be a number, got {_json_type(value)}"
            )
        if not math.isfinite(value):
            raise ProtocolError(f"SET refused: position of axis {key} must be finite, got {value}")
        if index in out:
            raise ProtocolError(f"SET refused: axis {key} is given twice")
        out[index] = float(value)
    return out


def _axis_index(key: Any, freedom: int, names: Sequence[str]) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        index = key
    elif isinstance(key, str) and key.isdecimal() and key.isascii():
        index = int(key)
    elif isinstance(key, str) and key in names:
        return names.index(key)
    else:
        return None
    return index if 0 <= index < freedom else None


def plain(value: Any) -> Any:
    """`value` as plain JSON data (tuples as lists, keys as strings, arrays via tolist(), other
    objects as their str), so a reply never fails to encode."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return plain(tolist())
    return str(value)


def request(
    cmd: str,
    payload: dict[str, Any] | None = None,
    *,
    sender: str = "labmesh",
    target: str = "",
    version: str = PROTOCOL_VERSION,
) -> dict[str, Any]:
    """A LAPLACE request as a client sends it."""
    return {
        "from": sender,
        "to": target,
        "cmd": cmd,
        "payload": payload if payload is not None else {},
        "version": version,
        "error_msg": None,
        "msg": None,
    }


def ok_reply(
    sender: str, message: Message, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The success reply to `message`: its command's reply `cmd` and `msg`, `error_msg` null."""
    cmd, msg = _REPLY_OF[message.cmd]
    return {
        "from": sender,
        "to": message.sender,
        "cmd": cmd,
        "payload": payload if payload is not None else {},
        "version": message.version,
        "error_msg": None,
        "msg": msg,
    }


def error_reply(sender: str, request_obj: Any, error_msg: str, version: str) -> dict[str, Any]:
    """The one error shape, addressed back to the request's sender and naming its command where
    they can be read (else "UNKNOWN"). `version` is the server's own (first accepted) version."""
    fields = request_obj if isinstance(request_obj, dict) else {}
    target = fields.get("from")
    cmd = fields.get("cmd")
    return {
        "from": sender,
        "to": target if isinstance(target, str) and target else UNKNOWN,
        "cmd": cmd if isinstance(cmd, str) else UNKNOWN,  # "" is echoed, as ServerLHC does
        "payload": {},
        "version": version,
        "error_msg": error_msg,
        "msg": ERROR_MSG,
    }


def info_payload(
    *,
    device: str,
    freedom: int,
    name: str,
    capabilities: Sequence[str],
    name_list: Sequence[str] = (),
    plottables_list: Sequence[str] = (),
) -> dict[str, Any]:
    """The INFO payload, with the keys deployed LAPLACE clients read."""
    return {
        "device": device,
        "freedom": freedom,
        "name": name,
        "capabilities": list(capabilities),
        "name_list": list(name_list),
        "plottables_list": list(plottables_list),
    }
