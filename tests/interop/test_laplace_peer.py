"""labmesh against the real LAPLACE-LHC server (laplace-server 0.2.0 from PyPI).

One REQ client script (laplace_master_client.py, run in the interop venv with laplace-server's
own message builders) does what the LAPLACE master does, against the real ServerLHC
(laplace_peer_server.py) and against labmesh; the replies must match wherever the real server
does not crash. Where the real one crashes, hangs or accepts nonsense, labmesh's behaviour is
asserted instead. What the real server does, as observed here:

- a body that is not JSON (or not UTF-8) or whose `cmd` is a list or an object kills its server
  thread (json.JSONDecodeError / UnicodeDecodeError / TypeError escape `run()`); the socket
  stays bound, so clients then time out;
- anyone may STOP it; `stop()` hangs for ever when the address it advertises (get_ip) is not the
  one it listens on, e.g. bound to 127.0.0.1 on a host with a LAN address;
- SET takes a string or too many positions, PING/GET/INFO take a payload that is not an object,
  UPDATE ACT POS needs no `actuators`: labmesh refuses these with LAPLACE errors (deliberate
  differences). For a valid UPDATE ACT POS both call `on_set_actuators` with the whole message
  (labmesh then also `on_update_actuator_positions(actuators)`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from labmesh.drivers.motor import MotorStage
from labmesh.laplace import CALLBACKS, LaplaceAdapter, LaplaceServer
from labmesh.server import DeviceServer

pytestmark = pytest.mark.interop

HERE = Path(__file__).resolve().parent
PEER_SERVER = HERE / "laplace_peer_server.py"
MASTER_CLIENT = HERE / "laplace_master_client.py"
#: Bound for one run of the client script (its own socket timeouts are 2 s per exchange).
CLIENT_RUN_TIMEOUT_S = 60.0
DATA = {"positions": [0.0, 0.0], "unit": "mm"}
#: The envelope fields every reply has (a labmesh reply to an undecodable body adds native ones).
ENVELOPE = ("from", "to", "cmd", "payload", "version", "error_msg", "msg")
#: Malformed messages both servers answer with an error (texts differ, the shape may not).
BOTH_REFUSE = (
    "json_array",
    "missing_version",
    "missing_cmd",
    "missing_from",
    "missing_payload",
    "wrong_version",
    "unknown_command",
    "save_payload_not_object",
    "save_missing_path",
    "set_missing_positions",
    "opt_missing_data",
)
#: Accepted by the real server, refused by labmesh.
ONLY_LABMESH_REFUSES = (
    "set_positions_string",
    "set_too_many_positions",
    "ping_payload_not_object",
    "update_act_pos_without_actuators",
)
#: Kill the real server's thread.
FATAL_TO_REAL = {
    "not_json": "JSONDecodeError",
    "bad_utf8": "UnicodeDecodeError",
    "cmd_list": "TypeError: unhashable type: 'list'",
    "cmd_object": "TypeError: unhashable type: 'dict'",
}


@pytest.fixture
def real_laplace(interop_python: Path, spawn: Callable[..., Any], free_tcp_port: int) -> Any:
    """Start the real ServerLHC on a free 127.0.0.1 port (killed by PID at teardown)."""

    def start(*extra: str) -> Any:
        port = free_tcp_port
        process = spawn(
            [
                interop_python,
                PEER_SERVER,
                str(port),
                "--name",
                "peer",
                "--data",
                json.dumps(DATA),
                "--max-lifetime",
                "120",
                *extra,
            ]
        )
        process.address = process.wait_for_line("READY ").split(" ", 1)[1].strip()
        process.port = port
        return process

    return start


@pytest.fixture
def master_client(interop_python: Path, spawn: Callable[..., Any]) -> Callable[..., Any]:
    """Run laplace_master_client.py in the interop venv (killed by PID if it overruns); its
    JSON output."""

    def run(address: str, *args: str) -> Any:
        process = spawn([interop_python, MASTER_CLIENT, address, *args])
        code = process.wait(CLIENT_RUN_TIMEOUT_S)
        assert code == 0, f"client failed ({code}):\n{process.stdout}\n{process.stderr}"
        return json.loads(process.stdout_lines[-1])

    return run


class Callbacks:
    """Records labmesh callbacks as the peer prints them: (name, [arguments])."""

    NAMES = CALLBACKS

    def __init__(self, target: LaplaceAdapter) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        for name in self.NAMES:
            getattr(target, f"set_{name}")(self._record(name))

    def _record(self, name: str) -> Callable[..., None]:
        return lambda *args: self.calls.append((name, json.loads(json.dumps(list(args)))))


def peer_callbacks(process: Any) -> list[tuple[str, list[Any]]]:
    calls = []
    for line in process.stdout_lines:
        if line.startswith("CALLBACK "):
            _, name, args = line.split(" ", 2)
            calls.append((name, json.loads(args)))
    return calls


@pytest.fixture
def labmesh_peer() -> Iterator[LaplaceServer]:
    """labmesh's LaplaceServer set up like the peer (STOP allowed, so INFO lists it too)."""
    server = LaplaceServer(
        "peer",
        "tcp://127.0.0.1:0",
        2,
        "MOTOR",
        DATA,
        name_list=["first", "second"],
        plottables_list=["positions"],
        allow_stop=True,
    ).start()
    try:
        yield server
    finally:
        server.stop()


def without_seq(reply: dict[str, Any]) -> dict[str, Any]:
    """A labmesh GET reply without its `payload.seq` (labmesh's addition)."""
    if reply.get("cmd") != "GET" or reply.get("error_msg") is not None:
        return reply
    assert isinstance(reply["payload"]["seq"], int)
    return {**reply, "payload": {k: v for k, v in reply["payload"].items() if k != "seq"}}


def test_master_session_matches_the_real_server(real_laplace, master_client, labmesh_peer):
    real = real_laplace()
    calls = Callbacks(labmesh_peer)
    args = ("master", "--polls", "2", "--interval", "0.3")
    theirs = master_client(real.address, *args)["transcript"]
    ours = master_client(labmesh_peer.address, *args)["transcript"]
    assert [s["step"] for s in theirs] == [s["step"] for s in ours]
    assert len(theirs) == 13
    for mine, peer in zip(ours, theirs, strict=True):
        assert mine["request"] == peer["request"], mine["step"]
        assert peer["reply"] is not None and mine["reply"] is not None, mine["step"]
        assert without_seq(mine["reply"]) == peer["reply"], mine["step"]
    deadline = time.monotonic() + 5
    while len(peer_callbacks(real)) < len(calls.calls) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls.calls == peer_callbacks(real)
    assert [name for name, _ in calls.calls] == [
        "on_saving_path_changed",
        "on_get",
        "on_get",
        "on_position_changed",
        "on_get",
        "on_get",
        "on_opt",
    ]
    assert calls.calls[3] == ("on_position_changed", [{"0": 1.5, "1": 2.5}])


def test_master_session_against_a_labmesh_stage(real_laplace, master_client):
    real = real_laplace()
    stage = MotorStage(("x", "y"), speed=1000.0, name="peer")
    server = DeviceServer(stage, address="tcp://127.0.0.1:0", laplace=LaplaceAdapter()).start()
    try:
        args = ("master", "--polls", "2", "--interval", "0.3")
        theirs = master_client(real.address, *args)["transcript"]
        ours = master_client(server.address, *args)["transcript"]
    finally:
        server.stop()
    for mine, peer in zip(ours, theirs, strict=True):
        reply, expected = mine["reply"], peer["reply"]
        assert reply is not None, mine["step"]
        same = ("from", "to", "cmd", "version", "error_msg", "msg")
        assert {k: reply[k] for k in same} == {k: expected[k] for k in same}, mine["step"]
    info = ours[2]["reply"]["payload"]
    assert (info["device"], info["freedom"], info["name_list"]) == ("MOTOR", 2, ["x", "y"])
    # the master's SET moved the stage: its polls see the positions reach the targets
    assert ours[-2]["reply"]["payload"]["data"]["positions"] == [1.5, 2.5]
    assert stage.positions() == {"x": 1.5, "y": 2.5}


def test_malformed_messages_both_refuse_in_the_same_shape(
    real_laplace, master_client, labmesh_peer
):
    real = real_laplace()
    theirs = master_client(real.address, "cases", *BOTH_REFUSE)
    ours = master_client(labmesh_peer.address, "cases", *BOTH_REFUSE)
    for case in BOTH_REFUSE:
        peer, mine = theirs[case], ours[case]
        assert peer["alive_after"] and mine["alive_after"], case
        assert isinstance(peer["reply"]["error_msg"], str), case
        assert isinstance(mine["reply"]["error_msg"], str), case
        shape = [k for k in ENVELOPE if k != "error_msg"]
        assert {k: mine["reply"][k] for k in shape} == {k: peer["reply"][k] for k in shape}, case


def test_deliberate_differences(real_laplace, master_client, labmesh_peer):
    real = real_laplace()
    theirs = master_client(real.address, "cases", *ONLY_LABMESH_REFUSES)
    default = LaplaceServer("peer", "tcp://127.0.0.1:0", 2, "MOTOR", DATA).start()
    try:
        ours = master_client(default.address, "cases", *ONLY_LABMESH_REFUSES, "stop")
    finally:
        default.stop()
    for case in ONLY_LABMESH_REFUSES:
        assert theirs[case]["reply"]["error_msg"] is None, case  # accepted as if valid
        assert isinstance(ours[case]["reply"]["error_msg"], str), case
        assert ours[case]["reply"]["msg"] == "Error encountered.", case
    # anyone may STOP the real server; labmesh refuses unless allowed
    stopped = master_client(real.address, "cases", "stop")["stop"]
    assert stopped["reply"]["msg"] == "Server stopping." and not stopped["alive_after"]
    real.wait_for_line("THREAD ENDED")
    assert ours["stop"]["alive_after"]
    assert ours["stop"]["reply"]["error_msg"].startswith("STOP refused")


@pytest.mark.parametrize("case", sorted(FATAL_TO_REAL))
def test_input_that_kills_the_real_server_is_answered_by_labmesh(
    case, real_laplace, master_client, labmesh_peer
):
    real = real_laplace()
    theirs = master_client(real.address, "cases", case)[case]
    assert theirs == {"reply": None, "alive_after": False}
    real.wait_for_line("THREAD ENDED")
    assert FATAL_TO_REAL[case] in real.stderr
    ours = master_client(labmesh_peer.address, "cases", case)[case]
    assert ours["alive_after"]
    reply = ours["reply"]
    assert (reply["from"], reply["payload"], reply["msg"]) == ("peer", {}, "Error encountered.")
    assert isinstance(reply["error_msg"], str) and reply["error_msg"]


def test_real_stop_hangs_when_it_advertises_another_address(real_laplace):
    real = real_laplace("--advertise", "127.0.0.2", "--stop-after", "0.2")
    time.sleep(3.0)
    assert "STOPPED" not in real.stdout_lines  # still blocked in ServerLHC.stop()
    ours = LaplaceServer("peer", "tcp://127.0.0.1:0", 0, "CAMERA").start()
    started = time.monotonic()
    ours.stop()
    assert time.monotonic() - started < 2.0 and not ours.running
