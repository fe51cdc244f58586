"""Talk to a LAPLACE server as the LAPLACE master does (run with the interop venv).

    <interop-venv>/bin/python laplace_master_client.py ADDRESS master [--path P] [--polls N]
        [--interval S] [--positions JSON] [--opt JSON]
    <interop-venv>/bin/python laplace_master_client.py ADDRESS cases NAME [NAME ...]

`master` does what laplace_master's ClientManager/MasterClient do, with laplace-server's own
message builders and the master's REQ socket (2 s send/receive timeouts): on connect PING, SAVE
the saving path, INFO; then PING+GET polling; SET with `{index: position}` positions (the master's
`sample_point`); more polling; OPT with results (the master's `send_opt`). `cases` sends each named
malformed message on a fresh socket, then a PING on another one to see whether the server lives.

Prints one JSON line: the transcript (`master`) or `{name: {reply, alive_after}}` (`cases`); a
reply is null when none came within the timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import zmq
from laplace_server.protocol import (
    PROTOCOL_VERSION,
    make_get_request,
    make_info_request,
    make_opt_update,
    make_ping,
    make_save_request,
    make_set_request,
)

TIMEOUT_MS = 2000  # the master's MasterClient default


#: Marks a field `_message` leaves out.
_DROP = object()


def _message(command: Any, payload: Any = None, /, **changes: Any) -> dict[str, Any]:
    message = {
        "from": "Master",
        "to": "Unknown",
        "cmd": command,
        "payload": {} if payload is None else payload,
        "version": PROTOCOL_VERSION,
        "error_msg": None,
        "msg": None,
    }
    message.update(changes)
    return {k: v for k, v in message.items() if v is not _DROP}


#: Malformed or unusual messages, as raw bytes.
CASES: dict[str, bytes] = {
    "not_json": b"this is not json",
    "bad_utf8": b'{"cmd": "PING\xff\xfe"}',
    "json_array": b"[1, 2]",
    "missing_version": json.dumps(_message("PING", version=_DROP)).encode(),
    "missing_cmd": json.dumps(_message("PING", cmd=_DROP)).encode(),
    "missing_from": json.dumps(_message("PING", **{"from": _DROP})).encode(),
    "missing_payload": json.dumps(_message("PING", payload=_DROP)).encode(),
    "wrong_version": json.dumps(_message("PING", version="0.1.0")).encode(),
    "unknown_command": json.dumps(_message("JUMP")).encode(),
    "save_payload_not_object": json.dumps(_message("SAVE", payload="/data")).encode(),
    "save_missing_path": json.dumps(_message("SAVE")).encode(),
    "set_missing_positions": json.dumps(_message("SET")).encode(),
    "opt_missing_data": json.dumps(_message("OPT")).encode(),
    "set_positions_string": json.dumps(_message("SET", {"positions": "1.5"})).encode(),
    "set_too_many_positions": json.dumps(_message("SET", {"positions": [1, 2, 3]})).encode(),
    "ping_payload_not_object": json.dumps(_message("PING", payload="x")).encode(),
    "update_act_pos_without_actuators": json.dumps(_message("UPDATE ACT POS")).encode(),
    "cmd_list": json.dumps(_message(["PING"])).encode(),
    "cmd_object": json.dumps(_message({"PING": 1})).encode(),
    "stop": json.dumps(_message("STOP")).encode(),
}


def req_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    sock.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def exchange(sock: zmq.Socket, body: bytes) -> Any:
    """Send `body`, return the decoded reply, or None on timeout (the socket is then unusable)."""
    try:
        sock.send(body)
        return json.loads(sock.recv())
    except zmq.ZMQError:  # zmq.Again: the timeout
        return None


class Master:
    """The master's MasterClient: one REQ socket per server, a transcript of every exchange."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.ctx = ctx
        self.address = address
        self.sock = req_socket(ctx, address)
        self.server_name = "Unknown"
        self.transcript: list[dict[str, Any]] = []

    def send(self, step: str, message: dict[str, Any]) -> Any:
        reply = exchange(self.sock, json.dumps(message).encode())
        self.transcript.append({"step": step, "request": message, "reply": reply})
        if reply is None:
            # the master closes its socket here (and is dead until re-enabled): reconnect, so
            # the transcript shows what the remaining steps would get
            self.sock.close(0)
            self.sock = req_socket(self.ctx, self.address)
        return reply

    def poll(self, count: int, interval: float, label: str) -> None:
        for i in range(count):
            self.send(f"{label} {i} PING", make_ping("Master", self.server_name))
            self.send(f"{label} {i} GET", make_get_request("Master", self.server_name))
            time.sleep(interval)


def run_master(address: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = zmq.Context.instance()
    master = Master(ctx, address)
    master.send("probe PING", make_ping("Master", master.server_name))
    master.send("probe SAVE", make_save_request("Master", master.server_name, path=args.path))
    info = master.send("probe INFO", make_info_request("Master", master.server_name))
    if info is not None and info.get("error_msg") is None:
        master.server_name = info["payload"].get("name", "Unknown")
    master.poll(args.polls, args.interval, "poll")
    # sample_point: {position index: value}, ints in Python, strings once JSON-encoded
    positions = {int(k): v for k, v in json.loads(args.positions).items()}
    master.send("sample SET", make_set_request("Master", master.server_name, positions=positions))
    master.poll(args.polls, args.interval, "after SET poll")
    opt = json.loads(args.opt)
    master.send("send_opt OPT", make_opt_update("Master", master.server_name, data=opt))
    master.sock.close(0)
    return {"transcript": master.transcript}


def run_cases(address: str, names: list[str]) -> dict[str, Any]:
    ctx = zmq.Context.instance()
    out: dict[str, Any] = {}
    for name in names:
        sock = req_socket(ctx, address)
        reply = exchange(sock, CASES[name])
        sock.close(0)
        probe = req_socket(ctx, address)
        pong = exchange(probe, json.dumps(make_ping("Master", "Unknown")).encode())
        probe.close(0)
        out[name] = {"reply": reply, "alive_after": pong is not None}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    sub = parser.add_subparsers(dest="mode", required=True)
    master = sub.add_parser("master")
    master.add_argument("--path", default="/data/laplace/run-001")
    master.add_argument("--polls", type=int, default=3)
    master.add_argument("--interval", type=float, default=0.3)
    master.add_argument("--positions", default='{"0": 1.5, "1": 2.5}')
    master.add_argument("--opt", default='{"results": [{"inputs": {}, "outputs": {}}]}')
    cases = sub.add_parser("cases")
    cases.add_argument("names", nargs="+", choices=sorted(CASES))
    args = parser.parse_args()
    if args.mode == "master":
        result = run_master(args.address, args)
    else:
        result = run_cases(args.address, args.names)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
