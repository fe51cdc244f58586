"""LAPLACE-LHC on real sockets: transcripts of every command and bad input with exact replies,
the ServerLHC-style LaplaceServer, and any labmesh device served to LAPLACE clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from labmesh import build_client, metrics
from labmesh.drivers.motor import MotorStage
from labmesh.laplace import CALLBACKS, LaplaceAdapter, LaplaceServer
from labmesh.protocol import laplace as env
from labmesh.protocol import native
from labmesh.server import DeviceServer, ServerLimits

from support import MemoryMeter, unavailable, wait_until

pytestmark = pytest.mark.integration

ALL_BUT_STOP = [
    "INFO",
    "PING",
    "GET",
    "SET",
    "SAVE",
    "OPT",
    "SCAN",
    "SET ACT",
    "UPDATE ACT POS",
    "SET DIAG",
]
COMMAND_LIST = "INFO, PING, GET, SET, SAVE, STOP, OPT, SCAN, SET ACT, UPDATE ACT POS, SET DIAG"


# ---- helpers --------------------------------------------------------------------------------
def client_socket(address: str, kind: int = zmq.REQ) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(address)
    return sock


def ask(sock: zmq.Socket, message: Any) -> dict[str, Any]:
    """One exchange: `message` is a dict (sent as JSON), bytes, or a list of frames."""
    if isinstance(message, list):
        sock.send_multipart(message)
    else:
        sock.send(message if isinstance(message, bytes) else json.dumps(message).encode())
    return json.loads(sock.recv())


def req(cmd: str, payload: dict | None = None, **changes: Any) -> dict[str, Any]:
    message = env.request(cmd, payload, sender="Master", target="Unknown")
    message.update(changes)
    return message


def ok(server: str, cmd: str, msg: str, payload: dict | None = None, to: str = "Master") -> dict:
    return {
        "from": server,
        "to": to,
        "cmd": cmd,
        "payload": payload if payload is not None else {},
        "version": "0.2.2",
        "error_msg": None,
        "msg": msg,
    }


def error(server: str, cmd: str, text: str, to: str = "Master") -> dict:
    return {
        "from": server,
        "to": to,
        "cmd": cmd,
        "payload": {},
        "version": "0.2.2",
        "error_msg": text,
        "msg": "Error encountered.",
    }


def port_is_free(address: str) -> bool:
    """Whether nothing listens on the TCP port of `address` any more."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        except OSError:
            return False
    return True


class Recorder:
    """Collects callback calls (name, argument, thread name)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.threads: set[str] = set()

    def bind(self, target: LaplaceAdapter) -> None:
        for name in CALLBACKS:
            if name != "on_get":
                getattr(target, f"set_{name}")(self._record(name))
        target.set_on_get(lambda: self._note("on_get", None))

    def _record(self, name: str):
        return lambda argument: self._note(name, argument)

    def _note(self, name: str, argument: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((name, argument))


@pytest.fixture
def cam() -> Iterator[LaplaceServer]:
    server = LaplaceServer(
        "cam1",
        "tcp://127.0.0.1:0",
        2,
        "MOTOR",
        {"positions": [0.0, 0.0], "unit": "mm"},
        name_list=["m1", "m2"],
        plottables_list=["positions"],
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stage_server() -> Iterator[DeviceServer]:
    stage = MotorStage(("x", "y"), limits={"x": (0, 100)}, speed=1000.0, name="stage")
    server = DeviceServer(stage, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter()).start()
    try:
        yield server
    finally:
        server.stop()


# ---- LaplaceServer: every command -----------------------------------------------------------
def test_transcript_every_command(cam):
    recorder = Recorder()
    recorder.bind(cam)
    sock = client_socket(cam.address)
    scan = req("SCAN", {"data": {"step": 3}})
    transcript = [
        (req("PING", {"PING": None}), ok("cam1", "PING", "Still alive.", {"PING": "PONG"})),
        (req("SAVE", {"path": "/data/run-7"}), ok("cam1", "SAVE", "Saving path changed.")),
        (
            req("INFO"),
            ok(
                "cam1",
                "INFO",
                "Informations transmitted.",
                {
                    "device": "MOTOR",
                    "freedom": 2,
                    "name": "cam1",
                    "capabilities": ALL_BUT_STOP,
                    "name_list": ["m1", "m2"],
                    "plottables_list": ["positions"],
                },
            ),
        ),
        (
            req("GET"),
            ok(
                "cam1",
                "GET",
                "Data sent.",
                {"data": {"positions": [0.0, 0.0], "unit": "mm"}, "seq": 1},
            ),
        ),
        (req("SET", {"positions": {"0": 1.5, "1": 2.5}}), ok("cam1", "SET", "Positions updated.")),
        (req("SET", {"positions": [3.0]}), ok("cam1", "SET", "Positions updated.")),
        (req("OPT", {"data": {"results": [1, 2]}}), ok("cam1", "OPT", "Updating opt.")),
        (scan, ok("cam1", "SCAN", "Updating scan")),
        (req("SET ACT", {"actuators": {"m1": True}}), ok("cam1", "SCAN", "Updating scan")),
        (req("SET DIAG", {"diagnostics": {"cam": 1}}), ok("cam1", "SCAN", "Updating scan")),
        (req("UPDATE ACT POS", {"actuators": {"m1": 4.0}}), ok("cam1", "SCAN", "Updating scan")),
        (
            req("STOP"),
            error(
                "cam1",
                "STOP",
                "STOP refused: this server does not take a remote STOP; stop it on its host "
                "(or start it with allow_stop=True)",
            ),
        ),
    ]
    for request, expected in transcript:
        assert ask(sock, request) == expected, request["cmd"]
    assert recorder.calls == [
        ("on_saving_path_changed", "/data/run-7"),
        ("on_get", None),
        ("on_position_changed", {"0": 1.5, "1": 2.5}),
        ("on_position_changed", [3.0]),
        ("on_opt", {"results": [1, 2]}),
        ("on_scan", scan),
        ("on_set_actuators", {"m1": True}),
        ("on_set_diagnostics", {"cam": 1}),
        # as ServerLHC: the whole message; then labmesh's own callback
        ("on_set_actuators", req("UPDATE ACT POS", {"actuators": {"m1": 4.0}})),
        ("on_update_actuator_positions", {"m1": 4.0}),
    ]
    assert cam.save_path == "/data/run-7"
    assert cam.running  # STOP was refused
    assert recorder.threads <= {"device:cam1", "standby:cam1"}


# ---- every bad input ------------------------------------------------------------------------
def merged(native_error: str, text: str | None = None) -> dict[str, Any]:
    """The reply to a body that is not a JSON object: native error + LAPLACE error fields."""
    return {
        "status": "error",
        "error": native_error,
        "type": "ProtocolError",
        **error("cam1", "UNKNOWN", text or native_error, to="UNKNOWN"),
    }


NOT_JSON = (
    "request is not valid JSON (Expecting value: line 1 column 1 (char 0)); send one JSON object"
)
BAD_INPUTS = [
    ("not JSON", b"this is not json", merged(NOT_JSON)),
    ("empty body", b"", merged(NOT_JSON)),
    (
        "bad UTF-8",
        b'{"cmd": "PING\xff"}',
        merged("request is not valid UTF-8 (byte 13); encode the JSON text as UTF-8"),
    ),
    (
        "JSON array",
        b"[1, 2]",
        merged('request must be a JSON object, got list; send e.g. {"type": "ping"}'),
    ),
    (
        "JSON string",
        b'"PING"',
        merged('request must be a JSON object, got str; send e.g. {"type": "ping"}'),
    ),
    (
        "two body frames",
        [b'{"cmd": "PING"}', b"{}"],
        merged(
            "expected exactly one body frame holding a JSON object, got 2 frames; send the "
            "request as a single frame"
        ),
    ),
    (
        "missing version",
        {k: v for k, v in req("PING").items() if k != "version"},
        error("cam1", "PING", "message has no 'version' string; this server speaks LAPLACE 0.2.2"),
    ),
    (
        "missing cmd",
        {k: v for k, v in req("PING").items() if k != "cmd"},
        error("cam1", "UNKNOWN", f"message has no 'cmd' string; commands: {COMMAND_LIST}"),
    ),
    (
        "cmd a list",
        req(["PING"]),
        error("cam1", "UNKNOWN", f"message has no 'cmd' string; commands: {COMMAND_LIST}"),
    ),
    (
        "cmd an object",
        req({"PING": 1}),
        error("cam1", "UNKNOWN", f"message has no 'cmd' string; commands: {COMMAND_LIST}"),
    ),
    (
        "missing from",
        {k: v for k, v in req("PING").items() if k != "from"},
        error(
            "cam1",
            "PING",
            "message has no 'from' string; put the sender's name there, e.g. \"Master\"",
            to="UNKNOWN",
        ),
    ),
    (
        "missing payload",
        {k: v for k, v in req("GET").items() if k != "payload"},
        error(
            "cam1",
            "GET",
            "message has no 'payload'; send \"payload\": {} when the command takes none",
        ),
    ),
    (
        "wrong version",
        req("PING", version="0.1.0"),
        error(
            "cam1",
            "PING",
            "Protocol version mismatch: expected 0.2.2, got 0.1.0. Use a client of that "
            "protocol version, or add this one to the server's accepted versions",
        ),
    ),
    (
        "unknown command",
        req("JUMP"),
        error("cam1", "JUMP", f"Unknown command 'JUMP'; commands: {COMMAND_LIST}"),
    ),
    (
        "empty command (echoed as sent, as ServerLHC does)",
        req(""),
        error("cam1", "", f"message has no 'cmd' string; commands: {COMMAND_LIST}"),
    ),
    (
        "lower-case command",
        req("get"),
        error("cam1", "get", f"Unknown command 'get'; commands: {COMMAND_LIST}"),
    ),
    (
        "payload a string",
        req("PING", "x"),
        error("cam1", "PING", "'payload' must be a JSON object, got string"),
    ),
    (
        "SET without positions",
        req("SET"),
        error(
            "cam1",
            "SET",
            "SET needs payload 'positions': a list of positions or an object "
            "{axis index: position}",
        ),
    ),
    (
        "SET positions a string",
        req("SET", {"positions": "1.5"}),
        error(
            "cam1",
            "SET",
            "SET payload 'positions' must be a list of positions or an object "
            "{axis index: position}, got string",
        ),
    ),
    (
        "SET too many positions",
        req("SET", {"positions": [1, 2, 3]}),
        error(
            "cam1",
            "SET",
            "SET refused: 3 positions for a server with freedom 2; send at most 2, axis 0 first",
        ),
    ),
    (
        "SET axis beyond freedom",
        req("SET", {"positions": {"2": 1.0}}),
        error(
            "cam1", "SET", "SET refused: '2' is not an axis of this server; use axis indices 0..1"
        ),
    ),
    (
        "SET position not a number",
        req("SET", {"positions": {"0": "far"}}),
        error("cam1", "SET", "SET refused: position of axis 0 must be a number, got string"),
    ),
    (
        "SAVE without path",
        req("SAVE"),
        error(
            "cam1", "SAVE", "SAVE needs payload 'path': a string (the directory or file to save to)"
        ),
    ),
    (
        "SAVE path a number",
        req("SAVE", {"path": 7}),
        error(
            "cam1",
            "SAVE",
            "SAVE payload 'path' must be a string (the directory or file to save to), got number 7",
        ),
    ),
    (
        "OPT data a list",
        req("OPT", {"data": [1]}),
        error("cam1", "OPT", "OPT payload 'data' must be an object, got array"),
    ),
    (
        "SET ACT without actuators",
        req("SET ACT"),
        error("cam1", "SET ACT", "SET ACT needs payload 'actuators': an object"),
    ),
    (
        "SET DIAG diagnostics null",
        req("SET DIAG", {"diagnostics": None}),
        error("cam1", "SET DIAG", "SET DIAG payload 'diagnostics' must be an object, got null"),
    ),
    (
        "UPDATE ACT POS without actuators",
        req("UPDATE ACT POS"),
        error("cam1", "UPDATE ACT POS", "UPDATE ACT POS needs payload 'actuators': an object"),
    ),
]


@pytest.mark.parametrize("kind", [zmq.REQ, zmq.DEALER], ids=["REQ", "DEALER"])
def test_every_bad_input_gets_one_exact_error_and_the_server_lives(cam, kind):
    recorder = Recorder()
    recorder.bind(cam)
    sock = client_socket(cam.address, kind)
    for label, message, expected in BAD_INPUTS:
        if label == "empty body" and kind == zmq.DEALER:
            continue  # from a DEALER, an empty frame reads as REQ framing (no body at all)
        assert ask(sock, message) == expected, label
    assert recorder.calls == []  # nothing malformed reaches a callback
    assert ask(sock, req("PING")) == ok("cam1", "PING", "Still alive.", {"PING": "PONG"})


def test_oversized_message_is_answered(cam):
    server = LaplaceServer("small", "tcp://127.0.0.1:0", 0, "CAMERA").start()
    try:
        server.server.core.limits = ServerLimits(max_message_bytes=100)
        sock = client_socket(server.address)
        body = json.dumps(req("OPT", {"data": {"pad": "x" * 200}})).encode()
        reply = ask(sock, body)
        assert reply["error_msg"] == (
            f"request of {len(body)} bytes exceeds this server's limit of 100 bytes; send "
            "large data as a file path or in smaller pieces"
        )
        assert (reply["cmd"], reply["payload"], reply["msg"]) == (
            "UNKNOWN",
            {},
            "Error encountered.",
        )
    finally:
        server.stop()


def test_native_requests_still_work_on_the_same_socket(cam):
    dealer = client_socket(cam.address, zmq.DEALER)
    pong = ask(dealer, {"type": "ping", "id": 7})
    assert pong["status"] == "ok" and pong["id"] == 7 and pong["result"]["name"] == "cam1"
    described = ask(dealer, {"type": "describe"})
    assert described["result"]["name"] == "cam1" and described["result"]["kind"] == "motor"
    # a native request without type is still a native error (no LAPLACE fields in it)
    assert ask(dealer, {"id": 1}) == {
        "status": "error",
        "error": "request has no string 'type' field; expected one of "
        f"{sorted(native.REQUEST_TYPES)}",
        "type": "ProtocolError",
        "id": 1,
    }


def test_laplace_requests_are_measured():
    server = LaplaceServer("measured-cam", "tcp://127.0.0.1:0", 0, "CAMERA").start()
    try:
        sock = client_socket(server.address)
        ask(sock, req("GET"))
        ask(sock, req("JUMP"))
    finally:
        server.stop()
    text = metrics.exposition().decode()
    assert (
        'labmesh_request_duration_seconds_count{device="measured-cam",operation="GET",'
        'status="ok",type="laplace"} 1.0' in text
    )
    assert (
        'labmesh_request_errors_total{device="measured-cam",error="LaplaceError",'
        'type="laplace"} 1.0' in text
    )


# ---- LaplaceServer API ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "text"),
    [
        (("c", "tcp://127.0.0.1:0", 0, "LASER"), {}, ValueError, "Invalid device 'LASER'"),
        (("c", "tcp://127.0.0.1:0", -1, "CAMERA"), {}, ValueError, "freedom must be a whole"),
        (("c", "tcp://127.0.0.1:0", True, "CAMERA"), {}, ValueError, "freedom must be a whole"),
        (("", "tcp://127.0.0.1:0", 0, "CAMERA"), {}, ValueError, "name must be"),
        (("c", 5555, 0, "CAMERA"), {}, TypeError, "address must be a string"),
        (
            ("c", "tcp://127.0.0.1:0", 0, "CAMERA"),
            {"empty_data_after_get": True},
            ValueError,
            "empty_data_after_get=True is not supported",
        ),
        (("c", "tcp://127.0.0.1:0", 0, "CAMERA"), {"versions": []}, ValueError, "non-empty"),
    ],
)
def test_constructor_refuses_bad_arguments(args, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        LaplaceServer(*args, **kwargs)


def test_serverlhc_positional_signature_and_properties():
    server = LaplaceServer(
        "opt 2", "tcp://127.0.0.1:0", 0, "OPT", {"hello": "world"}, False, 100, 10, ["a"], ["b"]
    )
    try:
        assert (server.name, server.freedom, server.device) == ("opt 2", 0, "OPT")
        assert server.address.startswith("tcp://127.0.0.1:") and not server.address.endswith(":0")
        assert not server.running and not server.is_alive()
        with server:
            assert server.running and server.is_alive()
            sock = client_socket(server.address)
            info = ask(sock, req("INFO"))["payload"]
            assert (info["name_list"], info["plottables_list"]) == (["a"], ["b"])
            server.set_name_list(["c", "d"])
            assert ask(sock, req("INFO"))["payload"]["name_list"] == ["c", "d"]
        assert not server.running
        server.join(1.0)
    finally:
        server.stop()


def test_set_data_is_a_snapshot_with_a_sequence_number(cam):
    sock = client_socket(cam.address)
    data = {"positions": [1.0, 2.0], "image": {"sum": 5}}
    seq = cam.set_data(data)
    assert seq == cam.seq == 2
    data["positions"].append(3.0)  # the caller keeps changing its dict: nothing leaks in
    data["image"]["sum"] = 99
    first = ask(sock, req("GET"))["payload"]
    second = ask(sock, req("GET"))["payload"]
    assert first == second == {"data": {"positions": [1.0, 2.0], "image": {"sum": 5}}, "seq": 2}
    copy = cam.data
    copy["positions"].clear()  # nor does a reader's change
    assert cam.data == {"positions": [1.0, 2.0], "image": {"sum": 5}}
    assert cam.empty_data() == 3
    assert ask(sock, req("GET"))["payload"] == {"data": {}, "seq": 3}


def test_update_data_loses_no_update_across_threads(cam):
    threads, per_thread = 8, 250
    start = threading.Barrier(threads)

    def writer(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            cam.update_data({f"t{t}": i, f"t{t}-{i}": True})

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    sock = client_socket(cam.address)
    for worker in workers:
        worker.start()
    seen = [ask(sock, req("GET"))["payload"]["seq"] for _ in range(20)]
    for worker in workers:
        worker.join(10)
    assert seen == sorted(seen)  # a client never sees the sequence go back
    final = ask(sock, req("GET"))["payload"]
    assert final["seq"] == 1 + threads * per_thread
    for t in range(threads):
        assert final["data"][f"t{t}"] == per_thread - 1
        assert all(final["data"][f"t{t}-{i}"] for i in range(per_thread))


def test_on_get_that_sets_data_is_served_fresh(cam):
    counter = iter(range(1, 100))
    cam.set_on_get(lambda: cam.set_data({"shot": next(counter)}))
    sock = client_socket(cam.address)
    assert ask(sock, req("GET"))["payload"] == {"data": {"shot": 1}, "seq": 2}
    assert ask(sock, req("GET"))["payload"] == {"data": {"shot": 2}, "seq": 3}


def test_a_callback_that_raises_answers_a_laplace_error(cam):
    def refuse(path: str) -> None:
        raise OSError(f"{path}: disk full")

    cam.set_on_saving_path_changed(refuse)
    sock = client_socket(cam.address)
    assert ask(sock, req("SAVE", {"path": "/mnt/x"})) == error(
        "cam1", "SAVE", "cam1: SAVE failed: /mnt/x: disk full"
    )
    assert ask(sock, req("PING"))["error_msg"] is None


def test_ping_and_get_answer_while_a_callback_runs_long(cam):
    entered, release = threading.Event(), threading.Event()

    def hold(data):
        entered.set()
        return release.wait(10)

    cam.set_on_opt(hold)
    slow = client_socket(cam.address)
    slow.send(json.dumps(req("OPT", {"data": {}})).encode())
    try:
        assert entered.wait(5), "the OPT callback never ran"
        sock = client_socket(cam.address)
        assert ask(sock, req("PING"))["payload"] == {"PING": "PONG"}
        assert ask(sock, req("GET"))["payload"]["data"] == {"positions": [0.0, 0.0], "unit": "mm"}
        # both answered while the callback still held (it waits for `release`, set below)
        assert not release.is_set()
    finally:
        release.set()
    assert json.loads(slow.recv())["msg"] == "Updating opt."


def test_stop_is_bounded_while_a_callback_hangs():
    server = LaplaceServer("hang", "tcp://127.0.0.1:0", 0, "CAMERA").start()
    entered, release = threading.Event(), threading.Event()

    def hang(data):
        entered.set()
        return release.wait(10)

    server.set_on_opt(hang)
    sock = client_socket(server.address)
    sock.send(json.dumps(req("OPT", {"data": {}})).encode())
    assert entered.wait(5), "the OPT callback never ran"
    started = time.monotonic()
    server.stop(timeout=1.0)
    try:
        assert time.monotonic() - started < 1.5
        assert port_is_free(server.address)  # the socket is closed although the call runs on
    finally:
        release.set()
    assert wait_until(lambda: not server.running, timeout=3.0)


def test_remote_stop_only_when_allowed():
    server = LaplaceServer("stoppable", "tcp://127.0.0.1:0", 0, "CAMERA", allow_stop=True).start()
    address = server.address
    try:
        sock = client_socket(address)
        info = ask(sock, req("INFO"))["payload"]
        assert info["capabilities"] == list(env.COMMANDS)
        assert ask(sock, req("STOP")) == ok("stoppable", "STOP", "Server stopping.")
        assert wait_until(lambda: not server.running, timeout=3.0)
        assert port_is_free(address)
    finally:
        server.stop()


def test_accepted_versions_are_configurable():
    server = LaplaceServer(
        "multi", "tcp://127.0.0.1:0", 0, "SHOT", versions=("0.2.2", "0.2.1")
    ).start()
    try:
        sock = client_socket(server.address)
        reply = ask(sock, req("PING", version="0.2.1"))
        assert (reply["version"], reply["error_msg"]) == ("0.2.1", None)
        refused = ask(sock, req("PING", version="0.3.0"))
        assert refused["version"] == "0.2.2"
        assert refused["error_msg"].startswith(
            "Protocol version mismatch: expected one of 0.2.2, 0.2.1, got 0.3.0."
        )
    finally:
        server.stop()


# ---- any labmesh device served to LAPLACE clients -------------------------------------------
def test_stage_info_get_and_set(stage_server):
    sock = client_socket(stage_server.address)
    assert ask(sock, req("INFO")) == ok(
        "stage",
        "INFO",
        "Informations transmitted.",
        {
            "device": "MOTOR",
            "freedom": 2,
            "name": "stage",
            "capabilities": ALL_BUT_STOP,
            "name_list": ["x", "y"],
            "plottables_list": ["x/position", "x/speed", "y/position", "y/speed"],
        },
    )
    readings = {"x/position": 0.0, "x/speed": 1000.0, "y/position": 0.0, "y/speed": 1000.0}
    assert ask(sock, req("GET")) == ok(
        "stage",
        "GET",
        "Data sent.",
        {"data": {**readings, "positions": [0.0, 0.0], "unit": "mm"}, "seq": 1},
    )
    # the master's sample_point: {index: value}, JSON turns the keys into strings
    assert ask(sock, req("SET", {"positions": {"0": 10, "1": -5.5}})) == ok(
        "stage", "SET", "Positions updated."
    )

    def positions() -> list[float]:
        return ask(sock, req("GET"))["payload"]["data"]["positions"]

    assert wait_until(lambda: positions() == [10.0, -5.5], timeout=3.0)
    assert ask(sock, req("SET", {"positions": [20]}))["error_msg"] is None
    assert wait_until(lambda: positions() == [20.0, -5.5], timeout=3.0)
    assert ask(sock, req("SET", {"positions": {"y": 7}}))["error_msg"] is None
    assert wait_until(lambda: positions() == [20.0, 7.0], timeout=3.0)


def test_stage_set_refusals(stage_server):
    sock = client_socket(stage_server.address)
    assert ask(sock, req("SET", {"positions": {"0": 500}})) == error(
        "stage",
        "SET",
        "SET refused: 500 mm is outside the soft limits of axis x [0, 100] mm; nothing was moved",
    )
    assert ask(sock, req("SET", {"positions": [1, 2, 3]})) == error(
        "stage",
        "SET",
        "SET refused: 3 positions for a server with freedom 2; send at most 2, axis 0 first",
    )
    assert ask(sock, req("SET", {"positions": {"z": 1}})) == error(
        "stage",
        "SET",
        "SET refused: 'z' is not an axis of this server; use axis indices 0..1 or names ['x', 'y']",
    )
    assert ask(sock, req("GET"))["payload"]["data"]["positions"] == [0.0, 0.0]


def test_stage_set_respects_locks(stage_server):
    sock = client_socket(stage_server.address)
    with build_client(stage_server.address, resources="x", timeout=3000) as holder:
        refused = ask(sock, req("SET", {"positions": {"0": 5, "1": 5}}))
        assert refused["cmd"] == "SET" and refused["msg"] == "Error encountered."
        assert refused["error_msg"].startswith("resource locked: ")
        assert "x" in refused["error_msg"]
        assert ask(sock, req("SET", {"positions": {"1": 5}}))["error_msg"] is None
        assert wait_until(
            lambda: ask(sock, req("GET"))["payload"]["data"]["positions"] == [0.0, 5.0]
        )
        assert holder.call("positions") == {"x": 0.0, "y": 5.0}


def test_get_during_a_long_move_answers_at_once_with_the_last_readings():
    stage = MotorStage(("x",), speed=20.0, name="slow")
    server = DeviceServer(stage, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter()).start()
    try:
        sock = client_socket(server.address)
        before = ask(sock, req("GET"))["payload"]
        with build_client(server.address, timeout=3000) as native:
            assert ask(sock, req("SET", {"positions": [40]}))["error_msg"] is None  # a 2 s move
            # answered before the move ended, not after: the move is still running now
            assert native.ping()["task"]["operation"] == "SET"
            assert ask(sock, req("PING"))["error_msg"] is None
            during = ask(sock, req("GET"))["payload"]
            # ... and PING and GET were answered while it still ran
            assert native.ping()["task"]["operation"] == "SET"
        assert during == before  # same readings, same sequence number: nothing new yet
        assert wait_until(
            lambda: ask(sock, req("GET"))["payload"]["data"]["positions"] == [40.0], timeout=3
        )
        assert ask(sock, req("GET"))["payload"]["seq"] > before["seq"]
    finally:
        server.stop()


def test_a_set_moves_as_a_task_and_stop_stops_it_where_it_is():
    stage = MotorStage(("x",), speed=10.0, name="slow")
    server = DeviceServer(stage, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter()).start()
    try:
        sock = client_socket(server.address)
        assert ask(sock, req("SET", {"positions": [40]}))["error_msg"] is None  # a 4 s move
        with build_client(server.address) as native_client:
            # served between the move's steps, while it runs
            assert wait_until(lambda: native_client.query("x/position") > 2, timeout=3)
            moving = native_client.query("x/position")
            assert 2 < moving < 40
            assert native_client.ping()["task"]["operation"] == "SET"
            stopped = ask(sock, req("STOP"))
            assert "the running move (task " in stopped["error_msg"]
            assert "was stopped; this server does not take a remote STOP" in stopped["error_msg"]
            assert wait_until(lambda: native_client.ping()["task"] is None, timeout=3)
            where = native_client.query("x/position")
            assert moving <= where < 40  # stopped where it was, before the target
            time.sleep(0.2)
            assert native_client.query("x/position") == where
    finally:
        server.stop()


def test_a_failed_move_is_logged_and_kept():
    class Jammed(MotorStage):
        def move_abs(self, axis: str, position: float) -> float:
            raise RuntimeError(f"{axis} is jammed")

    adapter = LaplaceAdapter()
    server = DeviceServer(
        Jammed(("x",), name="jammed"), address="tcp://127.0.0.1:0", laplace=adapter
    ).start()
    try:
        sock = client_socket(server.address)
        assert ask(sock, req("SET", {"positions": [1]}))["error_msg"] is None
        assert wait_until(lambda: adapter.last_error == "SET {'x': 1.0}: x is jammed")
    finally:
        server.stop()


def test_powermeter_is_served_as_a_diagnostic():
    meter = MemoryMeter("pm")
    server = DeviceServer(meter, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter()).start()
    try:
        sock = client_socket(server.address)
        info = ask(sock, req("INFO"))["payload"]
        assert info == {
            "device": "CAMERA",
            "freedom": 0,
            "name": "pm",
            "capabilities": ALL_BUT_STOP,
            "name_list": [],
            "plottables_list": ["AUTORANGE", "AVERAGING", "MODE", "POWER", "WAVELENGTH"],
        }
        assert ask(sock, req("GET"))["payload"] == {
            "data": {
                "AUTORANGE": True,
                "AVERAGING": 10,
                "MODE": "CW",
                "POWER": 0.001,
                "WAVELENGTH": 532.0,
            },
            "seq": 1,
        }
        assert ask(sock, req("SET", {"positions": [1]})) == error(
            "pm", "SET", "SET refused: this server has freedom 0 (no axes to move)"
        )
        meter.values["POWER"] = 0.5
        assert ask(sock, req("GET"))["payload"]["data"]["POWER"] == 0.5
    finally:
        server.stop()


def test_adapter_options_and_configuration_errors():
    adapter = LaplaceAdapter(kind="GAS", readings=["POWER"], name_list=["line A"])
    server = DeviceServer(MemoryMeter("gauge"), address="tcp://127.0.0.1:0", laplace=adapter)
    with server:
        sock = client_socket(server.address)
        info = ask(sock, req("INFO"))["payload"]
        assert (info["device"], info["name_list"], info["plottables_list"]) == (
            "GAS",
            ["line A"],
            ["POWER"],
        )
        assert ask(sock, req("GET"))["payload"]["data"] == {"POWER": 0.001}
    with pytest.raises(ValueError, match=r"readings \['TRIGGER'\] are not readable parameters"):
        DeviceServer(
            MemoryMeter(), address="tcp://127.0.0.1:0", laplace=LaplaceAdapter(readings=["TRIGGER"])
        )
    with pytest.raises(ValueError, match="freedom=1 but the device has 2 axes"):
        DeviceServer(
            MotorStage(("x", "y")), address="tcp://127.0.0.1:0", laplace=LaplaceAdapter(freedom=1)
        )
    with pytest.raises(ValueError, match="LAPLACE device kind 'LASER'"):
        LaplaceAdapter(kind="LASER")


def test_callbacks_never_overlap_device_calls():
    meter = MemoryMeter("busy")
    adapter = LaplaceAdapter()
    adapter.set_on_opt(lambda data: meter.sleep(0.15))
    server = DeviceServer(meter, address="tcp://127.0.0.1:0", laplace=adapter).start()
    try:
        with build_client(server.address, timeout=5000) as native_client:
            laplace_sock = client_socket(server.address)
            laplace_sock.send(json.dumps(req("OPT", {"data": {}})).encode())
            results = [native_client.call("sleep", 0.15) for _ in range(2)]
            assert json.loads(laplace_sock.recv())["error_msg"] is None
        assert results == [0.15, 0.15]
        assert meter.max_active == 1
    finally:
        server.stop()


def test_importing_laplace_does_not_import_qt():
    code = "import sys, labmesh.laplace; print('PyQt6' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


def test_qt_signals_reach_slots_in_the_gui_thread(monkeypatch):
    try:
        import PyQt6.QtCore  # noqa: F401  (PyQt6 is in the test extra)
    except ImportError as exc:
        unavailable(f"PyQt6 is not installed (pip install -e '.[test]'): {exc}")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    from PyQt6.QtCore import QCoreApplication

    app = QCoreApplication.instance() or QCoreApplication([])
    server = LaplaceServer("qt-cam", "tcp://127.0.0.1:0", 2, "CAMERA").start()
    try:
        signals = server.qt_signals()
        received: list[tuple[str, Any, bool]] = []
        main = threading.main_thread()

        def slot(name: str):
            return lambda *args: received.append(
                (name, args[0] if args else None, threading.current_thread() is main)
            )

        for name in (
            "get_received",
            "position_changed",
            "saving_path_changed",
            "opt_received",
            "scan_received",
            "set_actuators_dict_received",
            "set_diagnostics_dict_received",
            "actuators_pos_update_received",
        ):
            getattr(signals, name).connect(slot(name))
        sock = client_socket(server.address)
        scan = req("SCAN", {"data": {"i": 1}})
        update_position = req("UPDATE ACT POS", {"actuators": {"a": 3}})
        for message in (
            req("GET"),
            req("SET", {"positions": {"0": 1.5}}),
            req("SAVE", {"path": "/data"}),
            req("OPT", {"data": {"results": []}}),
            scan,
            req("SET ACT", {"actuators": {"a": 1}}),
            req("SET DIAG", {"diagnostics": {"d": 2}}),
            update_position,
        ):
            assert ask(sock, message)["error_msg"] is None
        deadline = time.monotonic() + 5
        while len(received) < 9 and time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.005)
        assert received == [
            ("get_received", None, True),
            ("position_changed", {"0": 1.5}, True),
            ("saving_path_changed", "/data", True),
            ("opt_received", {"results": []}, True),
            ("scan_received", scan, True),
            ("set_actuators_dict_received", {"a": 1}, True),
            ("set_diagnostics_dict_received", {"d": 2}, True),
            # UPDATE ACT POS: ServerLHC's callback gets the whole message, then labmesh's own
            ("set_actuators_dict_received", update_position, True),
            ("actuators_pos_update_received", {"a": 3}, True),
        ]
    finally:
        server.stop()


def test_state_changing_commands_respect_locks_like_set(stage_server):
    """SAVE, OPT, SCAN, SET ACT, SET DIAG and UPDATE ACT POS carry no session: like SET, they
    run only while nobody holds the device's resources (issue 15: they used to pass locks)."""
    adapter = stage_server.core.envelope
    ran = []
    for name in ("on_saving_path_changed", "on_opt", "on_scan", "on_set_actuators"):
        setattr(adapter, name, lambda value, name=name: ran.append(name))
    sock = client_socket(stage_server.address)
    with build_client(stage_server.address, resources=["x", "y"], connect_kwargs={"name": "exp"}):
        for cmd, payload in (
            ("SAVE", {"path": "run-7"}),
            ("OPT", {"data": {}}),
            ("SCAN", {"data": {}}),
            ("SET ACT", {"actuators": {"a": 1}}),
            ("SET DIAG", {"diagnostics": {"d": 1}}),
            ("UPDATE ACT POS", {"actuators": {"a": 1}}),
        ):
            reply = ask(sock, req(cmd, payload))
            assert reply["error_msg"] and "resource locked" in reply["error_msg"], (cmd, reply)
        assert ran == []
    assert ask(sock, req("SAVE", {"path": "run-7"}))["error_msg"] is None  # free again
    assert wait_until(lambda: ran == ["on_saving_path_changed"])


@pytest.mark.parametrize(
    ("path", "refusal"),
    [
        ("../../../../etc/cron.d/x", "climbs up with '..'"),
        ("runs/../../x", "climbs up with '..'"),
        ("..\\..\\windows\\x", "climbs up with '..'"),
        ("/etc/cron.d/x", "is absolute; paths must be under '/data'"),
        ("", "must be a non-empty string"),
    ],
)
def test_save_paths_cannot_climb_out(path, refusal):
    stage = MotorStage(("x",), name="saver")
    adapter = LaplaceAdapter(save_root="/data")
    seen = []
    adapter.on_saving_path_changed = seen.append
    server = DeviceServer(stage, address="tcp://127.0.0.1:0", laplace=adapter).start()
    try:
        sock = client_socket(server.address)
        reply = ask(sock, req("SAVE", {"path": path}))
        assert refusal in (reply["error_msg"] or ""), reply
        assert ask(sock, req("SAVE", {"path": "/data/run-7"}))["error_msg"] is None
        assert ask(sock, req("SAVE", {"path": "run-8"}))["error_msg"] is None
        assert wait_until(lambda: seen == ["/data/run-7", "run-8"])
    finally:
        server.stop()


def test_with_save_root_none_only_relative_paths_are_saved():
    adapter = LaplaceAdapter(save_root=None)
    server = DeviceServer(MotorStage(("x",)), address="tcp://127.0.0.1:0", laplace=adapter).start()
    try:
        sock = client_socket(server.address)
        reply = ask(sock, req("SAVE", {"path": "/tmp/x"}))
        assert "relative (this server has no save_root)" in reply["error_msg"]
        assert ask(sock, req("SAVE", {"path": "runs/x"}))["error_msg"] is None
    finally:
        server.stop()
